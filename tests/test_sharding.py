"""Sharded equals unsharded on the fake 8-device CPU mesh; placement, HLO and error checks."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kimi_jax
from kimi_jax import kernels
from kimi_jax.checkpoint.hf import load_hf_params
from kimi_jax.config import TINY_DEEPSEEK, TINY_KIMI
from kimi_jax.model.experts import reference_experts
from kimi_jax.model.moe import route
from kimi_jax.model.quant import QArray
from kimi_jax.model.weights import random_params
from sharding import (
    DP_ATTENTION_RULES,
    RULES,
    MeshError,
    MeshLayout,
    Rules,
    check,
    make_mesh,
    param_shardings,
    parse_mesh_spec,
)

pytestmark = pytest.mark.sharded

# DeepSeek-like with 8×8 fp8 blocks: here expert and head shards hold whole blocks, so the scales split with
# the values; TINY_KIMI's 128-blocks are wider than any shard, so its scales stay replicated.
TINY_DEEPSEEK_B8 = dataclasses.replace(TINY_DEEPSEEK, weight_block_size=(8, 8), name="tiny-deepseek-b8")
CONFIGS = [TINY_KIMI, TINY_DEEPSEEK_B8]
MESHES = [(1, 1, 1), (1, 8, 1), (1, 2, 4), (1, 4, 2), (2, 2, 2), (2, 4, 1)]  # (data, expert, tensor)


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


def mesh_of(sizes: tuple[int, int, int]):
    spec = dict(zip(("data", "expert", "tensor"), sizes))
    return make_mesh(spec, jax.devices()[:int(np.prod(sizes))])


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: c.name)
def case(request, hub_checkpoint):
    """(config, checkpoint path, tokens, unsharded float32 logits)."""
    cfg = request.param
    path, _ = hub_checkpoint(cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12))  # 24 tokens: not a multiple of 16
    return cfg, path, tokens, kimi_jax.load(path, dtype="float32").logits(tokens)


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_logits_equal_unsharded(case, sizes):
    cfg, path, tokens, want = case
    model = kimi_jax.load(path, dtype="float32", mesh=mesh_of(sizes))
    assert rel(model.logits(tokens), want) <= 1e-5


def test_dp_attention_rules_and_odd_batch(case):
    """Batch split over data×expert (attention data-parallel, the MoE gathers its group); batch 3 is padded."""
    cfg, path, tokens, want = case
    model = kimi_jax.load(path, dtype="float32", mesh="data=2,expert=2,tensor=2", rules="dp_attention")
    assert model.layout.batch_shards == 4
    assert rel(model.logits(tokens), want) <= 1e-5
    np.testing.assert_allclose(model.logits(tokens[1]), want[1], rtol=1e-5, atol=1e-5)


def test_host_params_placed_by_model(case):
    cfg, path, tokens, want = case
    params = load_hf_params(path, cfg)
    model = kimi_jax.Model(cfg, params, dtype="float32", mesh="expert=4,tensor=2")
    assert rel(model.logits(tokens), want) <= 1e-5


# Placement ----------------------------------------------------------------------------------------
def test_each_device_holds_only_its_slice(hub_checkpoint):
    cfg = TINY_DEEPSEEK_B8
    path, _ = hub_checkpoint(cfg)
    model = kimi_jax.load(path, mesh="data=2,expert=2,tensor=2")
    e, i, d, layers = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size, cfg.num_moe_layers
    gate = model.params["moe_layers"]["ffn"]["experts_gate"]
    fp8 = model.backend.fp8_storage  # float8_e4m3fn, or its raw bytes as uint8 on CPU: one byte per value either way
    assert isinstance(gate, QArray) and gate.values.dtype == fp8 and gate.scales.dtype == jnp.float32
    for shard in gate.values.addressable_shards:
        assert shard.data.shape == (layers, e // 2, i // 2, d) and shard.data.dtype == fp8
    for shard in gate.scales.addressable_shards:  # 24 rows per shard = 3 whole 8-row blocks: scales split too
        assert shard.data.shape == (layers, e // 2, i // 2 // 8, d // 8)
    q_b = model.params["moe_layers"]["attn"]["q_b_proj"]
    assert q_b.values.addressable_shards[0].data.shape == (layers, q_b.shape[1] // 2, cfg.q_lora_rank)
    # The router and the latent projections are replicated.
    assert model.params["moe_layers"]["ffn"]["router"].sharding.is_fully_replicated


def test_misaligned_scales_stay_replicated(hub_checkpoint):
    """TINY_KIMI's 72 expert rows over tensor=2 are 36-row shards of one 128-row block: scales replicated."""
    cfg = TINY_KIMI
    path, _ = hub_checkpoint(cfg)
    model = kimi_jax.load(path, mesh="expert=4,tensor=2")
    gate = model.params["moe_layers"]["ffn"]["experts_gate"]
    layers, e = cfg.num_moe_layers, cfg.n_routed_experts
    assert gate.values.addressable_shards[0].data.shape == (layers, e // 4, 36, cfg.hidden_size)
    assert gate.scales.addressable_shards[0].data.shape == (layers, e // 4, 1, 2)


def test_loading_reads_each_devices_slice_only(hub_checkpoint):
    """The placer asks the checkpoint for per-device slices of the experts, never the whole stack."""
    cfg = TINY_KIMI
    path, _ = hub_checkpoint(cfg)
    layout = MeshLayout.build("expert=8")
    place, reads = layout.placer(cfg), []

    def spy(leaf, part, shape, read):
        def recorded(index):
            out = read(index)
            reads.append((leaf.name, part, out.shape))
            return out

        return place(leaf, part, shape, recorded)

    load_hf_params(path, cfg, spy)
    expert_reads = [shape for name, part, shape in reads if name == "moe_layers/ffn/experts_up" and part == "values"]
    assert len(expert_reads) == 8
    assert all(s[1] == cfg.n_routed_experts // 8 for s in expert_reads)
    # A replicated weight is read once, not once per device.
    assert sum(1 for name, part, _ in reads if name == "moe_layers/ffn/router") == 1


# The compiled program ---------------------------------------------------------------------------
def collectives(hlo: str, op: str) -> list[str]:
    """Result types of every `op` instruction in compiled HLO text, e.g. 'f32[24,200]'."""
    return re.findall(rf"= (\w+\[[\d,]*\])[^=]*? {op}(?:-start)?\(", hlo)


@pytest.mark.parametrize("mesh,rules", [("expert=4,tensor=2", RULES), ("data=2,expert=4", DP_ATTENTION_RULES)],
                         ids=["ep4tp2", "dp2ep4-dp_attention"])
def test_no_all_gather_of_expert_weights(hub_checkpoint, mesh, rules):
    cfg = TINY_KIMI
    path, _ = hub_checkpoint(cfg)
    model = kimi_jax.load(path, dtype="float32", mesh=mesh, rules=rules)
    tokens = jnp.zeros((8, 3), jnp.int32)  # 24 tokens: no activation dim equals the 16 experts
    hlo = model._forward.lower(model.params, tokens, tokens).compile().as_text()
    gathers = collectives(hlo, "all-gather")
    inner = {cfg.moe_intermediate_size, cfg.moe_intermediate_size // 2}  # an expert matrix: (expert_mlp, embed)

    def expert_weights(t):  # fp8 storage, or a (dequantized) matrix with an expert's two dims
        dims = {int(d) for d in re.findall(r"\d+", t.split("[")[1])}
        return t.startswith(("f8", "u8")) or (dims & inner and cfg.hidden_size in dims)

    assert gathers == [] or not any(map(expert_weights, gathers)), gathers
    assert "all-reduce" in hlo  # the expert outputs are summed, not the weights moved
    if rules is DP_ATTENTION_RULES:  # tokens (and their routing) are gathered within an expert group instead
        assert gathers


# The expert-parallel kernel against the loop reference -----------------------------------------
@pytest.mark.parametrize("kernel", ["grouped", "indexed", "ragged"])
@pytest.mark.parametrize("mesh,rules,block", [("expert=4,tensor=2", RULES, (8, 8)),
                                              ("data=2,expert=2,tensor=2", DP_ATTENTION_RULES, (128, 128)),
                                              ("expert=8", RULES, (128, 128))])
def test_expert_parallel_matches_reference(kernel, mesh, rules, block):
    cfg = dataclasses.replace(TINY_DEEPSEEK, weight_block_size=block)
    p = random_params(cfg, seed=3, std=0.05)["moe_layers"]["ffn"]
    w = {k: jax.tree.map(lambda a: jnp.asarray(a[0]), p[k], is_leaf=lambda a: isinstance(a, np.ndarray))
         for k in ("router", "router_bias", "experts_gate", "experts_up", "experts_down")}
    x = jnp.asarray(np.random.default_rng(0).standard_normal((40, cfg.hidden_size)), jnp.float32)
    weights, idx = route(x, w["router"], w["router_bias"], cfg)
    experts = (w["experts_gate"], w["experts_up"], w["experts_down"])
    want = jax.jit(reference_experts)(x, weights, idx, *experts)

    layout = MeshLayout.build(mesh, rules)
    shardings = param_shardings(cfg, layout.mesh, rules)["moe_layers"]["ffn"]

    def per_layer(s):  # drop the stacked `layers` axis from a weight's sharding
        return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*s.spec[1:]))

    placed = [jax.device_put(e, jax.tree.map(per_layer, shardings[k]))
              for e, k in zip(experts, ("experts_gate", "experts_up", "experts_down"))]
    run = jax.jit(layout.experts(kernels.EXPERT_KERNELS[kernel]))
    got = run(x, weights, idx, *placed)
    assert rel(got, want) <= 1e-5


def test_first_expert_splits_the_sum():
    """Partial outputs of disjoint expert ranges add up to the full routed output."""
    cfg = TINY_KIMI
    p = random_params(cfg, seed=4, std=0.05)["moe_layers"]["ffn"]
    w = {k: jax.tree.map(lambda a: jnp.asarray(a[0]), p[k], is_leaf=lambda a: isinstance(a, np.ndarray)) for k in p}
    x = jnp.asarray(np.random.default_rng(1).standard_normal((9, cfg.hidden_size)), jnp.float32)
    weights, idx = route(x, w["router"], w["router_bias"], cfg)
    experts = (w["experts_gate"], w["experts_up"], w["experts_down"])
    run = jax.jit(kernels.GROUPED)
    full = run(x, weights, idx, *experts)
    halves = sum(run(x, weights, idx, *(q[s] for q in experts), first_expert=s.start)
                 for s in (slice(0, 5), slice(5, 16)))
    assert rel(halves, full) <= 1e-6


# Errors -------------------------------------------------------------------------------------------
def test_indivisible_heads_name_dimension_axis_and_valid_sizes():
    cfg = dataclasses.replace(TINY_KIMI, num_attention_heads=3)
    with pytest.raises(MeshError, match=r"3 heads \(dimension 'heads_qk' of size 120\) does not split over "
                                        r"mesh axis 'tensor' of size 2; valid 'tensor' sizes for this model: 1"):
        check(cfg, "expert=4,tensor=2")


def test_indivisible_experts_and_real_model_errors():
    with pytest.raises(MeshError, match=r"'experts' of size 384 does not split over mesh axis 'expert' of size 5; "
                                        r"valid 'expert' sizes for this model: 1, 2, 3, 4, 6, 8"):
        check(kimi_jax.KIMI_K2, "expert=5")
    with pytest.raises(MeshError, match=r"64 heads .* mesh axis 'tensor' of size 128.* 1, 2, 4, 8, 16, 32, 64$"):
        check(kimi_jax.KIMI_K2, "expert=2,tensor=128")
    check(kimi_jax.KIMI_K2, "data=2,expert=64,tensor=8")  # a pod-scale mesh that does split


def test_load_refuses_a_mesh_the_model_cannot_use(hub_checkpoint):
    path, _ = hub_checkpoint(TINY_KIMI)
    with pytest.raises(MeshError, match="4 heads .* mesh axis 'tensor' of size 8"):
        kimi_jax.load(path, mesh="tensor=8")


def test_mesh_specs():
    assert parse_mesh_spec("expert=4, tensor=2") == {"data": 1, "expert": 4, "tensor": 2}
    assert parse_mesh_spec({"data": 8}) == {"data": 8, "expert": 1, "tensor": 1}
    mesh = make_mesh("data=2,expert=2,tensor=2")
    assert mesh.axis_names == ("data", "expert", "tensor") and make_mesh(mesh) is mesh
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(MeshError, match="needs 3 devices but 8 are available"):
        make_mesh("data=3")
    with pytest.raises(MeshError, match="unknown mesh axis"):
        make_mesh("pipeline=8")
    with pytest.raises(MeshError, match="not NAME=SIZE"):
        parse_mesh_spec("expert:8")


def test_rules_collision_is_an_error():
    bad = RULES.replace("bad", expert_mlp="expert")
    with pytest.raises(MeshError, match="maps both 'experts' and 'expert_mlp' .* to mesh axis 'expert'"):
        check(TINY_KIMI, "expert=8", bad)
    with pytest.raises(MeshError, match="'partial' has no entry for logical axis 'embed'"):
        check(TINY_KIMI, "expert=8", Rules.of("partial", {"vocab": None}))
