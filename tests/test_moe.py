"""Routed-expert kernels against the simple per-expert loop, including adversarial token distributions,
and the backend policy that picks a kernel per platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax import kernels
from kimi_jax.kernels import grouped
from kimi_jax.kernels.grouped import tile_rows
from kimi_jax.model.experts import reference_experts
from kimi_jax.model.quant import QArray, quantize_block_fp8

pytestmark = pytest.mark.unit

E, D, I, K = 12, 40, 24, 3


def experts(seed: int):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    gate, up = (QArray(*quantize_block_fp8(0.2 * jax.random.normal(k, (E, I, D)), (16, 16))) for k in keys[:2])
    down = QArray(*quantize_block_fp8(0.2 * jax.random.normal(keys[2], (E, D, I)), (16, 16)))
    return gate, up, down


def assignments(kind: str, n: int, rng):
    if kind == "uniform":
        idx = np.stack([rng.choice(E, K, replace=False) for _ in range(n)])
    elif kind == "skewed":  # every token picks expert 0 plus two of experts 1-2: buffers at their worst case
        idx = np.stack([[0, *rng.permutation([1, 2])] for _ in range(n)])
    else:  # "last": only the last experts, so unused tiles pad the front
        idx = np.stack([[E - 1, E - 2, E - 3]] * n)
    return jnp.asarray(idx, jnp.int32), jnp.asarray(rng.random((n, K)), jnp.float32)


@pytest.mark.parametrize("kernel", ["grouped", "indexed", "ragged"])
@pytest.mark.parametrize("kind", ["uniform", "skewed", "last"])
@pytest.mark.parametrize("n", [1, 5, 64])
def test_kernels_equal_loop_reference(kernel, kind, n):
    rng = np.random.default_rng(n)
    gate, up, down = experts(n)
    x = jnp.asarray(rng.standard_normal((n, D)), jnp.float32)
    idx, weights = assignments(kind, n, rng)
    got = jax.jit(kernels.EXPERT_KERNELS[kernel])(x, weights, idx, gate, up, down)
    want = reference_experts(x, weights, idx, gate, up, down)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_plain_weights_work_too():
    rng = np.random.default_rng(0)
    gate, up, down = (jnp.asarray(rng.standard_normal(s), jnp.float32) * 0.2 for s in [(E, I, D), (E, I, D), (E, D, I)])
    x = jnp.asarray(rng.standard_normal((7, D)), jnp.float32)
    idx, weights = assignments("uniform", 7, rng)
    np.testing.assert_allclose(kernels.GROUPED(x, weights, idx, gate, up, down),
                               reference_experts(x, weights, idx, gate, up, down), rtol=2e-5, atol=2e-5)


def test_tile_size_reads_only_chosen_experts_at_decode():
    assert tile_rows(8, 384) == 1  # batch-1 decode: one tile per chosen expert
    assert tile_rows(4096, 384) == 8
    assert isinstance(experts(0)[0], QArray)


def test_backend_choice_per_platform():
    """One policy decides fp8 storage, the expert kernel and dense streaming from the target devices."""
    from kimi_jax.kernels import scaled, streamed
    from kimi_jax.model import quant

    cpu, cpu_mesh, gpu, tpu = (kernels.choose("cpu"), kernels.choose("cpu", 8), kernels.choose("gpu", 8),
                               kernels.choose("tpu", 64))
    assert cpu.experts is cpu_mesh.experts is kernels.GROUPED
    assert gpu.experts is tpu.experts is kernels.INDEXED
    assert cpu.fp8_storage == cpu_mesh.fp8_storage == np.uint8
    assert gpu.fp8_storage == tpu.fp8_storage == np.dtype("float8_e4m3fn")
    assert cpu.linear is streamed.linear and cpu.logits is streamed.logits  # one CPU device: decode streams
    assert cpu_mesh.linear is quant.linear  # a mesh never streams a sharded weight
    assert gpu.linear is tpu.linear is scaled.linear  # block scales on the activations: fp8 read once
    assert kernels.choose("cpu", experts="ragged").experts is kernels.RAGGED  # tests run every kernel on CPU
    assert kernels.for_devices(jax.devices()[:1]) == cpu and kernels.for_devices(jax.devices()) == cpu_mesh
    with pytest.raises(ValueError, match="unknown expert kernel 'dense'"):
        kernels.choose("cpu", experts="dense")
    with pytest.raises(ValueError, match="unknown platform 'metal'"):
        kernels.choose("metal")


def test_grouped_kernel_in_several_chunks(monkeypatch):
    """A tiny chunk budget forces one tile per chunk (the Kimi-K2 case): same result as the loop."""
    monkeypatch.setattr(grouped, "CHUNK_BYTES", 1)
    assert grouped.tile_chunk(40, I * D) == 1
    rng = np.random.default_rng(3)
    gate, up, down = experts(3)
    x = jnp.asarray(rng.standard_normal((33, D)), jnp.float32)
    idx, weights = assignments("uniform", 33, rng)
    np.testing.assert_allclose(kernels.GROUPED(x, weights, idx, gate, up, down),
                               reference_experts(x, weights, idx, gate, up, down), rtol=2e-5, atol=2e-5)


def test_compiled_forward_holds_no_high_precision_copy_of_the_expert_stack():
    """Temp memory of a compiled forward stays a fraction of the fp8 expert bytes (XLA on CPU would
    otherwise materialise the scanned stack in f16, or every tile's weights in f32)."""
    import dataclasses

    from kimi_jax.config import TINY_KIMI
    from kimi_jax.model.decoder import Transformer
    from kimi_jax.model.weights import abstract_params, param_bytes

    cfg = dataclasses.replace(TINY_KIMI, hidden_size=512, moe_intermediate_size=256, n_routed_experts=64,
                              num_hidden_layers=7)
    cpu = kernels.choose("cpu")
    params = abstract_params(cfg, cpu.fp8_storage)
    tokens = jax.ShapeDtypeStruct((1, 64), jnp.int32)
    model = Transformer(cfg, backend=cpu, dtype=jnp.bfloat16)
    compiled = jax.jit(lambda p, t: model.apply({"params": p}, t, t)[0]).lower(params, tokens).compile()
    expert_bytes = param_bytes(params["moe_layers"]["ffn"])
    # An f16 stack would be 2x expert_bytes; every tile dequantized at once about 1.6x here.
    assert compiled.memory_analysis().temp_size_in_bytes < 0.75 * expert_bytes


@pytest.mark.parametrize("n", [1, 5])
def test_grouped_kernel_on_cpu_byte_storage(n):
    """Experts held as raw fp8 bytes (uint8, the CPU storage), with and without gathering the tiles'
    weights before the loop (n=1: 3 tiles of 12 experts, gathered first; n=5: gathered per chunk)."""
    rng = np.random.default_rng(20 + n)
    gate, up, down = (QArray(q.values.view(jnp.uint8), q.scales) for q in experts(n))
    x = jnp.asarray(rng.standard_normal((n, D)), jnp.float32)
    idx, weights = assignments("uniform", n, rng)
    got = jax.jit(kernels.GROUPED)(x, weights, idx, gate, up, down)
    np.testing.assert_allclose(got, reference_experts(x, weights, idx, *experts(n)), rtol=2e-5, atol=2e-5)


def test_compiled_decode_step_copies_no_layer_of_experts():
    """A batch-1 decode step's temp memory is far below one layer's expert stack: the chosen experts'
    weights are gathered from the scanned stack, not read from a copy of the layer (which XLA makes
    when the gather sits inside the kernel's loop: measured 45% of a CPU decode step)."""
    import dataclasses

    from kimi_jax.config import TINY_KIMI
    from kimi_jax.model.decoder import Transformer, init_cache
    from kimi_jax.model.weights import abstract_params, param_bytes

    cfg = dataclasses.replace(TINY_KIMI, hidden_size=512, moe_intermediate_size=256, n_routed_experts=64,
                              num_hidden_layers=4)
    cpu = kernels.choose("cpu")
    params = abstract_params(cfg, cpu.fp8_storage)
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, 32))
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    model = Transformer(cfg, absorb=True, backend=cpu, dtype=jnp.bfloat16)
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, t, c))
    compiled = step.lower(params, tokens, cache).compile()
    layer_bytes = param_bytes(params["moe_layers"]["ffn"]) / (cfg.num_hidden_layers - cfg.first_k_dense_replace)
    assert compiled.memory_analysis().temp_size_in_bytes < 0.25 * layer_bytes


