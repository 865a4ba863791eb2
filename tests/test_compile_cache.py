"""The persistent compile cache: one directory per process layout; deviceless TPU programs stay out of
it (runtime/targets.py)."""

import jax
import jax.numpy as jnp
import pytest
from jax._src import compilation_cache

from kimi_jax.runtime.generation import enable_compile_cache
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
        # One process with 8 CPU devices (tests/conftest.py): a multi-process run has a folder of its own.
        assert directory == tmp_path / "1x8" and jax.config.jax_compilation_cache_dir == str(directory)
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
