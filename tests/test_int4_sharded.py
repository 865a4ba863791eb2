"""INT4 checkpoints on meshes, through convert -> orbax, and in the planner: sharded equals unsharded,
each device holds only its packed shard, the packed dim splits whole words, the bytes add up."""

import dataclasses
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

import kimi_jax
from kimi_jax.checkpoint.convert import convert
from kimi_jax.checkpoint.orbax import MARKER
from kimi_jax.config import KIMI_K2, KIMI_K2_THINKING, TINY_KIMI_INT4
from kimi_jax.model.quant import INT4, QArray
from kimi_jax.model.weights import abstract_params, count_params, leaves, param_bytes
from kimi_jax.runtime.plan import plan
from sharding import MeshError, check, make_mesh, param_shardings, per_device_param_bytes
from sharding.mesh import abstract_mesh
from sharding.rules import RULES

pytestmark = pytest.mark.sharded

CFG = TINY_KIMI_INT4
TOKENS = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 12))
MESHES = [(1, 8, 1), (1, 2, 4), (1, 4, 2), (2, 2, 2)]  # (data, expert, tensor)


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


def mesh_of(sizes):
    return make_mesh(dict(zip(("data", "expert", "tensor"), sizes)), jax.devices()[:int(np.prod(sizes))])


@pytest.fixture(scope="module")
def case(int4_checkpoint):
    path, params = int4_checkpoint(CFG)
    return path, params, kimi_jax.load(path, dtype="float32").logits(TOKENS)


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_logits_equal_unsharded(case, sizes):
    path, _, want = case
    model = kimi_jax.load(path, dtype="float32", mesh=mesh_of(sizes))
    assert rel(model.logits(TOKENS), want) <= 1e-5


def test_dp_attention_rules(case):
    path, _, want = case
    model = kimi_jax.load(path, dtype="float32", mesh="data=2,expert=2,tensor=2", rules="dp_attention")
    assert rel(model.logits(TOKENS), want) <= 1e-5


def test_each_device_holds_its_packed_shard(case):
    """expert=2, tensor=4: gate/up split their output rows, down its packed input words (96 = 12 words ->
    3 words, 24 columns per device: less than a group of 32, so down's scales stay replicated on it)."""
    path, _, _ = case
    model = kimi_jax.load(path, mesh="expert=2,tensor=4")
    ffn = model.params["moe_layers"]["ffn"]
    layers, e, i, d = CFG.num_moe_layers, CFG.n_routed_experts, CFG.moe_intermediate_size, CFG.hidden_size
    gate, down = ffn["experts_gate"], ffn["experts_down"]
    assert gate.kind == down.kind == INT4
    for shard in gate.values.addressable_shards:
        assert shard.data.shape == (layers, e // 2, i // 4, d // 8) and shard.data.dtype == np.int32
    assert gate.scales.addressable_shards[0].data.shape == (layers, e // 2, i // 4, d // 32)
    assert down.values.addressable_shards[0].data.shape == (layers, e // 2, d, i // 8 // 4)
    assert down.scales.addressable_shards[0].data.shape == (layers, e // 2, d, i // 32)  # replicated on `in`
    for q in (gate, down):  # per device: half a byte per local parameter plus the local scales
        values, scales = q.values.addressable_shards[0].data, q.scales.addressable_shards[0].data
        assert values.nbytes / (values.size * 8) == 0.5 and scales.dtype.itemsize == 2


def test_packed_dim_must_split_whole_words():
    """An expert dim of 40 is 5 words: tensor=2 would cut down_proj's words in half; refused, naming the dim."""
    cfg = dataclasses.replace(CFG, moe_intermediate_size=40)
    check(cfg, "expert=8")  # the packed dim unsplit is fine
    with pytest.raises(MeshError, match=r"experts_down: 5 words \(dimension 'expert_mlp, packed 8 INT4 values per "
                                        r"int32 word' of size 5\) does not split over mesh axis 'tensor' of size 2"):
        check(cfg, "tensor=2")


def test_int4_scales_follow_whole_groups():
    """Kimi-K2-Thinking at tensor=8: 2048/8 = 256 columns per shard, 8 whole groups: the scales split too."""
    shardings = param_shardings(KIMI_K2_THINKING, abstract_mesh("expert=8,tensor=8"), RULES)
    down = shardings["moe_layers"]["ffn"]["experts_down"]
    assert isinstance(down, QArray) and down.kind == INT4
    assert down.values.spec == P(None, "expert", None, "tensor") and down.scales.spec == down.values.spec


def test_convert_round_trip_keeps_int4_packed(case, tmp_path):
    path, params, want = case
    out = convert(path, tmp_path / "orbax", mesh="expert=4,tensor=2", progress=False)
    assert (out / MARKER).is_file()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    with ocp.PyTreeCheckpointer() as ckpt:  # on disk: the words and bf16 scales, never dequantized
        meta = ckpt.metadata(out / "weights" / "moe_layers.ffn.experts_up").item_metadata.tree
    assert meta["values"].dtype == np.int32 and meta["scales"].dtype.name == "bfloat16"
    model = kimi_jax.load(out, dtype="float32")
    q = model.params["moe_layers"]["ffn"]["experts_up"]
    assert q.kind == INT4 and q.values.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(q.values), params["moe_layers"]["ffn"]["experts_up"].values)
    np.testing.assert_allclose(model.logits(TOKENS), want, rtol=1e-6, atol=1e-6)
    sharded = kimi_jax.load(out, dtype="float32", mesh="data=2,expert=2,tensor=2")
    assert rel(sharded.logits(TOKENS), want) <= 1e-5
    with pytest.raises(ValueError, match="INT4.*--quantize keep"):
        convert(path, tmp_path / "fp8", quantize="fp8", progress=False)


def test_thinking_bytes_per_device():
    """The planner's weight bytes count INT4 words and bf16 scales: ~594 GB in all for Kimi-K2-Thinking."""
    params = abstract_params(KIMI_K2_THINKING)
    assert 593e9 < param_bytes(params) < 595e9  # the release's ~594 GB
    assert count_params(params) > count_params(abstract_params(KIMI_K2)) - 1e10  # logical values, not words
    mesh = abstract_mesh("expert=2,tensor=4")
    by_hand = 0
    for leaf in leaves(KIMI_K2_THINKING):
        node = params
        for k in leaf.path:
            node = node[k]
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(node))
        if leaf.path[-1].startswith("experts_"):
            by_hand += nbytes // 8  # experts over expert=2, rows or words over tensor=4
        elif set(leaf.axes) & {"vocab", "heads_qk", "heads_kv", "heads_v", "mlp"}:
            by_hand += nbytes // 4
        else:
            by_hand += nbytes
    assert per_device_param_bytes(KIMI_K2_THINKING, mesh, RULES) == by_hand
    assert by_hand / 2**30 < 80  # 8×H200 at expert=2,tensor=4: ~70 GiB of weights per GPU


def test_plan_compiles_int4_on_a_mesh():
    p = plan(CFG, "expert=4,tensor=2", batch=4, context=64)
    assert p.weights == per_device_param_bytes(CFG, abstract_mesh("expert=4,tensor=2"), RULES)
    assert p.total_param_bytes == param_bytes(abstract_params(CFG)) and p.temp_decode > 0