# The indexed (accelerator decode) kernel's other paths ------------------------------------------
@pytest.mark.parametrize("kernel", ["grouped", "indexed", "ragged"])
@pytest.mark.parametrize("n", [1, 6])
def test_kernels_read_one_layer_of_a_stack(kernel, n):
    """With `layer`, a kernel reads that layer out of the group's [L, E, ...] stacks (as in the layer loop)."""
    rng = np.random.default_rng(10 + n)
    layers = [experts(20 + i) for i in range(3)]
    stacks = [jax.tree.map(lambda *a: jnp.stack(a), *(layer[m] for layer in layers)) for m in range(3)]
    x = jnp.asarray(rng.standard_normal((n, D)), jnp.float32)
    idx, weights = assignments("uniform", n, rng)
    got = jax.jit(kernels.EXPERT_KERNELS[kernel])(x, weights, idx, *stacks, layer=jnp.int32(2))
    np.testing.assert_allclose(got, reference_experts(x, weights, idx, *layers[2]), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("n", [1, 3, 9, 40])
def test_indexed_kernel_with_experts_held_elsewhere(n):
    """Experts [4, 10) of 12 on this device: assignments to the others add nothing, whichever path runs."""
    rng = np.random.default_rng(n)
    gate, up, down = experts(5)
    x = jnp.asarray(rng.standard_normal((n, D)), jnp.float32)
    idx, weights = assignments("skewed" if n == 40 else "uniform", n, rng)
    local = [q[4:10] for q in (gate, up, down)]
    got = jax.jit(kernels.INDEXED)(x, weights, idx, *local, first_expert=4)
    want = reference_experts(x, weights, idx, *local, first_expert=4)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_indexed_kernel_hands_prefill_to_ragged(monkeypatch):
    from kimi_jax.kernels import indexed

    monkeypatch.setattr(indexed, "MAX_DECODE_TOKENS", 4)
    rng = np.random.default_rng(7)
    gate, up, down = experts(7)
    x = jnp.asarray(rng.standard_normal((9, D)), jnp.float32)
    idx, weights = assignments("uniform", 9, rng)
    calls = []
    monkeypatch.setattr(indexed, "RAGGED", lambda *a: calls.append(a) or kernels.RAGGED(*a))
    got = indexed.indexed_experts(x, weights, idx, gate, up, down)
    assert len(calls) == 1
    np.testing.assert_allclose(got, reference_experts(x, weights, idx, gate, up, down), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape,block", [((48, 80), (16, 16)),  # fewer output blocks: scaled copies of x
                                         ((80, 48), (16, 16)),  # fewer input blocks: masked copies of x
                                         ((20, 40), (8, 16)),  # ragged edge blocks (as kv_a_proj_with_mqa)
                                         ((37, 52), (16, 16))])
