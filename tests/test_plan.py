"""The planner: per-device memory from abstract weights, on the real Kimi-K2 config and a tiny one."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import pytest
from conftest import reference_file

from kimi_jax import KIMI_K2
from kimi_jax.config import TINY_KIMI
from kimi_jax.model.weights import abstract_params, count_params
from kimi_jax.plan import main
from kimi_jax.runtime.plan import HARDWARE, plan

pytestmark = pytest.mark.sharded

# Weights the default rules split along `tensor` (besides the routed experts, split along expert × tensor).
TENSOR_SPLIT = ("q_b_proj", "kv_b_proj", "o_proj", "shared_gate", "shared_up", "shared_down", "embed", "lm_head")


def analytic_weight_bytes(cfg, expert: int, tensor: int) -> int:
    """Per-device weight bytes under the default rules, counted by hand from the parameter tree."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]:
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
        if any(str(n).startswith("experts_") for n in names):
            total += nbytes // (expert * tensor)
        elif any(n in TENSOR_SPLIT for n in names) or (names[0] == "dense_layers" and names[1] == "ffn"):
            total += nbytes // tensor
        else:  # norms, router, the latent projections q_a / kv_a
            total += nbytes
    return total


@pytest.fixture(scope="module")
def kimi_plan():
    """The CLI on the real config.json with 8 virtual devices, in its own process (device count is per process)."""
    config = reference_file("config.json", "kimi_k2_config.json")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "kimi_jax.plan", "--config", str(config), "--mesh",
                          "data=1,expert=4,tensor=2", "--batch", "8", "--context", "1024", "--hardware", "v5e",
                          "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_real_config_weights_match_the_analytic_count(kimi_plan):
    assert kimi_plan["total_params"] == count_params(abstract_params(KIMI_K2)) > 1.02e12
    per_device = kimi_plan["per_device_bytes"]
    assert per_device["weights"] == analytic_weight_bytes(KIMI_K2, expert=4, tensor=2)
    # Latent cache: layers × batch × context × (512 + 64) bf16, replicated over expert and tensor.
    assert per_device["kv_cache"] == 61 * 8 * 1024 * 576 * 2
    # What the compiler sees as the decode step's arguments: those weights, that cache, two [8, 1] int32 inputs.
    assert kimi_plan["compiled_argument_bytes"] == per_device["weights"] + per_device["kv_cache"] + 2 * 8 * 4
    assert per_device["temp"] > 0
    assert per_device["total"] == per_device["weights"] + per_device["kv_cache"] + per_device["temp"]
    assert kimi_plan["fits"] is False and kimi_plan["hbm_bytes"] == HARDWARE["v5e"]  # ~125 GiB of weights


