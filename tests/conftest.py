"""Eight fake CPU devices for every test, set before JAX initialises."""

import gc
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "kimi-k2-instruct"
DATA = Path(__file__).resolve().parent / "data"


def reference_file(name: str, fallback: str) -> Path:
    """A file of ../shared/reference (the real release's), or its verbatim copy in tests/data."""
    path = Path(os.environ.get("KIMI_REFERENCE_DIR", REFERENCE)) / name
    return path if path.exists() else DATA / fallback


@pytest.fixture(scope="session")
def hub_checkpoint(tmp_path_factory):
    """Factory: a small checkpoint in the release's hub layout (fp8 + scales, 3 shards, index) and its params.

    Cached per (config name, seed) for the session; weights are N(0, 0.05) so attention is not flat.
    """
    from kimi_jax.checkpoint.hf import save_hf_checkpoint
    from kimi_jax.model.weights import random_params

    cache = {}

    def make(cfg, seed: int = 0):
        key = (cfg, seed)
        if key not in cache:
            params = random_params(cfg, seed=seed, std=0.05)
            path = save_hf_checkpoint(params, cfg, tmp_path_factory.mktemp(f"{cfg.name}-{seed}"), num_shards=3)
            cache[key] = (path, params)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def int4_checkpoint(tmp_path_factory):
    """Factory: a small checkpoint in the Kimi-K2-Thinking INT4 layout (compressed-tensors packing; with the
    K2.5 prefix when the config has one) and its params. Cached per (config, seed) for the session."""
    from int4_util import write_int4_checkpoint

    cache = {}

    def make(cfg, seed: int = 0):
        key = (cfg, seed)
        if key not in cache:
            cache[key] = write_int4_checkpoint(cfg, tmp_path_factory.mktemp(f"{cfg.name}-{seed}"), seed)
        return cache[key]

    return make


TIERS = ("unit", "parity", "sharded", "generation", "serve")


def pytest_collection_modifyitems(config, items):
    """Every test belongs to exactly one tier (its module's `pytestmark`), so `-m TIER` runs a tier alone."""
    untiered = [item.nodeid for item in items if sum(item.get_closest_marker(t) is not None for t in TIERS) != 1]
    if untiered:
        raise pytest.UsageError(f"tests without exactly one tier marker {TIERS}: {untiered[:5]}; add "
                                "`pytestmark = pytest.mark.<tier>` to the module")


@pytest.fixture(autouse=True)
def _stop_the_schedulers_a_test_started(monkeypatch):
    """A test that fails before it stops its schedulers would leave their model threads running into
    the next tests of its process (on the same cores and devices, often on a shared generator): stop
    every scheduler the test started that still runs. Schedulers of module fixtures are started
    before this fixture and stopped by their own."""
    from kimi_jax.runtime.scheduler import Scheduler  # deferred: JAX starts after the flags above

    started, start = [], Scheduler.start

    def recording(self):
        started.append(self)
        return start(self)

    monkeypatch.setattr(Scheduler, "start", recording)
    yield
    for scheduler in started:
        if scheduler._thread is not None and scheduler._thread.is_alive():
            scheduler.stop()


def _memory_maps() -> tuple[int, int] | None:
    """(memory mappings this process holds, the kernel's vm.max_map_count), or None off Linux."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            count = sum(1 for _ in maps)
        return count, int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module", autouse=True)
def _release_each_modules_programs():
    """XLA:CPU loads each compiled kernel as an object of its own, three memory mappings apiece, and
    JAX's caches keep a program loaded while its function lives. Over the whole suite one worker
    gathered 53,000 mappings; at Linux's vm.max_map_count (65530) the next program load segfaults
    (inside deserialize_executable or compile) and takes the worker down. Dropping JAX's caches after
    each module bounds a worker by its largest module (test_paged.py: 20,000); the next module loads
    what it shares from the persistent compile cache."""
    yield
    import jax

    gc.collect()
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _memory_map_headroom(request):
    """Fail the test, by name, that brings its process within a fifth of vm.max_map_count, before a
    program load fails there as a segfault that names nothing."""
    yield
    maps = _memory_maps()
    if maps is not None and maps[0] > 0.8 * maps[1]:
        pytest.fail(f"{request.node.nodeid}: this process holds {maps[0]} memory mappings of vm.max_map_count="
                    f"{maps[1]}; loaded XLA programs are piling up (release Generators and Models, or call "
                    "jax.clear_caches()); past the limit the next program load segfaults", pytrace=False)
