"""kimi_jax's orbax checkpoint: the release's fp8 weights, stacked as the engine holds them.

Layout of a converted directory (written by `kimi_jax.convert`):

    OUT/config.json            the model's config (block-fp8 `quantization_config` when quantized)
    OUT/tiktoken.model         the tokenizer, when the source had one
    OUT/weights/<a.b.c>/       one orbax PyTree item per weight group: {"values"[, "scales"]}
    OUT/kimi_orbax.json        written last: format version and every weight's shape and dtype

Each weight group (the stacked expert gates of all MoE layers, the embedding, ...) is its own orbax
item, so conversion writes one group at a time and host memory stays bounded by the largest
group, never the checkpoint. fp8 values are stored as float8_e4m3fn, scales as float32; INT4 weights
as their packed int32 words and bf16 scales: no dequantization, about the size of the safetensors.

A directory is complete only when `kimi_orbax.json` exists; conversion builds it under a
temporary name and renames it into place, so an interrupted run never looks complete.

Restore reads each group straight into its target sharding (orbax `ArrayRestoreArgs(sharding=)`):
arrays are written in chunks of at most `CHUNK_BYTES`, so a process reads only the chunks that
overlap the shards its own devices hold.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from kimi_jax.checkpoint.hf import CheckpointError
from kimi_jax.config import Config
from kimi_jax.model.quant import INT4, QArray
from kimi_jax.model.weights import Leaf, build_tree, leaves, stored_parts

MARKER = "kimi_orbax.json"
FORMAT = "kimi_jax-orbax"
VERSION = 1
WEIGHTS = "weights"
CHUNK_BYTES = 32 * 1024 * 1024  # tensorstore chunk cap: the unit a process reads on restore
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
ZARR_DTYPES = {"float32": "<f4", "int32": "<i4"}  # zarr v2 type strings; bfloat16 and float8_e4m3fn go by name


def _orbax():
    import orbax.checkpoint as ocp  # imported on use: loading an HF directory never needs it

    return ocp


def item_dir(root: str | os.PathLike, leaf: Leaf) -> Path:
    return Path(root) / WEIGHTS / ".".join(leaf.path)


def expected_parts(cfg: Config, leaf: Leaf) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{"values": (shape, dtype)[, "scales": ...]} of a weight group as stored on disk (fp8 as float8_e4m3fn);
    a padded vocabulary is stored unpadded."""
    parts = stored_parts(cfg, leaf.spec, leaf.shape, FP8)
    if leaf.spec.stored_rows is not None:
        parts = {k: ((leaf.spec.stored_rows, *shape[1:]), dtype) for k, (shape, dtype) in parts.items()}
    return parts


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """True for a converted directory; a CheckpointError for one whose conversion never finished."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    if (path / WEIGHTS).is_dir():
        raise CheckpointError(f"{path} holds orbax weights but no {MARKER}: its conversion did not finish. "
                              "Rerun `python -m kimi_jax.convert` (it starts over safely).")
    return False


# Writing ----------------------------------------------------------------------------------------
def chunk_shape(shape: tuple[int, ...], itemsize: int, stacked: bool) -> list[int]:
    """Storage chunks: one layer deep for a stacked group (written a layer at a time), then leading
    dims halved (experts first, so an expert shard is whole chunks) until a chunk is <= CHUNK_BYTES."""
    chunk = list(shape)
    if stacked and chunk:
        chunk[0] = 1
    d = 0
    while math.prod(chunk) * itemsize > CHUNK_BYTES and d < len(chunk):
        if chunk[d] > 1:
            chunk[d] = math.ceil(chunk[d] / 2)
        else:
            d += 1
    return chunk


def write_group(root: str | os.PathLike, leaf: Leaf, parts: dict[str, tuple[tuple[int, ...], np.dtype]],
                read: Callable[[str, int | None], np.ndarray],
                on_bytes: Callable[[int], None] = lambda n: None) -> int:
    """Write one weight group as an orbax item, a layer at a time; returns the bytes written.

    `parts` gives each part's (shape, dtype); `read(part, i)` returns layer i (keeping the leading
    axis, length 1), or the whole array for i None (an unstacked weight).

    How: orbax writes the item's metadata around a 1-element placeholder per part (plain zarr, no
    OCDBT), then each part's zarr array is recreated at full size with tensorstore and filled layer
    by layer. Orbax takes an array's shape and chunking from the zarr metadata at restore, so the
    result is an ordinary orbax checkpoint, while host memory holds one layer, not the group
    (a Kimi-K2 expert group is 338 GB; one of its layers 5.6 GB).
    """
    import tensorstore as ts

    ocp = _orbax()
    where = item_dir(root, leaf)
    placeholder = {k: np.zeros((1,) * len(shape), dtype) for k, (shape, dtype) in parts.items()}
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as ckpt:
        ckpt.save(where, args=ocp.args.PyTreeSave(placeholder))
    arrays = {}
    for k, (shape, dtype) in parts.items():
        meta = {"shape": list(shape), "chunks": chunk_shape(shape, dtype.itemsize, leaf.layers is not None),
                "dtype": ZARR_DTYPES.get(dtype.name, dtype.name), "compressor": {"id": "zstd", "level": 1},
                "fill_value": None, "order": "C", "dimension_separator": "."}
        arrays[k] = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(where / k)},
                             "metadata": meta}, create=True, delete_existing=True).result()
    total = 0
    for i in range(leaf.shape[0]) if leaf.layers is not None else (None,):
        for k, arr in arrays.items():  # layer-major: a quantizing reader computes each layer once
            host = read(k, i)
            (arr if i is None else arr[i:i + 1]).write(host).result()
            total += host.nbytes
            on_bytes(host.nbytes)
    return total


def write_marker(root: str | os.PathLike, cfg: Config, source: str) -> None:
    """Seal a converted directory: without this file a load refuses it (module docstring)."""
    weights = {leaf.name: {k: {"shape": list(s), "dtype": d.name} for k, (s, d) in expected_parts(cfg, leaf).items()}
               for leaf in leaves(cfg)}
    body = {"format": FORMAT, "version": VERSION, "source": source, "weights": weights}
    tmp = Path(root) / (MARKER + ".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, Path(root) / MARKER)


# Reading ----------------------------------------------------------------------------------------
def check_checkpoint(path: str | os.PathLike, cfg: Config) -> None:
    """Every group the config needs is present with the right shape and dtype, before any data is read."""
    path = Path(path)
    marker = json.loads((path / MARKER).read_text())
    if marker.get("format") != FORMAT or marker.get("version") != VERSION:
        raise CheckpointError(f"{path / MARKER}: format {marker.get('format')!r} version {marker.get('version')!r}, "
                              f"this engine reads {FORMAT!r} version {VERSION}; reconvert with kimi_jax.convert")
    ocp = _orbax()
    with ocp.PyTreeCheckpointer() as ckpt:
        for leaf in leaves(cfg):
            where = item_dir(path, leaf)
            if not where.is_dir():
                raise CheckpointError(f"{path}: weight group '{leaf.name}' is missing ({where}); the directory is "
                                      "damaged or config.json does not belong to it: reconvert")
            try:
                meta = ckpt.metadata(where).item_metadata.tree
            except Exception as e:  # orbax raises many types for a damaged item
                raise CheckpointError(f"{path}: weight group '{leaf.name}' cannot be read ({where}): {e}") from e
            for part, (shape, dtype) in expected_parts(cfg, leaf).items():
                got = meta.get(part)
                if got is None:
                    kind = ("INT4" if leaf.spec.kind == INT4 else "block-fp8") if leaf.spec.quantized else "unquantized"
                    raise CheckpointError(f"{path}: weight group '{leaf.name}' has no '{part}' (config says {kind})")
                if tuple(got.shape) != tuple(shape) or np.dtype(got.dtype) != dtype:
                    raise CheckpointError(f"{path}: '{leaf.name}/{part}' is {np.dtype(got.dtype).name}"
                                          f"{list(got.shape)} but the config implies {dtype.name}{list(shape)}: "
                                          "config.json does not match these weights")


def _to_storage(want: np.dtype) -> Callable[[jax.Array], jax.Array]:
    """fp8 device values -> a backend's storage dtype (uint8 bytes on CPU), in place when possible."""
    if want == FP8:
        return lambda x: x
    # A bitcast keeps the sharding; donating the fp8 buffer lets XLA reuse it, so at most one group is
    # ever held twice.
    cast = jax.jit(lambda x: jax.lax.bitcast_convert_type(x, want), donate_argnums=0)
    return cast


