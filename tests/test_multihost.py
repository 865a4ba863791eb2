"""Multi-host: two local processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo) generate the same
greedy tokens as one process with 8 devices and as transformers; an unreachable coordinator fails fast."""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kimi_jax
from kimi_jax.checkpoint.convert import convert
from kimi_jax.config import TINY_KIMI
from kimi_jax.runtime import distributed

pytestmark = pytest.mark.sharded

REPO = Path(__file__).resolve().parents[1]
PROMPT = [5, 6, 7, 8]
MESH = "expert=4,tensor=2"


def env():
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("KIMI_")}
    e.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), PYTHON=sys.executable)
    return e


@pytest.mark.slow
def test_two_processes_match_one_process_and_transformers(hub_checkpoint, tmp_path):
    import torch

    from kimi_jax.bench.oracle import hf_model

    hf, params = hub_checkpoint(TINY_KIMI)
    ckpt = convert(hf, tmp_path / "orbax", progress=False)  # restored across processes
    args = ["--checkpoint", str(ckpt), "--prompt-ids", " ".join(map(str, PROMPT)), "--max-new-tokens", "6",
            "--temperature", "0", "--dtype", "float32", "--json", "--mesh", MESH]
    proc = subprocess.run(["bash", "scripts/launch_local.sh", "2", "4", *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # process 1 printed nothing
    two = json.loads(lines[0])["token_ids"]

    one = kimi_jax.load(ckpt, dtype="float32", mesh=MESH).generate([PROMPT], max_new_tokens=6, temperature=0)[0]
    want = hf_model(params, TINY_KIMI).generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False,
                                                eos_token_id=None, pad_token_id=0,
                                                attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))
    assert two == one == want[0, len(PROMPT):].tolist()


def test_unreachable_coordinator_fails_within_timeout():
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "kimi_jax.generate", "--prompt-ids", "1 2", "--mesh", "expert=8",
                           "--coordinator-address", "127.0.0.1:9", "--num-processes", "2", "--process-id", "1",
                           "--num-cpu-devices", "4", "--init-timeout", "2"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "could not reach coordinator 127.0.0.1:9 as process 1 of 2" in proc.stderr
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("flags, environ, message", [
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2), {}, "missing --process-id"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), {}, "outside 0..1"),
    (dict(num_processes=2, process_id=0), {"KIMI_COORDINATOR_ADDRESS": "localhost"}, "needs a port"),
    ({}, {"KIMI_NUM_PROCESSES": "two"}, "KIMI_NUM_PROCESSES='two' must be int"),
])
def test_bad_settings(flags, environ, message, monkeypatch):
    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    args = parser.parse_args([])
    for k, v in flags.items():
        setattr(args, k, v)
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.initialize(args)


def test_single_process_is_a_no_op():
    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    assert distributed.initialize(parser.parse_args([])) == distributed.ProcessInfo(0, 1)


def test_launch_scripts_parse():
    for name in ("launch_local.sh", "launch_tpu_pod.sh", "launch_slurm.sh"):
        subprocess.run(["bash", "-n", str(REPO / "scripts" / name)], check=True)
