"""The one-pass latent attention kernel against the reference, in Pallas interpret mode on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax import kernels
from kimi_jax.kernels import latent_attention as kernel
from kimi_jax.model import latent_attention as reference

pytestmark = pytest.mark.unit


def _inputs(keys: int, stacked: bool, t: int = 2, seed: int = 0):
    """Queries [B, T, H, ·], a cache [(L,) B, S, ·] and a decode-style mask with a padded query."""
    b, h, c, r, layers = 2, 4, 32, 16, 3
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    lead = (layers,) if stacked else ()
    q_lat = jax.random.normal(k[0], (b, t, h, c), jnp.bfloat16)
    q_rope = jax.random.normal(k[1], (b, t, h, r), jnp.bfloat16)
    latent = jax.random.normal(k[2], (*lead, b, keys, c), jnp.bfloat16)
    k_rope = jax.random.normal(k[3], (*lead, b, keys, r), jnp.bfloat16)
    pos = jnp.array([[keys // 2, keys // 2 + 1], [-1, keys - 1]])[:, :t]  # row 1, query 0: padding
    mask = (jnp.arange(keys)[None, None] <= pos[:, :, None]) & (pos[:, :, None] >= 0)
    return q_lat, q_rope, latent, k_rope, mask, (jnp.array(1) if stacked else None)


@pytest.mark.parametrize("keys,stacked", [(256, True), (1536, False), (384, True)])
def test_kernel_matches_reference(keys, stacked):
    """Several cache blocks (the online softmax across them), a stacked and a single-layer cache, a
    fully masked (padded) query."""
    args = _inputs(keys, stacked)
    got = kernel.attend(*args, scale=0.125, interpret=True)
    want = reference.attend(*args, scale=0.125)
    np.testing.assert_allclose(np.asarray(got.top), np.asarray(want.top), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got.total), np.asarray(want.total), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(got.acc), np.asarray(want.acc), rtol=2e-2, atol=2e-2)
    own_keys = reference.attend(*args[:2], *_inputs(16, False, seed=1)[2:5], scale=0.125)  # a second segment
    merged = [reference.combine([p, own_keys]) for p in (got, want)]
    np.testing.assert_allclose(np.asarray(merged[0]), np.asarray(merged[1]), rtol=2e-2, atol=2e-2)


def test_short_or_untileable_segments_use_the_reference():
    """This call's own keys (a few), and a length no block divides, take the reference path."""
    for keys in (4, 200):
        args = _inputs(keys, False)
        got, want = kernel.attend(*args, scale=0.5), reference.attend(*args, scale=0.5)
        np.testing.assert_array_equal(np.asarray(got.acc), np.asarray(want.acc))
    assert kernel.block_size(8192) == 1024 and kernel.block_size(384) == 128 and kernel.block_size(200) is None


def test_policy_picks_the_kernel_on_tpu_only():
    assert kernels.choose("tpu").latent_attention is kernel.attend
    for platform in ("cpu", "gpu"):
        assert kernels.choose(platform).latent_attention is reference.attend
    assert "one-pass latent attention" in kernels.choose("tpu").describe()
