"""A host function called from inside a compiled program, handed the operands as numpy arrays.

`jax.experimental.io_callback` lowers to XLA's host callback and then, on every call, copies each
operand into a new CPU `jax.Array` (`device_put`) before the Python function sees it. Inside a decode
loop that copy is most of what a callback costs: with the embedded model's 16-row decode step (about
2.5 ms on this 2-core VM) a callback returning a constant mask added 1.0–1.4 ms a step through
`io_callback` and 0.45 ms through this primitive (BENCHMARKS.md, "Constrained decoding").

`host_call` lowers to the same host callback (same placement on a mesh: the program's first device,
as an unordered `io_callback`), but calls the function with the numpy views XLA gives it. It uses
`jax._src.callback`'s lowering helpers, which are internal: the project pins jax < 0.11, and where a
jax release lacks them `host_call` is `via_io_callback` (the function then gets numpy copies of jax
arrays; tests/test_host_call.py runs both).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import io_callback

try:
    from jax._src import callback as _jax_callback
    from jax.extend.core import Primitive
    from jax.interpreters import mlir

    _EFFECT = _jax_callback._IOEffect  # an unordered IO effect: kept inside loops, never hoisted or dropped
    _emit, _placement = _jax_callback.emit_python_callback, _jax_callback._callback_op_sharding
except (ImportError, AttributeError):  # a jax without these internals: io_callback
    _EFFECT = None


def host_call(fn: Callable[..., np.ndarray], result: jax.ShapeDtypeStruct, *args: jax.Array) -> jax.Array:
    """Call fn(*numpy operands) -> numpy array of `result`'s shape and dtype, on the host, from traced code.
    Unordered, like `io_callback(..., ordered=False)`: inside a loop it runs once per iteration, when its
    operands are ready. The operands may be XLA's own buffers: copy what fn keeps after it returns."""
    if _EFFECT is None:
        return via_io_callback(fn, result, *args)
    return _host_call_p.bind(*args, fn=fn, result=jax.core.ShapedArray(result.shape, result.dtype))


def via_io_callback(fn: Callable[..., np.ndarray], result: jax.ShapeDtypeStruct, *args: jax.Array) -> jax.Array:
    """`host_call` through the public `io_callback` (slower: a device_put of every operand per call)."""
    return io_callback(lambda *a: fn(*map(np.asarray, a)), result, *args, ordered=False)


if _EFFECT is not None:
    _host_call_p = Primitive("kimi_host_call")

    @_host_call_p.def_effectful_abstract_eval
    def _abstract(*avals, fn, result):
        return result, {_EFFECT}

    def _lower(ctx, *args, fn, result):
        def call(*arrays):  # XLA's numpy views of the operands -> (the result,)
            out = np.asarray(fn(*arrays))
            if out.shape != result.shape or out.dtype != result.dtype:
                raise TypeError(f"host_call: {getattr(fn, '__name__', fn)} returned {out.dtype}{list(out.shape)}, "
                                f"expected {result.dtype}{list(result.shape)}")
            return (out,)

        sharding = _placement(ctx.module_context.axis_context, None, ctx.avals_out)
        outs, _, _ = _emit(ctx, call, None, list(args), ctx.avals_in, ctx.avals_out, has_side_effect=True,
                           returns_token=False, sharding=sharding)
        return outs

    mlir.register_lowering(_host_call_p, _lower, cacheable=False)
