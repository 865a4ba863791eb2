"""Bad checkpoints fail at load with an error that names the tensor, the file and the fix."""

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

import kimi_jax
from kimi_jax.checkpoint.hf import CheckpointError
from kimi_jax.checkpoint.safetensors import SafetensorsError, SafetensorsFile, save_file
from kimi_jax.config import TINY_KIMI, ConfigError

pytestmark = pytest.mark.unit

TARGET = "model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.fixture
def checkpoint(hub_checkpoint, tmp_path):
    """A private copy of the tiny Kimi checkpoint to damage, and the shard holding TARGET."""
    src, _ = hub_checkpoint(TINY_KIMI)
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path, index, index["weight_map"][TARGET]


def rewrite_shard(path, shard, change):
    """Rewrite one shard with `change(tensors)` applied (tensors copied out of the mmap first)."""
    with SafetensorsFile(path / shard) as f:
        tensors = {k: np.array(f.get(k)) for k in f.keys()}
    change(tensors)
    save_file(tensors, path / shard)


def test_missing_tensor(checkpoint):
    path, index, shard = checkpoint
    rewrite_shard(path, shard, lambda t: t.pop(TARGET))
    del index["weight_map"][TARGET]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"not in the checkpoint.*experts\.3\.up_proj\.weight"):
        kimi_jax.load(path)


def test_tensor_listed_in_index_but_absent_from_shard(checkpoint):
    path, _, shard = checkpoint
    rewrite_shard(path, shard, lambda t: t.pop(TARGET))
    with pytest.raises(KeyError, match=TARGET.replace(".", r"\.")):
        kimi_jax.load(path)


def test_wrong_shape(checkpoint):
    path, _, shard = checkpoint
    rewrite_shard(path, shard, lambda t: t.__setitem__(TARGET, t[TARGET][:-1]))
    with pytest.raises(CheckpointError, match=r"weight' has shape \[71, 200\] but the config implies \[72, 200\]"):
        kimi_jax.load(path)


def test_wrong_dtype(checkpoint):
    path, _, shard = checkpoint
    rewrite_shard(path, shard, lambda t: t.__setitem__(TARGET, t[TARGET].astype(ml_dtypes.bfloat16)))
    with pytest.raises(CheckpointError, match=r"up_proj\.weight' has dtype bfloat16, expected float8_e4m3fn"):
        kimi_jax.load(path)


def test_truncated_shard(checkpoint):
    path, _, shard = checkpoint
    data = (path / shard).read_bytes()
    (path / shard).write_bytes(data[: len(data) - 1000])
    with pytest.raises(SafetensorsError, match="truncated"):
        kimi_jax.load(path)


def test_missing_shard_file(checkpoint):
    path, _, shard = checkpoint
    (path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        kimi_jax.load(path)


def test_config_that_does_not_match_the_weights(checkpoint):
    path, _, _ = checkpoint
    config = json.loads((path / "config.json").read_text())
    config["n_routed_experts"] = 32
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json belongs to these weights"):
        kimi_jax.load(path)


def test_unsupported_config_value(checkpoint):
    path, _, _ = checkpoint
    config = json.loads((path / "config.json").read_text())
    config["scoring_func"] = "softmax"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="scoring_func"):
        kimi_jax.load(path)


def test_no_such_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kimi_jax.load(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")  # a file is not "missing": it is the wrong thing
    with pytest.raises(FileNotFoundError, match="config.json is a file; pass the checkpoint directory"):
        kimi_jax.load(tmp_path / "config.json")


def test_bad_token_ids_and_context(checkpoint):
    path, _, _ = checkpoint
    model = kimi_jax.load(path, dtype="float32")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.logits([[1, 2, TINY_KIMI.vocab_size]])
    with pytest.raises(ValueError, match="exceed the context"):
        model.logits(np.zeros((1, TINY_KIMI.max_position_embeddings + 1), np.int32))


def test_extra_release_tensors_are_ignored(checkpoint, hub_checkpoint):
    """`rotary_emb.inv_freq` buffers in some dumps are skipped, not an error: the model loads the
    same weights and gives the same logits as without them."""
    path, index, shard = checkpoint
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    rewrite_shard(path, shard, lambda t: t.__setitem__(name, np.ones(8, np.float32)))
    index["weight_map"][name] = shard
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    got = kimi_jax.load(path, dtype="float32")
    want = kimi_jax.load(hub_checkpoint(TINY_KIMI)[0], dtype="float32")
    assert jax.tree.structure(got.params) == jax.tree.structure(want.params)
    tokens = np.arange(12, dtype=np.int32)[None] % TINY_KIMI.vocab_size
    np.testing.assert_array_equal(got.logits(tokens), want.logits(tokens))
