"""Smoke tests of the benchmarks on the tiny config: they run and report every key. Never timed assertions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("decode_tokens_per_s", "hf_decode_tokens_per_s", "decode_speedup_vs_transformers", "decode_roofline_fraction",
        "prefill_tokens_per_s", "peak_rss_bytes", "weight_bytes")


@pytest.mark.slow
def test_bench_script_tiny_json(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one CPU device, as `make bench` runs
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--config", "tiny", "--json",
                           "--no-ttft", "--cache-dir", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    for key in KEYS:
        assert key in result, f"{key} missing from bench.py --json output"
        assert isinstance(result[key], (int, float)) and result[key] > 0, (key, result[key])
    assert result["config"] == "tiny"


@pytest.mark.slow
def test_end_to_end_bench_tiny_reports_every_ratio(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_endtoend.py"), "--tiny", "--cache-dir",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 16 |")]
    assert [r.split(" | ")[1] for r in rows] == ["prefill", "generate, batch 1", "generate, batch 2"]
    for r in rows:  # seconds of both sides, and the ratio against the faster transformers dtype
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert all(float(c) > 0 for c in cells[2:5]) and float(cells[5].split("×")[0].strip("*")) > 0, r


def test_roofline_bytes_count_only_experts_hit():
    from kimi_jax.bench.roofline import decode_step_bytes, expected_distinct_experts, weight_bytes
    from kimi_jax.config import KIMI_K2

    assert abs(expected_distinct_experts(384, 8, 1) - 8) < 1e-9
    assert 59 < expected_distinct_experts(384, 8, 8) < 60
    one = decode_step_bytes(KIMI_K2, 1, 0)
    # Kimi-K2 at batch 1 reads ~32B active parameters' bytes (fp8), far below its 1.03 TB.
    assert 25e9 < one["total"] < 40e9 and 1.0e12 < weight_bytes(KIMI_K2) < 1.05e12



def test_decode_flops_count_the_activated_parameters_and_the_cache():
    from kimi_jax.bench.roofline import decode_flops, matmul_params_per_token
    from kimi_jax.config import KIMI_K2

    # The model card: 32B activated parameters; the embedding (a lookup) and lm_head (1.17B each) are in it.
    head = KIMI_K2.vocab_size * KIMI_K2.hidden_size
    assert 31.5e9 < matmul_params_per_token(KIMI_K2) + 2 * head < 33.5e9
    one = decode_flops(KIMI_K2, 1, 0)
    assert one == pytest.approx(2 * (matmul_params_per_token(KIMI_K2) + head))
    assert decode_flops(KIMI_K2, 8, 0) == pytest.approx(8 * one)  # every row computes its own
    # Absorbed MLA per cached position: 61 layers x 64 heads x (512 + 64 for scores, 512 for values) x 2.
    per_position = decode_flops(KIMI_K2, 1, 1001) - decode_flops(KIMI_K2, 1, 1)
    assert per_position == pytest.approx(1000 * 2 * 61 * 64 * (2 * 512 + 64))

@pytest.mark.slow
def test_gpu_bench_tiny_path_runs_on_cpu():
    from kimi_jax.bench import gpu

    result = gpu.run("tiny", log=lambda msg: None)
    for key in ("decode_tokens_per_s_b1", "decode_roofline_fraction_b1", "prefill_flops_per_s",
                "prefill_fraction_of_matmul_rate", "copy_bandwidth_bytes_per_s"):
        assert result[key] > 0, key
    assert "| 1 |" in gpu.markdown(result)


STARTS = """
import json, runpy, sys, traceback
failed = {}
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    try:
        runpy.run_path(path, run_name="__main__")
        failed[path] = "returned without printing usage"
    except SystemExit as e:
        if e.code not in (0, None):
            failed[path] = f"exit {e.code}"
    except BaseException:
        failed[path] = traceback.format_exc()[-1500:]
print(json.dumps(failed))
"""


def test_every_script_starts():
    """Each script imports and answers --help, all in one process (a moved module once left
    bench_sharding.py and bench_generate.py unable to start)."""
    scripts = sorted(str(p) for p in (ROOT / "scripts").glob("*.py"))
    proc = subprocess.run([sys.executable, "-c", STARTS, *scripts], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}
    assert len(scripts) >= 10 and proc.stdout.count("usage:") >= len(scripts)


def test_itl_compares_the_admission_with_the_same_streams_at_the_same_lengths():
    """matched_gaps: a stream's decode calls slow down as it grows, so the reference for the gaps that
    overlap an admission is the control run's gaps with the same indices, not the earlier ones."""
    from kimi_jax.bench.paged import matched_gaps

    def deliveries(gap_ms, admission=None):  # one stream: gap j lasts gap_ms(j), + 30 ms inside the admission
        t, out = 0.0, [0.0]
        for j in range(200):
            extra = 0.030 if admission and admission[0] < t < admission[1] else 0.0
            t += gap_ms(j) / 1e3 + extra
            out.append(t)
        return out

    growing = lambda j: 10 + j * 0.1  # noqa: E731 - 10 ms at the start, 30 ms after 200 calls
    arrived, admitted = 1.5, 2.5
    times = [deliveries(growing, (arrived, admitted)) for _ in range(4)]
    control = [deliveries(growing) for _ in range(4)]
    r = matched_gaps([(times, arrived, admitted)], control, baseline_s=1.0)
    during = [b - a for ts in times for a, b in zip(ts, ts[1:]) if a < admitted and b > arrived]
    first = next(j for j, (a, b) in enumerate(zip(times[0], times[0][1:])) if b > arrived)
    # The reference is the control's gaps at the indices of the gaps during the admission ...
    matched = [growing(j) for j in range(first, first + len(during) // 4)]
    assert r["gaps_during"] == len(during) == r["gaps_matched"]
    assert r["median_itl_ms"] == round(float(np.median(matched)), 1)
    assert r["p99_itl_admitting_ms"] == round(float(np.percentile(during, 99)) * 1e3, 1)
    # ... which are longer than the gaps before the prompt came, so that ratio is the larger one.
    assert r["median_before_ms"] < r["median_itl_ms"] and r["ratio_to_before"] > r["ratio"]
    # Runs are pooled: the same run twice has the same figures over twice the gaps.
    twice = matched_gaps([(times, arrived, admitted)] * 2, control, baseline_s=1.0)
    assert twice["gaps_during"] == 2 * r["gaps_during"] and twice["ratio"] == r["ratio"] and twice["runs"] == 2
    # A stream that ended before the admission leaves nothing to compare: a clear error.
    with pytest.raises(ValueError, match="no gaps to compare"):
        matched_gaps([([ts[:10] for ts in times], arrived, admitted)], control, baseline_s=1.0)


def test_the_hit_logits_benchmark_compares_a_prefix_hit_with_a_whole_prefill():
    """bench.paged.hit_logits: in fp32 a prefix hit's logits are a whole prefill's (to rounding); in
    bfloat16 the two round differently, which is what the benchmark exists to measure."""
    from kimi_jax.bench.paged import hit_logits
    from kimi_jax.runtime.default_model import load_default

    fp32 = hit_logits(load_default(), trials=3)
    assert fp32["trials"] == 3 and fp32["max_rel"] <= 1e-5 and fp32["argmax_differs"] == 0
    assert hit_logits(load_default(dtype="bfloat16"), trials=3)["max_rel"] > 1e-5
