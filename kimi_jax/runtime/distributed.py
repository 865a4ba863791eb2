"""Multi-host runs: one program on every host, joined by `jax.distributed.initialize`.

Every entry point (the generate CLI, the server) adds the same flags with `add_arguments(parser)`
and calls `initialize(args)` before it touches a JAX device:

  * explicit: `--coordinator-address HOST:PORT --num-processes N --process-id I` (or the
    environment: KIMI_COORDINATOR_ADDRESS, KIMI_NUM_PROCESSES, KIMI_PROCESS_ID; flags win);
  * TPU VM pod: `--tpu-pod` (or KIMI_TPU_POD=1, or auto-detected from the TPU runtime's
    TPU_WORKER_HOSTNAMES listing several hosts): `jax.distributed.initialize()` with no
    arguments, which reads the topology from the TPU metadata;
  * neither: a single process, nothing to initialize.

On a host with no TPU chip and no GPU plugin, where libtpu is installed only for deviceless TPU
compiles (the `tpu` and `test` extras), `initialize` limits JAX to its CPU backend unless
JAX_PLATFORMS or `jax_platforms` says otherwise: JAX would otherwise start libtpu, which finds no
chip and prints a screen of errors on every launch before JAX falls back to the CPU.

For local CPU tests, `--num-cpu-devices K` gives each process K CPU devices, and cross-process
collectives use gloo (XLA's CPU backend has no other). A process that cannot reach the
coordinator fails with `DistributedError` after `--init-timeout` seconds instead of hanging.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import pkgutil
import socket
import sys
import time

from kimi_jax.runtime import flags

ENV = {"coordinator_address": "KIMI_COORDINATOR_ADDRESS", "num_processes": "KIMI_NUM_PROCESSES",
       "process_id": "KIMI_PROCESS_ID", "num_cpu_devices": "KIMI_NUM_CPU_DEVICES",
       "init_timeout": "KIMI_INIT_TIMEOUT"}
DEFAULT_TIMEOUT_S = 300


class DistributedError(RuntimeError):
    """Multi-host setup failed: which process, which coordinator, and what to check."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    process_id: int = 0
    num_processes: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process prints results."""
        return self.process_id == 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The multi-host flags (each also read from the environment variable in ENV)."""
    g = parser.add_argument_group("multi-host (every process runs the same command)")
    g.add_argument("--coordinator-address", metavar="HOST:PORT",
                   help=f"process 0's address, reachable from every host (env {ENV['coordinator_address']})")
    g.add_argument("--num-processes", type=flags.integer(1), metavar="N",
                   help=f"processes in all (env {ENV['num_processes']})")
    g.add_argument("--process-id", type=flags.integer(0), metavar="I",
                   help=f"this process, 0..N-1 (env {ENV['process_id']})")
    g.add_argument("--tpu-pod", action="store_true",
                   help="TPU VM pod: initialize from the TPU metadata (env KIMI_TPU_POD=1; auto-detected)")
    g.add_argument("--num-cpu-devices", type=flags.integer(1), metavar="K",
                   help=f"CPU devices per process, for local tests (env {ENV['num_cpu_devices']})")
    g.add_argument("--init-timeout", type=flags.integer(1), metavar="S",
                   help=f"seconds to wait for every process to join (default {DEFAULT_TIMEOUT_S}; "
                        f"env {ENV['init_timeout']})")


def setting(args: argparse.Namespace, name: str, cast=int):
    value = getattr(args, name, None)
    if value is None and os.environ.get(ENV[name]):
        raw = os.environ[ENV[name]]
        try:
            value = cast(raw)
        except ValueError:
            raise DistributedError(f"environment variable {ENV[name]}={raw!r} must be {cast.__name__}") from None
    return value


def _tpu_pod(args: argparse.Namespace) -> bool:
    if getattr(args, "tpu_pod", False) or os.environ.get("KIMI_TPU_POD") == "1":
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # set by the TPU runtime on multi-host slices


def cpu_only_host() -> bool:
    """No TPU chip on this host (JAX's own PCI check, and no TPU device file: a container may hide the
    PCI bus) and no JAX GPU plugin installed: the CPU is the only backend JAX could start here. False
    when unsure (a jax without the check, or JAX_FORCE_TPU_INIT set)."""
    from importlib.metadata import entry_points

    if os.environ.get("JAX_FORCE_TPU_INIT") or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return False
    try:
        from jax._src import hardware_utils

        chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    except (ImportError, AttributeError, OSError):
        return False
    if chips:
        return False
    try:  # GPU plugins register as `jax_plugins` entry points or modules of the `jax_plugins` namespace
        import jax_plugins

        modules = list(pkgutil.iter_modules(jax_plugins.__path__))
    except ImportError:
        modules = []
    return not modules and not list(entry_points(group="jax_plugins"))


