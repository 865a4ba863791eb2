"""JAX's persistent compile cache, kept per machine and per process layout (`enable_compile_cache`).

A later start of the same configuration then loads its programs instead of compiling them: the
scheduler's warm-up (runtime/scheduler.py) takes seconds instead of minutes.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import jax
import jaxlib

CACHE_ENV = "KIMI_JAX_CACHE"  # root of everything kimi_jax caches (default ~/.cache/kimi_jax)
COMPILE_CACHE_ENV = "KIMI_JAX_COMPILE_CACHE"  # compile cache dir, or "off" to disable


def cache_root() -> Path:
    """$KIMI_JAX_CACHE, else $XDG_CACHE_HOME/kimi_jax, else ~/.cache/kimi_jax."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kimi_jax"


def machine_tag(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """A short digest of what a compiled CPU program depends on beyond JAX's cache key: jaxlib's
    version and the host processor (its model and feature flags, from `cpuinfo` on Linux)."""
    cpu = platform.processor() or platform.machine()
    try:
        info = cpuinfo.read_text()
        cpu = " ".join(sorted({line for line in info.splitlines() if line.startswith(("model name", "flags"))}))
    except OSError:  # not Linux: the platform's description
        pass
    digest = hashlib.sha256(f"{jaxlib.__version__} {cpu}".encode()).hexdigest()[:12]
    return f"{platform.machine()}-{digest}"


def enable_compile_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compile cache (idempotent); returns its directory, or None if off.

    Directory: `path`, else $KIMI_JAX_COMPILE_CACHE ("off" disables), else <cache_root>/xla, then a
    folder per machine (`machine_tag`) and in it one per process layout, "<processes>x<local devices>"
    (call it after jax.distributed joins): JAX's cache key leaves out the host CPU's model and
    features, the process count and the CPU device count (it drops
    --xla_force_host_platform_device_count), so without them a process would load a CPU program built
    for another processor (a home directory restored on new hardware), or the program that process 0
    of a multi-process run compiled, collectives across processes included. A directory
    the user already configured (JAX_COMPILATION_CACHE_DIR) is kept as it is. The size and
    compile-time thresholds are dropped so the small programs of tiny models are cached too.
    """
    setting = str(path) if path is not None else os.environ.get(COMPILE_CACHE_ENV, "")
    if setting.lower() in ("off", "0", "false", "none"):
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    directory = Path(setting).expanduser() if setting else cache_root() / "xla"
    directory = directory / machine_tag() / f"{jax.process_count()}x{jax.local_device_count()}"
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory
