"""256K context (Kimi-K2-Instruct-0905, Kimi-K2-Thinking): the 0905 rope loads, matches transformers at
positions near 262144, generates, and plans a 262144-token cache."""

import dataclasses

import numpy as np
import pytest

import kimi_jax
from kimi_jax.bench.oracle import hf_config, hf_model
from kimi_jax.config import KIMI_K2_0905, TINY_KIMI
from kimi_jax.model.layers import rope_attention_factor, rope_inv_freq
from kimi_jax.runtime.plan import plan

pytestmark = pytest.mark.parity

# TINY_KIMI with the 0905 release's rope: YaRN factor 64 over 4096 original positions = 262144.
TINY_256K = dataclasses.replace(TINY_KIMI, max_position_embeddings=262144, name="tiny-kimi-256k",
                                rope_scaling=KIMI_K2_0905.rope_scaling)
PROMPTS = [[5, 17, 99, 3], [250, 8, 41, 77, 12, 9]]


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


@pytest.mark.parametrize("cfg", [KIMI_K2_0905, TINY_256K], ids=lambda c: c.name)
def test_yarn_factor_64_matches_transformers(cfg):
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    rotary = hf.DeepseekV3RotaryEmbedding(hf_config(cfg))
    np.testing.assert_allclose(rope_inv_freq(cfg), rotary.inv_freq.numpy(), rtol=1e-6)
    assert rope_attention_factor(cfg) == pytest.approx(rotary.attention_scaling)


@pytest.fixture(scope="module")
def case(hub_checkpoint):
    path, params = hub_checkpoint(TINY_256K)
    return kimi_jax.load(path, dtype="float32"), hf_model(params, TINY_256K)


def test_logits_near_the_end_of_the_context_match_transformers(case):
    """Positions 262120..262143 (past Kimi-K2's 131072): the rotary angles are where a 128K model never went."""
    import torch

    model, oracle = case
    tokens = np.random.default_rng(0).integers(0, TINY_256K.vocab_size, (2, 24)).astype(np.int32)
    positions = np.broadcast_to(np.arange(262144 - 24, 262144, dtype=np.int32), tokens.shape)
    got = np.asarray(model._forward(model.params, tokens, positions))
    with torch.no_grad():
        want = oracle(torch.from_numpy(tokens.astype(np.int64)),
                      position_ids=torch.from_numpy(positions.astype(np.int64))).logits.numpy()
    assert rel(got, want) <= 1e-4
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_generates_like_transformers(case):
    import torch

    model, oracle = case
    assert model.config.max_position_embeddings == 262144
    for prompt, got in zip(PROMPTS, model.generate(PROMPTS, max_new_tokens=6, temperature=0)):
        want = oracle.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                               pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert got == want[0, len(prompt):].tolist()


def test_plans_a_262144_token_cache():
    p = plan(TINY_256K, "expert=4,tensor=2", batch=2, context=262144)
    layers, width = TINY_256K.num_hidden_layers, TINY_256K.kv_cache_width
    assert p.context == 262144 and p.kv_cache == layers * 2 * 262144 * width * 2  # bf16 latent, batch unsplit
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=262144"):
        plan(TINY_256K, "expert=4,tensor=2", batch=2, context=262145)
