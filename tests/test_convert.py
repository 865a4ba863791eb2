"""HF -> orbax conversion and restore: same logits, fp8 bytes kept, any mesh, damaged inputs refused."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

import kimi_jax
from kimi_jax.checkpoint.convert import convert
from kimi_jax.checkpoint.hf import CheckpointError, save_hf_checkpoint
from kimi_jax.checkpoint.orbax import MARKER
from kimi_jax.checkpoint.safetensors import SafetensorsError, SafetensorsFile, save_file
from kimi_jax.config import TINY_KIMI
from kimi_jax.model.quant import QArray, dequantize
from kimi_jax.model.weights import random_params

pytestmark = pytest.mark.sharded

TOKENS = np.array([[3, 17, 101, 5, 250, 42, 7, 199]], np.int32)
TARGET = "model.layers.1.mlp.experts.3.up_proj.weight"


def dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def converted(hub_checkpoint, tmp_path_factory):
    hf, params = hub_checkpoint(TINY_KIMI)
    out = convert(hf, tmp_path_factory.mktemp("orbax") / "tiny", mesh="expert=4,tensor=2", progress=False)
    return hf, out, params


def test_round_trip_logits_and_bytes(converted):
    """Orbax restore == HF load (fp32 logits), fp8 bytes identical and stored as uint8 on CPU."""
    hf, out, params = converted
    assert (out / MARKER).is_file() and (out / "config.json").is_file()
    ref = kimi_jax.load(hf, dtype="float32")
    got = kimi_jax.load(out, dtype="float32")
    np.testing.assert_allclose(got.logits(TOKENS), ref.logits(TOKENS), rtol=1e-6, atol=1e-6)
    q = got.params["moe_layers"]["ffn"]["experts_up"]
    assert isinstance(q, QArray) and q.values.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(q.values), params["moe_layers"]["ffn"]["experts_up"].values.view(np.uint8))
    assert dir_bytes(out) <= 1.5 * sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    import orbax.checkpoint as ocp  # on disk: fp8 values and f32 scales, as in the release

    with ocp.PyTreeCheckpointer() as ckpt:
        meta = ckpt.metadata(out / "weights" / "moe_layers.ffn.experts_up").item_metadata.tree
    assert meta["values"].dtype == np.dtype("float8_e4m3fn") and meta["scales"].dtype == np.float32


def test_restore_into_other_mesh(converted):
    """Converted with expert=4,tensor=2 checked; restored on data=2,expert=2,tensor=2: same logits, sharded."""
    hf, out, _ = converted
    ref = kimi_jax.load(hf, dtype="float32").logits(TOKENS)
    model = kimi_jax.load(out, dtype="float32", mesh="data=2,expert=2,tensor=2")
    w = model.params["moe_layers"]["ffn"]["experts_gate"].values
    assert w.dtype == np.uint8 and w.sharding.spec[1] == "expert"
    assert w.addressable_shards[0].data.shape[1] == TINY_KIMI.n_routed_experts // 2
    np.testing.assert_allclose(model.logits(TOKENS), ref, rtol=1e-5, atol=1e-5)


def test_bf16_source_quantized(tmp_path):
    """A bf16 HF checkpoint converts with --quantize fp8 to the block-fp8 layout of the release."""
    cfg = dataclasses.replace(TINY_KIMI, weight_block_size=None, num_hidden_layers=2)
    params = random_params(cfg, seed=1, std=0.05)
    hf = save_hf_checkpoint(params, cfg, tmp_path / "bf16", num_shards=2)
    (hf / "generation_config.json").write_text('{"temperature": 0.6}')  # side files travel along
    out = convert(hf, tmp_path / "fp8", quantize="fp8", progress=False)
    assert (out / "generation_config.json").read_text() == '{"temperature": 0.6}'
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    model = kimi_jax.load(out, dtype="float32")
    assert model.config.weight_block_size == (128, 128)
    q = model.params["moe_layers"]["attn"]["q_b_proj"]
    w = dequantize(QArray(np.asarray(q.values).view("float8_e4m3fn"), np.asarray(q.scales)), np.float32)
    src = np.asarray(params["moe_layers"]["attn"]["q_b_proj"], np.float32)
    assert np.abs(w - src).max() <= 0.07 * np.abs(src).max()  # fp8 e4m3: 3 mantissa bits


@pytest.fixture
def damaged(hub_checkpoint, tmp_path):
    src, _ = hub_checkpoint(TINY_KIMI)
    path = tmp_path / "hf"
    shutil.copytree(src, path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path, index["weight_map"][TARGET]


def _rewrite(path, shard, change):
    with SafetensorsFile(path / shard) as f:
        tensors = {k: np.array(f.get(k)) for k in f.keys()}
    change(tensors)
    save_file(tensors, path / shard)


def test_wrong_shape_refused_before_writing(damaged, tmp_path):
    path, shard = damaged
    _rewrite(path, shard, lambda t: t.__setitem__(TARGET, t[TARGET][:-1]))
    with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj.*shape"):
        convert(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_corrupt_or_missing_shard(damaged, tmp_path):
    path, shard = damaged
    (path / shard).write_bytes((path / shard).read_bytes()[:1000])  # truncated download
    with pytest.raises(SafetensorsError, match=shard):
        convert(path, tmp_path / "out", progress=False)
    (path / shard).unlink()
    with pytest.raises((OSError, ValueError), match=shard):
        convert(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_interrupted_conversion_never_complete(hub_checkpoint, tmp_path):
    """An interrupted run leaves no OUT; a copy of its partial output is refused; a rerun succeeds."""
    hf, _ = hub_checkpoint(TINY_KIMI)
    out = tmp_path / "out"
    seen = []

    def interrupt(leaf):
        seen.append(leaf.name)
        if len(seen) == 3:
            partial = next(tmp_path.glob(".out.partial-*"))
            shutil.copytree(partial, tmp_path / "copied")  # as if someone used it mid-run
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(hf, out, progress=False, on_group=interrupt)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    shutil.copy(hf / "config.json", tmp_path / "copied" / "config.json")
    with pytest.raises(CheckpointError, match="did not finish"):
        kimi_jax.load(tmp_path / "copied")
    convert(hf, out, progress=False)  # the rerun
    assert (out / MARKER).is_file()
    with pytest.raises(FileExistsError, match="--force"):
        convert(hf, out, progress=False)


def test_missing_group_in_orbax(converted, tmp_path):
    _, out, _ = converted
    copy = tmp_path / "c"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "weights" / "moe_layers.ffn.experts_down")
    with pytest.raises(CheckpointError, match="experts_down"):
        kimi_jax.load(copy)


def test_cli_progress(hub_checkpoint, tmp_path):
    from kimi_jax.convert import main

    hf, _ = hub_checkpoint(TINY_KIMI)
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["--hf", str(hf), "--out", str(tmp_path / "o")]) == 0
    assert "MB/s" in err.getvalue() and "ETA" in err.getvalue() and "100.0%" in err.getvalue()
    with contextlib.redirect_stderr(io.StringIO()) as err2, pytest.raises(SystemExit) as exit_:
        main(["--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")])  # argparse: one line, exit 2
    assert exit_.value.code == 2 and "argument --hf: Hugging Face checkpoint directory" in err2.getvalue()
    assert os.environ.get("JAX_PLATFORMS") == "cpu" and jax.default_backend() == "cpu"
