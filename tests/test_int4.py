"""The INT4 kind of QArray against compressed-tensors (packing, dequantization), and every kernel that
reads quantized weights (grouped, ragged, streamed, the loop reference) on INT4 weights."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kimi_jax import kernels
from kimi_jax.kernels import streamed
from kimi_jax.model.experts import reference_experts
from kimi_jax.model.layers import swiglu
from kimi_jax.model.quant import (
    INT4,
    QArray,
    dequantize,
    linear,
    pack_int4,
    quantize_int4,
    unpack_int4,
)

pytestmark = pytest.mark.unit

E, D, I, K = 12, 64, 40, 3  # I = 40: a ragged last group of 8 (not from compressed-tensors: ours)


def test_packing_is_compressed_tensors_packing():
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, (7, 96)).astype(np.int8)
    q[0, :16] = np.arange(-8, 8)  # every nibble, the sign bit of a word included
    theirs = pack_to_int32(torch.from_numpy(q), 4).numpy()
    np.testing.assert_array_equal(pack_int4(q), theirs)
    np.testing.assert_array_equal(np.asarray(pack_int4(jnp.asarray(q))), theirs)
    np.testing.assert_array_equal(unpack_int4(theirs), q)
    np.testing.assert_array_equal(np.asarray(unpack_int4(jnp.asarray(theirs))), q)
    assert (unpack_from_int32(torch.from_numpy(pack_int4(q)), 4, torch.Size(q.shape)).numpy() == q).all()


def test_dequantize_equals_compressed_tensors_in_float32():
    """Our dequantization (numpy and in-graph) equals compressed-tensors' on its own quantized weight."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
    from int4_util import ct_quantize, ct_scheme

    w = np.random.default_rng(1).standard_normal((48, 160)).astype(np.float32)
    packed, scale = ct_quantize(w, 32)
    want = ct_dequantize(unpack_from_int32(torch.from_numpy(packed), 4, torch.Size(w.shape)),
                         torch.from_numpy(scale.astype(np.float32)), args=ct_scheme(32).weights,
                         dtype=torch.float32).numpy()
    q = QArray(packed, scale, INT4)
    assert q.shape == (48, 160) and q.block == (1, 32) and scale.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(dequantize(q), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(jax.tree.map(jnp.asarray, q))), want)
    assert np.abs(want - w).max() <= np.abs(w).max() / 7  # a real quantization, not a copy


def test_ragged_groups_and_per_column_scales():
    """A last group shorter than 32, and scales expanded to one per column (what a sharded copy holds)."""
    w = np.random.default_rng(2).standard_normal((3, 5, 40)).astype(np.float32)
    values, scales = quantize_int4(w)
    assert values.shape == (3, 5, 5) and scales.shape == (3, 5, 2)
    q = QArray(values, scales, INT4)
    want = unpack_int4(values) * np.repeat(scales.astype(np.float32), 32, axis=-1)[..., :40]
    np.testing.assert_array_equal(dequantize(q), want)
    per_column = QArray(values, np.repeat(scales, 32, axis=-1)[..., :40], INT4)
    assert per_column.block == (1, 1)
    np.testing.assert_array_equal(dequantize(per_column), want)
    assert np.abs(want - w).max() <= np.abs(w).max() / 7


def test_kind_survives_jit_slicing_and_tree_maps():
    q = QArray(*quantize_int4(np.ones((2, 8, 16), np.float32)), INT4)
    assert q[1].kind == INT4 and q[1].shape == (8, 16)
    assert jax.tree.map(lambda a: a, q).kind == INT4
    assert jax.jit(lambda w: w)(q).kind == INT4
    assert jax.tree.structure(q) != jax.tree.structure(QArray(q.values, q.scales))  # kinds do not mix


def int4_experts(seed: int):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    gate, up = (QArray(*quantize_int4(0.2 * jax.random.normal(k, (E, I, D))), INT4) for k in keys[:2])
    down = QArray(*quantize_int4(0.2 * jax.random.normal(keys[2], (E, D, I))), INT4)
    return gate, up, down


def test_loop_reference_equals_dense_dequantized_experts():
    """The loop reference on INT4 QArrays is the plain SwiGLU on the dequantized matrices."""
    rng = np.random.default_rng(3)
    gate, up, down = int4_experts(3)
    x = jnp.asarray(rng.standard_normal((6, D)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(6)]), jnp.int32)
    weights = jnp.asarray(rng.random((6, K)), jnp.float32)
    dense = [dequantize(w) for w in (gate, up, down)]
    want = sum(weights[:, k, None] * jnp.stack([swiglu(x[n], *(w[idx[n, k]] for w in dense)) for n in range(6)])
               for k in range(K))
    np.testing.assert_allclose(reference_experts(x, weights, idx, gate, up, down), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kernel", ["grouped", "ragged"])
@pytest.mark.parametrize("n", [1, 5, 64])
def test_kernels_equal_loop_reference_on_int4(kernel, n):
    rng = np.random.default_rng(n)
    gate, up, down = int4_experts(n)
    x = jnp.asarray(rng.standard_normal((n, D)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(n)]), jnp.int32)
    weights = jnp.asarray(rng.random((n, K)), jnp.float32)
    got = jax.jit(kernels.EXPERT_KERNELS[kernel])(x, weights, idx, gate, up, down)
    np.testing.assert_allclose(got, reference_experts(x, weights, idx, gate, up, down), rtol=2e-5, atol=2e-5)


def test_grouped_kernel_with_a_local_expert_range():
    """Expert parallelism: the kernel holds experts [4, 8) of 12; assignments elsewhere add nothing."""
    rng = np.random.default_rng(5)
    gate, up, down = int4_experts(5)
    local = [w[4:8] for w in (gate, up, down)]
    x = jnp.asarray(rng.standard_normal((9, D)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(9)]), jnp.int32)
    weights = jnp.asarray(rng.random((9, K)), jnp.float32)
    got = kernels.GROUPED(x, weights, idx, *local, first_expert=4)
    np.testing.assert_allclose(got, reference_experts(x, weights, idx, *local, first_expert=4), rtol=2e-5, atol=2e-5)


def test_streamed_linear_on_int4():
    """The decode-regime dense product slices INT4 rows (one scale row each) like fp8 blocks."""
    w = QArray(*quantize_int4(0.1 * jax.random.normal(jax.random.PRNGKey(0), (512, 256))), INT4)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 256))
    want = linear(x, w)
    got = jax.jit(lambda x, w: streamed.streamed_linear(x, w, slice_bytes=64 * 256))(x, w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(streamed.linear(x, w), want, rtol=1e-5, atol=1e-5)
