"""fp8 decoding from CPU byte storage, streamed products (kernels/streamed.py), and when they stream."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kimi_jax import kernels
from kimi_jax.kernels.streamed import STREAM_MAX_ROWS, streamed_linear, streams
from kimi_jax.model.quant import QArray, dequantize, fp8_to_float32, linear, quantize_block_fp8

pytestmark = pytest.mark.unit


def test_fp8_bytes_decode_exactly_on_all_256_codes():
    codes = np.arange(256, dtype=np.uint8)
    want = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    got = np.asarray(jax.jit(fp8_to_float32)(jnp.asarray(codes)))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))  # 0x7F and 0xFF
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got[finite], want[finite])  # subnormals, ±448, both zeros
    np.testing.assert_array_equal(np.signbit(got[finite]), np.signbit(want[finite]))


def test_dequantize_same_from_either_storage():
    values, scales = quantize_block_fp8(np.random.default_rng(1).standard_normal((130, 257)).astype(np.float32))
    as_fp8 = dequantize(QArray(jnp.asarray(values), jnp.asarray(scales)))
    as_bytes = dequantize(QArray(jnp.asarray(values.view(np.uint8)), jnp.asarray(scales)))
    np.testing.assert_array_equal(np.asarray(as_bytes), np.asarray(as_fp8))


def quantized(shape, seed=0, block=(128, 128), storage=np.uint8):
    values, scales = quantize_block_fp8(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), block)
    return QArray(jnp.asarray(values.view(storage)), jnp.asarray(scales))


@pytest.mark.parametrize("rows", [(1,), (3, 2)])
@pytest.mark.parametrize("case", ["fp8 in slices", "fp8 one slice", "ragged fp8 falls back", "bf16 in slices"])
def test_streamed_linear_equals_linear_in_float32(rows, case):
    rng = np.random.default_rng(2)
    if case == "bf16 in slices":
        w = jnp.asarray(rng.standard_normal((1024, 96)), jnp.bfloat16)
    elif case == "ragged fp8 falls back":
        w = quantized((200, 136))
    else:
        w = quantized((1024, 256), block=(64, 64))
    x = jnp.asarray(rng.standard_normal((*rows, w.shape[1])), jnp.float32)
    slice_bytes = 1 << 20 if case == "fp8 one slice" else 16 << 10  # 16 KiB: 8 slices of the fp8 weight
    got = jax.jit(lambda x, w: streamed_linear(x, w, slice_bytes=slice_bytes))(x, w)
    want = linear(x, w, jnp.float32)
    assert got.shape == (*rows, w.shape[0]) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_streamed_linear_rounds_once_to_the_compute_dtype():
    w = quantized((512, 128), block=(64, 64))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 128)), jnp.bfloat16)
    got = streamed_linear(x, w, slice_bytes=8 << 10)
    want = linear(x.astype(jnp.float32), w, jnp.float32).astype(jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)


def test_single_cpu_device_streams_decode_products_only():
    d = 64
    assert streams(jnp.zeros((1, 1, d)))  # batch-1 decode
    assert streams(jnp.zeros((STREAM_MAX_ROWS, 1, d)))
    assert not streams(jnp.zeros((1, 512, d)))  # prefill
    w = quantized((1024, d), block=(64, 64))
    for rows in ((1, 1), (1, 512)):  # either regime, the backend's product equals the plain one
        x = jnp.asarray(np.random.default_rng(4).standard_normal((*rows, d)), jnp.float32)
        np.testing.assert_allclose(np.asarray(kernels.choose("cpu").linear(x, w)), np.asarray(linear(x, w)),
                                   rtol=1e-5, atol=1e-5)


def test_a_mesh_never_streams():
    """On several devices the dense products are the plain ones: slicing a sharded weight would gather it."""
    from kimi_jax.model import quant

    assert kernels.choose("cpu", devices=8).linear is quant.linear
    assert kernels.choose("cpu", devices=8).logits is quant.logits
