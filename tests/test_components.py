"""Component numerics against transformers' DeepseekV3 modules (the oracle): norm, rotary, MLA, router, MoE, fp8."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

from kimi_jax import kernels
from kimi_jax.bench.oracle import hf_config, hf_state_dict
from kimi_jax.config import KIMI_K2, TINY_DEEPSEEK, TINY_KIMI
from kimi_jax.model.attention import MLA, HeadWeights
from kimi_jax.model.layers import apply_rope, rms_norm, rope_angles, rope_attention_factor, rope_inv_freq, softmax_scale
from kimi_jax.model.layout import UNSHARDED
from kimi_jax.model.moe import MoE, route
from kimi_jax.model.quant import QArray, dequantize, quantize_block_fp8
from kimi_jax.model.weights import random_params

pytestmark = pytest.mark.parity

CONFIGS = [TINY_KIMI, TINY_DEEPSEEK]
# Blocks that tile the heads (nope, v and kv_lora multiples of the block, as in the releases): the
# absorbed products then scale the activations instead of dequantizing kv_b_proj (HeadWeights).
TILED_HEADS = dataclasses.replace(TINY_KIMI, weight_block_size=(8, 8), qk_nope_head_dim=24, v_head_dim=16,
                                  kv_lora_rank=40, name="tiny-kimi-8x8-blocks")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def t(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, np.float32))


def layer_params(params, group: str, index: int):
    """One layer's slice of a stacked group, as the module sees it inside the scan."""
    return jax.tree.map(lambda a: a[index], params[group])


def hf_layer(cfg, params, layer: int):
    """transformers' decoder layer `layer` holding the engine's (dequantized) weights, float32."""
    hcfg = hf_config(cfg)
    module = hf.DeepseekV3DecoderLayer(hcfg, layer).float().eval()
    prefix = f"model.layers.{layer}."
    state = {k[len(prefix):]: v for k, v in hf_state_dict(params, cfg).items() if k.startswith(prefix)}
    module.load_state_dict(state, strict=True)
    return hcfg, module


def test_rms_norm_matches_transformers():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 5, 200)).astype(np.float32), rng.standard_normal(200).astype(np.float32)
    ref = hf.DeepseekV3RMSNorm(200, eps=1e-6)
    ref.weight.data = t(w)
    assert rel(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6), ref(t(x)).detach().numpy()) < 1e-6


@pytest.mark.parametrize("cfg", [TINY_KIMI, TINY_DEEPSEEK, KIMI_K2], ids=lambda c: c.name)
def test_yarn_frequencies_match_transformers(cfg):
    rotary = hf.DeepseekV3RotaryEmbedding(hf_config(cfg))
    np.testing.assert_allclose(rope_inv_freq(cfg), rotary.inv_freq.numpy(), rtol=1e-6)
    assert rope_attention_factor(cfg) == pytest.approx(rotary.attention_scaling)


def test_kimi_softmax_scale_uses_mscale_squared():
    mscale = 0.1 * np.log(32.0) + 1.0
    assert mscale == pytest.approx(1.3466, abs=1e-4)
    assert softmax_scale(KIMI_K2) == pytest.approx(192 ** -0.5 * mscale**2)


def test_interleaved_rotary_matches_transformers():
    cfg = TINY_KIMI
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 7, 4, cfg.qk_rope_head_dim)).astype(np.float32)  # (B, T, H, R)
    k = rng.standard_normal((2, 7, cfg.qk_rope_head_dim)).astype(np.float32)
    pos = np.array([np.arange(7), np.arange(100, 107)])
    rotary = hf.DeepseekV3RotaryEmbedding(hf_config(cfg))
    cos, sin = rotary(t(q), torch.from_numpy(pos))
    q_ref, k_ref = hf.apply_rotary_pos_emb_interleave(t(q).transpose(1, 2), t(k)[:, None], cos, sin)
    c, s = rope_angles(cfg, jnp.asarray(pos))
    assert rel(apply_rope(jnp.asarray(q), c, s), q_ref.transpose(1, 2).numpy()) < 1e-6
    assert rel(apply_rope(jnp.asarray(k), c, s), k_ref[:, 0].numpy()) < 1e-6
    # A plain half-rotation of the raw (interleaved) rows is a different function: the layout matters.
    half = torch.cat([t(q)[..., :8] * cos[:, :, None, :8] - t(q)[..., 8:] * sin[:, :, None, :8],
                      t(q)[..., 8:] * cos[:, :, None, :8] + t(q)[..., :8] * sin[:, :, None, :8]], -1)
    assert rel(apply_rope(jnp.asarray(q), c, s), half.numpy()) > 1e-2


