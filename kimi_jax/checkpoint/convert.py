"""A Hugging Face checkpoint -> kimi_jax's orbax format (the library behind `python -m kimi_jax.convert`).

Streams weight group by weight group (one stacked weight of all its layers), and within a group
layer by layer: each layer is read from the memory-mapped safetensors, written into the group's
orbax array and dropped, so peak host memory is about one layer of one group (plus the unstacked
embedding), never the checkpoint. Block-fp8 weights stay float8_e4m3fn with their float32 scales
(no dequantization), INT4 weights stay packed int32 words with their bf16 scales; a bf16 checkpoint
is kept as is, or quantized to block-fp8 on the way
with `--quantize fp8` (one layer at a time). Every tensor's name, shape and dtype is checked
against config.json before anything is written.

Safe to rerun: the output is built in a hidden sibling directory and renamed into place only
when complete, and it is sealed by `kimi_orbax.json` (see kimi_jax/orbax_io.py), which a load
requires. Progress (bytes, rate, ETA) goes to stderr.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kimi_jax.checkpoint.hf import HFReader
from kimi_jax.checkpoint.orbax import (
    MARKER,
    expected_parts,
    group_bytes,
    release_host_memory,
    write_group,
    write_marker,
)
from kimi_jax.checkpoint.safetensors import INDEX_FILENAME
from kimi_jax.config import Config
from kimi_jax.model.quant import quantize_block_fp8
from kimi_jax.model.weights import Leaf, leaves
from sharding import check

RELEASE_BLOCK = (128, 128)


class Progress:
    """A one-line progress bar on stderr: bytes done / total, rate, ETA and the current group."""

    def __init__(self, total: int, stream=None, every: float = 0.5):
        self.total, self.done, self.stream, self.every = total, 0, stream or sys.stderr, every
        self.start = self.last = time.perf_counter()

    def update(self, nbytes: int, label: str) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        frac = self.done / max(self.total, 1)
        bar = "#" * int(30 * frac)
        unit, scale = ("GB", 1e9) if self.total >= 1e9 else ("MB", 1e6)
        self.stream.write(f"\r[convert] [{bar:<30}] {self.done / scale:7.2f}/{self.total / scale:.2f} {unit} "
                          f"{100 * frac:5.1f}% {rate / 1e6:7.1f} MB/s ETA {_clock(eta)}  {label[:40]:<40}")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "--:--:--"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def target_config(source: Config, quantize: str) -> Config:
    """The converted model's config: the source's, or block-fp8 when quantizing an unquantized one."""
    if quantize == "fp8" and source.int4 is not None:
        raise ValueError("--quantize fp8: this checkpoint is INT4 (compressed-tensors); its experts stay INT4 "
                         "and the engine holds one quantization per checkpoint: convert with --quantize keep")
    if quantize == "fp8" and not source.quantized:
        return dataclasses.replace(source, weight_block_size=RELEASE_BLOCK)
    if quantize not in ("keep", "fp8"):
        raise ValueError(f"--quantize {quantize!r}: use 'keep' (default) or 'fp8'")
    return source


def verify(reader: HFReader, cfg: Config) -> None:
    """Check every tensor's shape and dtype in the headers (names are checked when the reader opens)."""
    for leaf in leaves(cfg):
        reader.check_shapes(leaf)


def layer_reader(reader: HFReader, source: Leaf, target: Leaf,
                 block: tuple[int, int] | None) -> Callable[[str, int | None], np.ndarray]:
    """`read(part, i)` for `orbax_io.write_group`: layer i of a weight group (all of it for i None),
    in the target format; an unquantized source is quantized one layer at a time, once per layer."""
    memo: dict[int | None, dict[str, np.ndarray]] = {}

    def index(i):
        return None if i is None else (slice(i, i + 1), *(slice(None) for _ in target.shape[1:]))

    def read(part: str, i: int | None) -> np.ndarray:
        if source.spec.quantized or not target.spec.quantized:
            return reader.read(source, part, index(i))
        if i not in memo:
            memo.clear()
            values, scales = quantize_block_fp8(reader.read(source, "values", index(i)), block)
            memo[i] = {"values": values, "scales": scales}
        return memo[i][part]

    return read


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, chat templates, generation config...: every small file but weights and config."""
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (INDEX_FILENAME, "config.json"):
            shutil.copy2(f, dst / f.name)


def convert(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, quantize: str = "keep", mesh: Any = None,
            force: bool = False, progress: bool = True,
            on_group: Callable[[Leaf], None] | None = None) -> Path:
    """Convert `hf_dir` to an orbax checkpoint at `out_dir` (module docstring); returns `out_dir`.

    mesh: optionally check that the model splits over this mesh spec before converting.
    on_group: called after each group is written (progress hooks, tests).
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir} is {'a file' if hf_dir.is_file() else 'missing'}: pass the Hugging Face "
                                "checkpoint directory (the one holding config.json)")
    if (out / MARKER).exists() and not force:
        raise FileExistsError(f"{out} is already a converted checkpoint; pass --force to replace it")
    if out.exists() and not (out / MARKER).exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a converted checkpoint; choose another --out")
    source = Config.from_json(hf_dir)
    cfg = target_config(source, quantize)
    if mesh is not None:
        check(cfg, mesh)
    reader = HFReader(hf_dir, source)  # checks every tensor name
    try:
        verify(reader, source)
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        tmp.mkdir()
        try:
            pairs = list(zip(leaves(source), leaves(cfg)))
            bar = Progress(sum(group_bytes(cfg, t) for _, t in pairs)) if progress else None
            for src_leaf, leaf in pairs:
                read = layer_reader(reader, src_leaf, leaf, cfg.weight_block_size)
                write_group(tmp, leaf, expected_parts(cfg, leaf), read,
                            on_bytes=lambda n, name=leaf.name: bar and bar.update(n, name))
                reader.files.close()  # unmap the shards: their pages would otherwise stay in this process's RSS
                release_host_memory()
                if on_group:
                    on_group(leaf)
            (tmp / "config.json").write_text(_config_json(hf_dir, cfg))
            _copy_side_files(hf_dir, tmp)
            write_marker(tmp, cfg, source=str(hf_dir.resolve()))
            _replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        reader.close()
    return out


def _config_json(hf_dir: Path, cfg: Config) -> str:
    """The source's config.json, with a quantization_config added when we quantized."""
    import json

    d = json.loads((hf_dir / "config.json").read_text())
    if cfg.quantized and "quantization_config" not in d:
        d["quantization_config"] = cfg.to_hf_dict()["quantization_config"]
    return json.dumps(d, indent=2)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`; an old checkpoint there (--force) is removed only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