def load_orbax_params(path: str | os.PathLike, cfg: Config,
                      shardings: Callable[[Leaf], Any] | None = None,
                      storage: np.dtype = FP8) -> dict[str, Any]:
    """Restore a converted checkpoint into the engine's tree, one weight group at a time.

    `shardings(leaf)` gives a weight's sharding (a QArray of two for fp8 weights; the sharding
    package's `leaf_sharding`); None puts everything on the default device. fp8 values end in
    `storage` (the backend's `fp8_storage`).
    """
    ocp = _orbax()
    path = Path(path)
    check_checkpoint(path, cfg)
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    to_storage = _to_storage(np.dtype(storage))

    def restore(leaf: Leaf) -> Any:
        sharding = shardings(leaf) if shardings is not None else None
        if leaf.spec.quantized:
            parts = {"values": sharding.values if sharding is not None else single,
                     "scales": sharding.scales if sharding is not None else single}
        else:
            parts = {"values": sharding if sharding is not None else single}
        if leaf.spec.stored_rows is None:
            args = {k: ocp.ArrayRestoreArgs(sharding=s) for k, s in parts.items()}
        else:  # the vocabulary padded for the mesh: restored into the larger shape, zeros after the stored rows
            args = {k: ocp.ArrayRestoreArgs(sharding=s, global_shape=leaf.shape, strict=False)
                    for k, s in parts.items()}
        with ocp.PyTreeCheckpointer() as ckpt:
            out = ckpt.restore(item_dir(path, leaf), args=ocp.args.PyTreeRestore(restore_args=args))
        release_host_memory()
        if leaf.spec.quantized and leaf.spec.kind == INT4:  # int32 words are held as they are stored
            return QArray(out["values"], out["scales"], INT4)
        if leaf.spec.quantized:
            return QArray(to_storage(out["values"]), out["scales"])
        return out["values"]

    return build_tree(cfg, restore)


def release_host_memory() -> None:
    """Give freed heap back to the OS between groups (glibc only; elsewhere a no-op).

    Why: glibc keeps the freed multi-GB buffers of one group (numpy arrays, tensorstore's write
    buffers) in its heap; measured, resident memory then grows by about a third of a group per
    group. `malloc_trim(0)` returns it, keeping the peak at about one group.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def group_bytes(cfg: Config, leaf: Leaf) -> int:
    return sum(int(np.prod(s)) * d.itemsize for s, d in expected_parts(cfg, leaf).values())


def total_bytes(cfg: Config, groups: Iterable[Leaf] | None = None) -> int:
    return sum(group_bytes(cfg, leaf) for leaf in (groups or leaves(cfg)))