@pytest.mark.parametrize("cfg", [*CONFIGS, TILED_HEADS], ids=lambda c: c.name)
def test_mla_matches_transformers(cfg):
    params = random_params(cfg, seed=2, std=0.05)
    layer = 0
    hcfg, ref = hf_layer(cfg, params, layer)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 9, cfg.hidden_size)).astype(np.float32)
    pos = np.broadcast_to(np.arange(9), (2, 9))
    rotary = hf.DeepseekV3RotaryEmbedding(hcfg)
    mask = torch.full((9, 9), -torch.inf).triu(1)[None, None]
    with torch.no_grad():
        want, _ = ref.self_attn(t(x), rotary(t(x), torch.from_numpy(pos.copy())), mask)
    p = layer_params(params, "dense_layers", layer)["attn"]
    got, _ = MLA(cfg).apply({"params": p}, jnp.asarray(x), jnp.asarray(pos))
    assert rel(got, want.numpy()) < 1e-5
    absorbed, _ = MLA(cfg, absorb=True).apply({"params": p}, jnp.asarray(x), jnp.asarray(pos))
    assert rel(absorbed, want.numpy()) < 1e-5
    tiled = HeadWeights(jax.tree.map(jnp.asarray, p["kv_b_proj"]), cfg, UNSHARDED)._tiled() is not None
    assert tiled == (cfg is TILED_HEADS)  # the scaled products ran where the blocks tile the heads


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_router_matches_transformers(cfg):
    params = random_params(cfg, seed=4, std=0.05)
    layer = cfg.first_k_dense_replace
    _, ref = hf_layer(cfg, params, layer)
    p = layer_params(params, "moe_layers", 0)["ffn"]
    x = np.random.default_rng(5).standard_normal((64, cfg.hidden_size)).astype(np.float32)
    with torch.no_grad():
        _, w_ref, i_ref = ref.mlp.gate(t(x))
    w, idx = route(jnp.asarray(x), jnp.asarray(p["router"]), jnp.asarray(p["router_bias"]), cfg)
    # Same expert sets and the same weight per expert (top_k order is not part of the contract).
    order, order_ref = np.argsort(np.asarray(idx), -1), np.argsort(i_ref.numpy(), -1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), order, -1),
                                  np.take_along_axis(i_ref.numpy(), order_ref, -1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, -1),
                               np.take_along_axis(w_ref.numpy(), order_ref, -1), rtol=1e-5)