def initialize(args: argparse.Namespace) -> ProcessInfo:
    """Join the other processes (module docstring); returns this process's id and the count.

    Must run before any JAX device is used. Raises DistributedError with the fix on bad settings
    or when the coordinator cannot be reached within the timeout.
    """
    import jax

    address = setting(args, "coordinator_address", str)
    num, pid = setting(args, "num_processes"), setting(args, "process_id")
    cpu_devices = setting(args, "num_cpu_devices")
    timeout = setting(args, "init_timeout") or DEFAULT_TIMEOUT_S
    if not os.environ.get("JAX_PLATFORMS") and not jax.config.jax_platforms and cpu_only_host():
        jax.config.update("jax_platforms", "cpu")  # libtpu would find no chip (module docstring)
    if cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if _tpu_pod(args):
        _join(jax, {}, timeout, "the TPU pod (jax.distributed.initialize() from TPU metadata)")
        return ProcessInfo(jax.process_index(), jax.process_count())
    given = {k: v for k, v in (("--coordinator-address", address), ("--num-processes", num),
                               ("--process-id", pid)) if v is not None}
    if not given or (num == 1 and address is None):
        return ProcessInfo()
    if len(given) != 3:
        missing = [k for k in ("--coordinator-address", "--num-processes", "--process-id") if k not in given]
        raise DistributedError(f"multi-host needs --coordinator-address, --num-processes and --process-id (or "
                               f"their KIMI_* environment variables); missing {', '.join(missing)}")
    if not 0 <= pid < num:
        raise DistributedError(f"--process-id {pid} is outside 0..{num - 1} (--num-processes {num})")
    if ":" not in address:
        raise DistributedError(f"--coordinator-address {address!r} needs a port: HOST:PORT, e.g. 10.0.0.2:8476")
    if jax.config.jax_platforms in (None, "", "cpu") or cpu_devices is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    what = f"coordinator {address} as process {pid} of {num}"
    start = time.monotonic()
    if pid != 0:  # process 0 serves the coordinator; the others first wait until it listens
        wait_for_coordinator(address, timeout, what)
    _join(jax, dict(coordinator_address=address, num_processes=num, process_id=pid),
          max(1, round(timeout - (time.monotonic() - start))), what)
    return ProcessInfo(pid, num)


def wait_for_coordinator(address: str, timeout: float, what: str) -> None:
    """Poll HOST:PORT until it accepts a TCP connection, or raise DistributedError after `timeout` s.

    Why: when the coordinator is unreachable, XLA's client aborts the whole process (SIGABRT, a
    C++ check failure) rather than raising; probing first turns that into a clear Python error.
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as e:
            last = e
            time.sleep(0.2)
    raise DistributedError(
        f"could not reach {what}: nothing accepted a connection at {address} within {timeout:g} s ({last}). "
        "Check that process 0 was started (it serves the coordinator), that HOST:PORT is process 0's address "
        "as seen from this host, and that no firewall blocks the port.")


def _join(jax, kwargs: dict, timeout: int, what: str) -> None:
    # Remaining failures (a peer that never joins) abort inside XLA after `timeout`; say why first.
    print(f"[kimi_jax] joining {what} (timeout {timeout} s)", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout)
    except Exception as e:  # the runtime raises XlaRuntimeError / RuntimeError with a long status
        raise DistributedError(
            f"could not join {what} within {timeout} s: {str(e).splitlines()[0][:300]}. Check that every process "
            "was started with the same --num-processes, that process 0 is running, and that HOST:PORT is "
            "reachable from this host (firewall, address).") from None


def python_only_stdout() -> None:
    """Point file descriptor 1 at stderr, keeping `sys.stdout` on the real stdout.

    Why: gloo logs its connections from C++ straight to fd 1, which would break machine-read
    output such as `--json`; Python's own prints are unaffected.
    """
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(real, "w", buffering=1)


def say(info: ProcessInfo, *lines: str, file=None) -> None:
    """Print on the main process only."""
    if info.is_main:
        print(*lines, file=file or sys.stdout, flush=True)
