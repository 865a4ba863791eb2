"""Kimi-K2-Thinking's INT4 layout against transformers: a small checkpoint packed by compressed-tensors,
logits and greedy tokens equal DeepseekV3ForCausalLM on the weights compressed-tensors dequantizes;
the experts stay packed on the device; the K2.5/K2.6 layout; damaged INT4 tensors refused."""

import dataclasses
import json
import shutil
import warnings

import numpy as np
import pytest
from int4_util import checkpoint_tensors

import kimi_jax
from kimi_jax.bench.oracle import hf_logits, hf_model_from_tensors
from kimi_jax.checkpoint.hf import CheckpointError
from kimi_jax.checkpoint.safetensors import INDEX_FILENAME, SafetensorsFile, save_file
from kimi_jax.config import K25_PREFIX, TINY_KIMI_INT4
from kimi_jax.model.quant import INT4, QArray

pytestmark = pytest.mark.parity

CFG = TINY_KIMI_INT4
# Kimi-K2.6's ignore list as the release states it (../shared/reference/kimi-k2-thinking/README.md).
K26_IGNORE = ("re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*", "re:.*lm_head.*",
              "re:vision_tower.*", "re:mm_projector.*")
TINY_K25 = dataclasses.replace(TINY_KIMI_INT4, weights_prefix=K25_PREFIX, name="tiny-k25-int4",
                               int4=dataclasses.replace(TINY_KIMI_INT4.int4, ignore=K26_IGNORE))
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 24))
PROMPTS = [[5, 17, 99, 3], [250, 8, 41, 77, 12, 9]]


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


@pytest.fixture(scope="module")
def thinking(int4_checkpoint):
    """(checkpoint path, transformers oracle built from its tensors via compressed-tensors, oracle logits)."""
    path, _ = int4_checkpoint(CFG)
    oracle = hf_model_from_tensors(checkpoint_tensors(path), CFG)
    return path, oracle, hf_logits(oracle, TOKENS)