def test_grouped_router_restricts_to_top_groups():
    """n_group > 1: every chosen expert lies in one of the `topk_group` best groups."""
    cfg = TINY_DEEPSEEK
    rng = np.random.default_rng(6)
    x = rng.standard_normal((128, cfg.hidden_size)).astype(np.float32)
    w_router = rng.standard_normal((cfg.n_routed_experts, cfg.hidden_size)).astype(np.float32) * 0.1
    bias = rng.standard_normal(cfg.n_routed_experts).astype(np.float32)
    weights, idx = route(jnp.asarray(x), jnp.asarray(w_router), jnp.asarray(bias), cfg)
    size = cfg.n_routed_experts // cfg.n_group
    biased = 1 / (1 + np.exp(-x @ w_router.T)) + bias
    group_score = np.sort(biased.reshape(128, cfg.n_group, size), -1)[..., -2:].sum(-1)
    best = np.argsort(-group_score, -1)[:, :cfg.topk_group]
    for n in range(128):
        assert set(np.asarray(idx[n]) // size) <= set(best[n])
    # Weights are the unbiased scores, normalised, times the scaling factor.
    np.testing.assert_allclose(np.asarray(weights).sum(-1), cfg.routed_scaling_factor, rtol=1e-5)


@pytest.mark.parametrize("experts", ["grouped", "ragged", "reference"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_moe_block_matches_transformers(cfg, experts):
    params = random_params(cfg, seed=7, std=0.05)
    layer = cfg.first_k_dense_replace
    _, ref = hf_layer(cfg, params, layer)
    x = np.random.default_rng(8).standard_normal((2, 13, cfg.hidden_size)).astype(np.float32)
    with torch.no_grad():
        want = ref.mlp(t(x)).numpy()
    p = layer_params(params, "moe_layers", 0)["ffn"]
    got = MoE(cfg, backend=kernels.choose("cpu", experts=experts)).apply({"params": p}, jnp.asarray(x))
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("shape", [(576, 7168 // 16), (200, 136), (130, 257), (3, 16, 300)])
def test_fp8_dequant_matches_torch(shape):
    """Our dequantization equals torch's float8_e4m3fn conversion times the block scales (ragged edges too)."""
    w = np.random.default_rng(9).standard_normal(shape).astype(np.float32) * 0.02
    values, scales = quantize_block_fp8(w)
    assert values.dtype == ml_dtypes.float8_e4m3fn and scales.dtype == np.float32
    assert scales.shape[-2:] == (-(-shape[-2] // 128), -(-shape[-1] // 128))
    tv = torch.from_numpy(values.view(np.uint8).copy()).view(torch.float8_e4m3fn).float()
    ts = torch.from_numpy(scales).repeat_interleave(128, -2)[..., :shape[-2], :].repeat_interleave(128, -1)
    want = (tv * ts[..., :shape[-1]]).numpy()
    np.testing.assert_array_equal(np.asarray(dequantize(QArray(jnp.asarray(values), jnp.asarray(scales)))), want)
    np.testing.assert_array_equal(dequantize(QArray(values, scales), np.float32), want)  # host arrays: numpy
    # e4m3 keeps 3 mantissa bits: each value within 2^-4 relative of the original (plus subnormal slack).
    assert np.all(np.abs(want - w) <= np.abs(w) * 2**-4 + scales.max() * 2**-9)


def test_quantizer_uses_amax_over_448():
    w = np.zeros((256, 128), np.float32)
    w[0, 0], w[200, 5] = 3.5, -0.7
    values, scales = quantize_block_fp8(w)
    np.testing.assert_allclose(scales[:, 0], [3.5 / 448, 0.7 / 448], rtol=1e-7)
    assert float(values[0, 0]) == 448.0 and float(values[200, 5]) == -448.0
    zero_values, zero_scales = quantize_block_fp8(np.zeros((10, 10), np.float32))
    assert zero_scales.item() == 1.0 and not np.any(zero_values.astype(np.float32))


def test_dequant_is_exact_in_bf16_compute():
    """bf16 compute dequantizes in float32 and rounds once, as the reference does."""
    w = np.random.default_rng(10).standard_normal((130, 200)).astype(np.float32)
    values, scales = quantize_block_fp8(w)
    got = np.asarray(dequantize(QArray(jnp.asarray(values), jnp.asarray(scales)), jnp.bfloat16))
    np.testing.assert_array_equal(got, dequantize(QArray(values, scales), np.float32).astype(ml_dtypes.bfloat16))


def test_config_variants_are_distinct():
    # Guards against a preset silently aliasing another (the parity matrix relies on both).
    assert TINY_DEEPSEEK.n_group > 1 and TINY_DEEPSEEK.first_k_dense_replace > 1
    assert TINY_KIMI.hidden_size % 128 and TINY_DEEPSEEK.hidden_size % 128
    assert dataclasses.replace(TINY_KIMI) == TINY_KIMI
