"""Serving across local processes: start `python -m kimi_jax.serve` as N processes on this machine
(K CPU devices each, joined on 127.0.0.1 as scripts/launch_local.sh joins them), and measure a
decode step with 1 process against N.

What is compared: the same mesh, model, slots and requests (`clients` greedy completions of
`max_tokens` tokens at once, stop tokens banned by logit_bias so every request runs its full
length), `rounds` times after a warm-up round that compiles. Per round, ms per decode step is
the model thread's busy seconds over the decode steps it ran (/metrics deltas); the protocol's
own cost is process 0's seconds spent publishing events per scheduler iteration.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcesses:
    """`python -m kimi_jax.serve ARGS` as processes 0..n-1 of n (one plain process when n is 1), each
    with `devices` CPU devices; stderr of process i in logs/stderr{i}. Up once /health answers 200."""

    def __init__(self, n: int, devices: int, args: list[str], logs: Path, ready_s: float = 240):
        self.port, coordinator = free_port(), free_port()
        self.coordinator = f"127.0.0.1:{coordinator}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs = logs
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("KIMI_")}
        env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
        joined = ["--coordinator-address", f"127.0.0.1:{coordinator}", "--num-processes", str(n)] if n > 1 else []
        self.procs = []
        for i in range(n):
            with open(logs / f"stderr{i}", "w") as err:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "kimi_jax.serve", "--port", str(self.port), *args, *joined,
                     *(["--process-id", str(i)] if n > 1 else []), "--num-cpu-devices", str(devices)],
                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err))
        deadline = time.time() + ready_s
        while not self.healthy():
            if any(p.poll() is not None for p in self.procs) or time.time() > deadline:
                self.kill()
                logs_text = "\n".join(self.stderr(i)[-3000:] for i in range(n))
                raise RuntimeError(f"the {n}-process server did not come up:\n{logs_text}")
            time.sleep(0.5)

    def healthy(self) -> bool:
        import httpx

        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        return False

    def stderr(self, i: int) -> str:
        return (self.logs / f"stderr{i}").read_text(errors="replace")

    def wait(self, timeout: float) -> list[int | None]:
        """Wait up to `timeout` s for every process to exit; their exit codes (None: still running)."""
        deadline = time.time() + timeout
        while time.time() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.2)
        return [p.poll() for p in self.procs]

    def leftovers(self) -> list[str]:
        """Processes still running that were started for this server's port (supervised children too)."""
        found = subprocess.run(["pgrep", "-af", f"kimi_jax.serve --port {self.port} "], capture_output=True, text=True)
        return [line for line in found.stdout.splitlines() if "pgrep" not in line]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def endless(model: str, prompt: str, max_tokens: int, stop_ids) -> dict:
    """A greedy /v1/completions body that runs its full `max_tokens` (the stop ids banned)."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "logit_bias": {str(t): -100 for t in stop_ids}}


def measure(url: str, model: str, stop_ids, clients: int = 4, max_tokens: int = 64, rounds: int = 5) -> dict:
    """ms per decode step and publish ms per iteration, one value per round (after a warm-up)."""
    import httpx

    def counters() -> dict[str, float]:
        out = {}
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def one_round() -> None:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            bodies = [endless(model, f"Count {i}:", max_tokens, stop_ids) for i in range(clients)]
            for r in pool.map(lambda b: httpx.post(f"{url}/v1/completions", json=b, timeout=600), bodies):
                r.raise_for_status()

    one_round()  # compiles
    step_ms, publish_ms = [], []
    for _ in range(rounds):
        before = counters()
        one_round()
        after = counters()
        steps = after["kimi_jax_decode_steps_total"] - before["kimi_jax_decode_steps_total"]
        busy = after["kimi_jax_busy_seconds_total"] - before["kimi_jax_busy_seconds_total"]
        step_ms.append(1000 * busy / steps)
        key = "kimi_jax_lockstep_publish_seconds_total"
        if key in after:
            iterations = after['kimi_jax_process_iterations{process="0"}'] - before[
                'kimi_jax_process_iterations{process="0"}']
            publish_ms.append(1000 * (after[key] - before[key]) / iterations)
    return {"step_ms": step_ms, "publish_ms": publish_ms}


def compare(serve_args: list[str], total_devices: int, processes: int, logs: Path, model: str, stop_ids,
            **kwargs) -> dict[str, dict]:
    """`measure` on 1 process with every device, then on `processes` processes sharing them."""
    results = {}
    for n in (1, processes):
        d = logs / f"{n}-process"
        d.mkdir(parents=True, exist_ok=True)
        server = ServeProcesses(n, total_devices // n, serve_args, d)
        try:
            results[n] = measure(server.url, model, stop_ids, **kwargs)
        finally:
            server.kill()
    return results


def markdown(results: dict[int, dict]) -> str:
    rows = ["| processes | ms per decode step (median) | all rounds | publish ms per iteration (median) |",
            "|---|---|---|---|"]
    for n, r in results.items():
        publish = f"{np.median(r['publish_ms']):.3f}" if r["publish_ms"] else "—"
        rows.append(f"| {n} | {np.median(r['step_ms']):.1f} | {', '.join(f'{x:.1f}' for x in r['step_ms'])} | "
                    f"{publish} |")
    one, many = (np.median(results[n]["step_ms"]) for n in results)
    return "\n".join(rows) + f"\n\nratio {max(results)} processes / 1 process: {many / one:.2f}×\n"