def test_config_is_read_from_the_checkpoint(thinking):
    path, _, _ = thinking
    cfg = kimi_jax.Config.from_json(path)
    assert dataclasses.replace(cfg, name=CFG.name) == CFG and cfg.weight_block_size is None
    assert json.loads((path / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"


@pytest.mark.parametrize("experts", ["grouped", "ragged", "reference"])
def test_fp32_logits_match_transformers(thinking, experts):
    path, _, want = thinking
    got = kimi_jax.load(path, dtype="float32", backend=experts).logits(TOKENS)
    assert rel(got, want) <= 1e-4
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_bf16_logits_close(thinking):
    path, _, want = thinking
    per_token = np.linalg.norm(kimi_jax.load(path, dtype="bfloat16").logits(TOKENS) - want, axis=-1)
    assert np.mean(per_token / np.linalg.norm(want, axis=-1) <= 2e-2) >= 0.7  # router near-ties: test_model_parity


def test_greedy_tokens_match_transformers_generate(thinking):
    import torch

    path, oracle, _ = thinking
    ours = kimi_jax.load(path, dtype="float32").generate(PROMPTS, max_new_tokens=8, temperature=0)
    for prompt, got in zip(PROMPTS, ours):
        want = oracle.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                               pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert got == want[0, len(prompt):].tolist()


def test_experts_stay_packed_on_the_device(thinking):
    """The device holds the checkpoint's int32 words and bf16 scales: 0.5625 bytes per expert parameter."""
    path, _, _ = thinking
    model = kimi_jax.load(path)
    ffn = model.params["moe_layers"]["ffn"]
    for name in ("experts_gate", "experts_up", "experts_down"):
        q = ffn[name]
        assert isinstance(q, QArray) and q.kind == INT4
        assert q.values.dtype == np.int32 and q.scales.dtype.name == "bfloat16"
        per_param = (q.values.nbytes + q.scales.nbytes) / np.prod(q.shape)
        # 4 bits + a bf16 scale per 32 = 0.5625: the "0.56", which bf16 scales cannot go below.
        assert per_param <= 0.5625, (name, per_param)
    name = f"model.layers.{CFG.first_k_dense_replace}.mlp.experts.2.down_proj.weight_packed"
    index = json.loads((path / INDEX_FILENAME).read_text())["weight_map"]
    with SafetensorsFile(path / index[name]) as f:
        np.testing.assert_array_equal(np.asarray(ffn["experts_down"].values[0, 2]), np.asarray(f.get(name)))
    # Everything else is bf16 (the ignore list), not quantized.
    assert not isinstance(ffn["shared_gate"], QArray) and ffn["shared_gate"].dtype.name == "bfloat16"
    assert not isinstance(model.params["moe_layers"]["attn"]["q_a_proj"], QArray)
    assert not isinstance(model.params["dense_layers"]["ffn"]["gate"], QArray)


def test_k25_layout_loads_and_skips_vision(int4_checkpoint):
    """Kimi-K2.5/K2.6: text_config nested, `language_model.` names, vision tensors skipped with one notice."""
    path, _ = int4_checkpoint(TINY_K25)
    assert "text_config" in json.loads((path / "config.json").read_text())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = kimi_jax.load(path, dtype="float32")
    notices = [str(w.message) for w in caught if "vision" in str(w.message)]
    assert len(notices) == 1 and "skipping 2 vision tensor(s)" in notices[0] and "\n" not in notices[0]
    assert not [w for w in caught if "unexpected" in str(w.message)]  # inv_freq ignored silently
    want = hf_logits(hf_model_from_tensors(checkpoint_tensors(path), TINY_K25), TOKENS)
    assert rel(model.logits(TOKENS), want) <= 1e-4


def _rewrite(src, dst, name: str, value) -> None:
    """Copy a checkpoint, replacing (or, for None, dropping) one tensor."""
    shutil.copytree(src, dst)
    index = json.loads((dst / INDEX_FILENAME).read_text())
    shard = index["weight_map"][name]
    with SafetensorsFile(dst / shard) as f:
        tensors = {n: np.asarray(f.get(n)) for n in f.keys()}
    if value is None:
        del tensors[name], index["weight_map"][name]
        (dst / INDEX_FILENAME).write_text(json.dumps(index))
    else:
        tensors[name] = value
    save_file(tensors, dst / shard, metadata={"format": "pt"})


EXPERT = "model.layers.1.mlp.experts.3.gate_proj.weight"


@pytest.mark.parametrize("dtype", [np.int32, np.int16, np.uint8])
def test_weight_shape_of_any_integer_dtype(thinking, tmp_path, dtype):
    path, _, want = thinking
    _rewrite(path, tmp_path / "ckpt", EXPERT + "_shape", np.array([CFG.moe_intermediate_size, CFG.hidden_size], dtype))
    assert rel(kimi_jax.load(tmp_path / "ckpt", dtype="float32").logits(TOKENS), want) <= 1e-4


@pytest.mark.parametrize("suffix,value,match", [
    ("_shape", np.array([96, 168], np.int64), r"experts\.3\.gate_proj\.weight_shape' says the weight is \[96, 168\]"),
    ("_shape", np.array([96.0, 160.0], np.float32), r"weight_shape is the weight's \[out, in\] as 2 integers"),
    ("_packed", np.zeros((96, 20), np.uint32), r"weight_packed' has dtype uint32, expected int32"),
    ("_scale", np.ones((96, 5), np.float32), r"weight_scale' has dtype float32, expected bfloat16"),
    ("_packed", np.zeros((96, 21), np.int32), r"weight_packed' has shape \[96, 21\] but the config implies \[96, 20\]"),
    ("_scale", None, r"not in the checkpoint, e\.g\. \['model\.layers\.1\.mlp\.experts\.3\.gate_proj\.weight_scale'\]"),
])
def test_damaged_int4_tensors_are_named(thinking, tmp_path, suffix, value, match):
    path, _, _ = thinking
    _rewrite(path, tmp_path / "ckpt", EXPERT + suffix, value)
    with pytest.raises(CheckpointError, match=match):
        kimi_jax.load(tmp_path / "ckpt")