@pytest.mark.parametrize("rows", [1, 5])
def test_scaled_products_equal_dequantized_products(shape, block, rows):
    """The block-scaled product (scales on the activations) equals the product with the dequantized
    weight, for either expansion, ragged blocks and both fp8 storage forms."""
    from kimi_jax.kernels import scaled
    from kimi_jax.model import quant

    rng = np.random.default_rng(rows)
    w = QArray(*quantize_block_fp8(rng.standard_normal(shape).astype(np.float32), block))
    x = jnp.asarray(rng.standard_normal((rows, shape[1])), jnp.float32)
    want = quant.linear(x, QArray(jnp.asarray(w.values), jnp.asarray(w.scales)))
    for values in (jnp.asarray(w.values), jnp.asarray(w.values.view(np.uint8))):
        q = QArray(values, jnp.asarray(w.scales))
        assert scaled.expansion(q) == min(w.scales.shape)
        np.testing.assert_allclose(scaled.scaled_matmul(x, q, jnp.float32), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(jax.jit(scaled.linear)(x[None], q)[0], want, rtol=1e-5, atol=1e-5)


def test_scaled_linear_dequantizes_for_many_rows_and_plain_weights(monkeypatch):
    from kimi_jax.kernels import scaled
    from kimi_jax.model import quant

    rng = np.random.default_rng(1)
    values, scales = quantize_block_fp8(rng.standard_normal((48, 80)).astype(np.float32), (16, 16))
    w = QArray(jnp.asarray(values), jnp.asarray(scales))
    x = jnp.asarray(rng.standard_normal((2, 300, 80)), jnp.float32)  # 600 rows x expansion 3 > 1024
    used = []
    monkeypatch.setattr(scaled, "scaled_matmul", lambda *a: used.append(a) or quant.linear(*a[:2]))
    np.testing.assert_allclose(scaled.linear(x, w), quant.linear(x, w), rtol=1e-5, atol=1e-5)
    plain = jnp.asarray(rng.standard_normal((48, 80)), jnp.float32)
    np.testing.assert_allclose(scaled.linear(x[:, :2], plain), quant.linear(x[:, :2], plain), rtol=1e-6)
    assert used == []  # neither went through the expanded product