def test_tiny_plan_in_process():
    """plan() as a library on this process's 8 devices; dp_attention splits the cache over data × expert."""
    p = plan(TINY_KIMI, "data=2,expert=4", batch=8, context=64, hardware="h100", rules="dp_attention")
    layers, width = TINY_KIMI.num_hidden_layers, TINY_KIMI.kv_cache_width
    assert p.kv_cache == layers * (8 // 8) * 64 * width * 2
    assert p.prefill_batch == 8 and p.prefill_chunk == 64  # min(context, 2048 tokens / 4 sequences per group)
    assert p.fits is True and p.to_json()["per_device_bytes"]["total"] == p.total
    assert "fits" in p.text() and "indicative" in p.text()
    # The paged pool: what the H100's HBM leaves after weights and temporaries, in pages of 64 positions;
    # a token costs each device 1/8 of a row (the batch is split 8 ways).
    pool = p.pool_figures()
    per_page = layers * width * 2 * 64 / 8
    assert pool["bytes"] == p.hbm - p.weights - p.temp and pool["pages"] == int(pool["bytes"] // per_page)
    assert pool["sequences"] == pool["pages"] * 64 // 64 and p.to_json()["kv_pool"] == pool
    # A given pool replaces batch × context in the total; 1 MiB holds 390 pages of these rows (2,688 bytes
    # a page per device: 3 layers × 56 values × 2 bytes × 64 positions ÷ 8).
    given = dataclasses.replace(p, kv_pool=2 ** 20)
    assert per_page == 2688 and given.total == p.weights + 2 ** 20 + p.temp
    assert given.pool_figures()["pages"] == 390 and given.pool_figures()["sequences"] == 390
    assert "390 pages of 64" in given.text() and "390 sequences of 64 tokens" in given.text()


def test_cli_errors_name_the_problem(capsys):
    assert main(["--config", "kimi-k2", "--mesh", "expert=4,tensor=3", "--batch", "1", "--context", "8"]) == 2
    err = capsys.readouterr().err
    assert "does not split over mesh axis 'tensor' of size 3" in err and "1, 2, 4, 8, 16, 32, 64" in err
    assert main(["--config", "kimi-k2", "--mesh", "experts=4", "--batch", "1", "--context", "8"]) == 2
    assert "unknown mesh axis ['experts']" in capsys.readouterr().err


@pytest.mark.slow
def test_0905_config_plans_a_256k_context(tmp_path):
    """The CLI on Kimi-K2-Instruct-0905's config (the release's config.json with its 256K values) at 262144 tokens."""
    d = json.loads(reference_file("config.json", "kimi_k2_config.json").read_text())
    d["max_position_embeddings"] = 262144
    d["rope_scaling"] = {**d["rope_scaling"], "factor": 64.0}
    (tmp_path / "config.json").write_text(json.dumps(d))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "kimi_jax.plan", "--config", str(tmp_path), "--mesh",
                          "data=1,expert=4,tensor=2", "--batch", "1", "--context", "262144", "--json"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["context"] == 262144 and result["per_device_bytes"]["kv_cache"] == 61 * 262144 * 576 * 2


class Compiled:
    """Stands in for a compiled program: its cost analysis only."""

    def __init__(self, cost: dict[str, float]):
        self.cost = cost

    def cost_analysis(self):
        return self.cost


@pytest.mark.parametrize("n_dense, n_moe", [(1, 60), (3, 58), (2, 2), (0, 4), (4, 0), (0, 1)])
def test_step_cost_counts_every_layer_once(n_dense, n_moe):
    """Programs built by the loop model the compiler follows (body once, stack-proportional outside costs
    once per layer): step_cost recovers O + Σ n_g (L_g + s_g) exactly where it can tell s_g apart."""
    from kimi_jax.runtime.plan import step_cost

    outside, body, grown = 600.0, {"dense": 480.0, "moe": 160.0}, {"dense": 2.0, "moe": 6.4}

    def program(dense: int, moe: int, unroll: bool = False) -> Compiled:
        total = outside
        for g, n in (("dense", dense), ("moe", moe)):
            if n:
                total += body[g] * (n if unroll else 1) + (0 if unroll or n == 1 else n * grown[g])
        return Compiled({"bytes accessed": total, "flops": 2 * total})

    cfg = dataclasses.replace(TINY_KIMI, num_hidden_layers=n_dense + n_moe, first_k_dense_replace=n_dense)
    cost = step_cost(cfg, program(n_dense, n_moe),
                     lambda c, unroll: program(c.num_dense_layers, c.num_moe_layers, unroll))
    exact = all(n != 2 for n in (n_dense, n_moe)) or not (n_dense and n_moe)
    want = outside + sum(n * (body[g] + (grown[g] if n > 1 else 0)) for g, n in (("dense", n_dense), ("moe", n_moe)))
    if exact:
        assert cost.bytes_accessed == pytest.approx(want) and cost.flops == pytest.approx(2 * want)
    else:  # a group of two: its s counted twice instead of once per layer (never n² times)
        assert want <= cost.bytes_accessed <= want + sum(grown.values()) * 2
    if n_moe:
        one = body["moe"] + (grown["moe"] if n_moe > 1 else 0)
        assert cost.per_moe_layer_bytes == pytest.approx(one, abs=2 * grown["moe"] if not exact else 1e-6)
        if n_moe >= 3:
            assert cost.per_moe_layer_outside_bytes == pytest.approx(grown["moe"])
    else:
        assert cost.per_moe_layer_bytes is None
