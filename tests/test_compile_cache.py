"""The persistent compile cache: one directory per process layout; deviceless TPU programs stay out of
it (runtime/targets.py)."""

import jax
import jax.numpy as jnp
import pytest
from jax._src import compilation_cache

from kimi_jax.runtime.compile_cache import enable_compile_cache, machine_tag
from kimi_jax.runtime.targets import no_persistent_cache

pytestmark = pytest.mark.unit


def test_deviceless_compiles_stay_out_of_the_persistent_cache(tmp_path):
    """Inside `no_persistent_cache` nothing is written to (or read from) the compile cache, even after the
    process has used it; outside, it is used again."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    try:
        directory = enable_compile_cache(tmp_path)
        # This machine, one process with 8 CPU devices (tests/conftest.py): another processor or a
        # multi-process run has a folder of its own.
        assert directory == tmp_path / machine_tag() / "1x8" and jax.config.jax_compilation_cache_dir == str(directory)
        jax.jit(lambda x: x * 2)(jnp.ones(3)).block_until_ready()
        entries = len(list(directory.iterdir()))
        with no_persistent_cache():
            jax.jit(lambda x: x * 3)(jnp.ones(3)).block_until_ready()
        assert len(list(directory.iterdir())) == entries >= 1
        jax.jit(lambda x: x * 4)(jnp.ones(3)).block_until_ready()
        assert len(list(directory.iterdir())) == entries + 1
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()


def test_another_processor_gets_another_cache_folder(tmp_path):
    """A CPU program is built for the host's instruction set, which JAX's cache key leaves out: a cache
    restored on a processor with other features must not be read there."""
    def cpuinfo(name, flags):
        path = tmp_path / name
        path.write_text("".join(f"processor\t: {i}\nmodel name\t: EPYC\nflags\t\t: {flags}\nbogomips\t: {i}\n\n"
                                for i in range(2)))
        return path

    avx2 = machine_tag(cpuinfo("a", "fpu sse2 avx2"))
    assert machine_tag(cpuinfo("b", "fpu sse2 avx2")) == avx2  # per-core lines (bogomips) do not matter
    assert machine_tag(cpuinfo("c", "fpu sse2 avx2 avx512f")) != avx2
    assert machine_tag(tmp_path / "absent") != avx2  # no cpuinfo: the platform's description
