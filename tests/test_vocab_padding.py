"""A vocabulary the mesh's `tensor` axis does not divide (fine-tuned checkpoints add tokens) is padded
for sharding and its padded logits masked: the sharded model equals transformers, from the HF
layout and from orbax, and never emits a padded id."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import kimi_jax
from kimi_jax.checkpoint.convert import convert
from kimi_jax.config import TINY_KIMI

pytestmark = pytest.mark.sharded

ODD = dataclasses.replace(TINY_KIMI, vocab_size=TINY_KIMI.vocab_size + 3, name="tiny-odd-vocab")  # 323: odd
MESH = "expert=4,tensor=2"
TOKENS = np.array([[1, 5, 322, 7, 300, 2, 11, 321]], np.int32)  # ids in the last rows the checkpoint has


@pytest.fixture(scope="module")
def odd(hub_checkpoint):
    return hub_checkpoint(ODD)


def test_sharded_logits_equal_transformers_and_unsharded(odd):
    import torch

    from kimi_jax.bench.oracle import hf_model

    path, params = odd
    sharded = kimi_jax.load(path, dtype="float32", mesh=MESH)
    assert sharded.config.vocab_size == ODD.vocab_size and sharded.config.padded_vocab_size == 324
    assert sharded.params["lm_head"].shape[0] == 324
    got = sharded.logits(TOKENS)
    assert got.shape == (1, TOKENS.shape[1], ODD.vocab_size)
    want = hf_model(params, ODD).eval()(torch.tensor(TOKENS, dtype=torch.long)).logits.detach().numpy()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got, kimi_jax.load(path, dtype="float32").logits(TOKENS), rtol=1e-5, atol=1e-5)


def test_greedy_tokens_equal_transformers_and_never_padded(odd, tmp_path):
    import torch

    from kimi_jax.bench.oracle import hf_model

    path, params = odd
    prompt = [1, 5, 322, 7]
    want = hf_model(params, ODD).generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                          pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    restored = kimi_jax.load(convert(path, tmp_path / "orbax", progress=False), dtype="float32", mesh=MESH)
    for model in (kimi_jax.load(path, dtype="float32", mesh=MESH), restored):
        assert model.generate([prompt], max_new_tokens=8, temperature=0)[0] == want[0, len(prompt):].tolist()
        sampled = model.generate([prompt] * 4, max_new_tokens=16, temperature=2.0, seed=[0, 1, 2, 3])
        assert all(0 <= t < ODD.vocab_size for row in sampled for t in row)


def test_model_from_params_pads_them(odd):
    from kimi_jax.runtime.engine import Model

    path, params = odd
    on_mesh = Model(ODD, params, dtype="float32", mesh=MESH)
    np.testing.assert_allclose(on_mesh.logits(TOKENS), Model(ODD, params, dtype="float32").logits(TOKENS),
                               rtol=1e-5, atol=1e-5)
