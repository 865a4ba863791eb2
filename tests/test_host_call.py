"""runtime/host_call.py: a host function inside a compiled loop (the decode loop's grammar masks).

Both implementations (the primitive and its io_callback fallback) must behave alike: called once per
loop iteration with numpy operands, on the whole (global) operand on a mesh, its result used by the
program; a result of the wrong shape is an error that names the function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kimi_jax.runtime.host_call import host_call, via_io_callback

pytestmark = pytest.mark.unit

CALLS = [host_call, via_io_callback]


def _loop(call, fn, x, steps: int):
    """steps iterations of x <- x + fn(x) (on the host) * 2, all in one compiled while loop."""
    def body(carry):
        i, x = carry
        return i + 1, x + 2 * call(fn, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
    return jax.lax.while_loop(lambda c: c[0] < steps, body, (0, x))[1]


@pytest.mark.parametrize("call", CALLS, ids=["primitive", "io_callback"])
def test_called_once_per_iteration_with_numpy_operands(call):
    seen = []

    def fn(x):
        seen.append((type(x), x.copy()))
        return (x % 7).astype(np.int32)

    x0 = np.arange(12, dtype=np.int32).reshape(3, 4)
    out = jax.jit(lambda x: _loop(call, fn, x, 5))(x0)
    expected, operands = x0.copy(), []
    for _ in range(5):
        operands.append(expected.copy())
        expected = expected + 2 * (expected % 7)
    np.testing.assert_array_equal(np.asarray(out), expected)
    assert [t for t, _ in seen] == [np.ndarray] * 5
    for (_, got), want in zip(seen, operands):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("call", CALLS, ids=["primitive", "io_callback"])
def test_on_a_mesh_the_function_sees_the_whole_operand_once(call):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("data",))
    x0 = jax.device_put(jnp.arange(16, dtype=jnp.int32), NamedSharding(mesh, PartitionSpec("data")))
    shapes = []

    def fn(x):
        shapes.append(x.shape)
        return x[::-1].copy()

    out = jax.jit(lambda x: _loop(call, fn, x, 3))(x0)
    expected = np.arange(16, dtype=np.int32)
    for _ in range(3):
        expected = expected + 2 * expected[::-1]
    np.testing.assert_array_equal(np.asarray(out), expected)
    assert shapes == [(16,)] * 3


def test_a_result_of_the_wrong_shape_names_the_function():
    def bad_masks(x):
        return np.zeros((2,), np.int32)

    with pytest.raises(Exception, match=r"bad_masks returned int32\[2\], expected int32\[3\]"):
        jax.block_until_ready(jax.jit(lambda x: _loop(host_call, bad_masks, x, 1))(np.zeros(3, np.int32)))
