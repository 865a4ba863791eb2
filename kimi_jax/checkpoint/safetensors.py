"""A small, validating reader/writer for the safetensors format (never pickle).

Layout of a file: an 8-byte little-endian u64 header length N, N bytes of UTF-8 JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
then the data buffer; offsets are relative to the start of the data buffer.

Reading maps the file with `mmap` and hands out read-only numpy views, so opening a 10 GB
shard costs nothing until pages are touched. The whole header is validated before any
tensor data is mapped: a corrupt or truncated download fails at open with a message that
names the file and the tensor, not later with a segfault or silently wrong weights.

Assumes a little-endian host (x86, ARM, TPU hosts), as the format stores little-endian data.
"""

from __future__ import annotations

import difflib
import json
import math
import mmap
import os
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

INDEX_FILENAME = "model.safetensors.index.json"
SINGLE_FILENAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # same cap as the reference implementation

DTYPES: dict[str, np.dtype] = {name: np.dtype(t) for name, t in [
    ("BOOL", np.bool_), ("U8", np.uint8), ("I8", np.int8), ("U16", np.uint16),
    ("I16", np.int16), ("U32", np.uint32), ("I32", np.int32), ("U64", np.uint64),
    ("I64", np.int64), ("F16", np.float16), ("BF16", ml_dtypes.bfloat16), ("F32", np.float32),
    ("F64", np.float64), ("F8_E4M3", ml_dtypes.float8_e4m3fn), ("F8_E5M2", ml_dtypes.float8_e5m2),
]}
_DTYPE_NAMES: dict[np.dtype, str] = {dt: name for name, dt in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file or index is malformed; the message names the file and tensor."""


class TensorInfo(NamedTuple):
    """What the header says about one tensor, without touching its data."""

    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int


class _Entry(NamedTuple):
    info: TensorInfo
    begin: int
    end: int


def _close_names(name: str, names: Any) -> str:
    close = difflib.get_close_matches(name, list(names), n=5, cutoff=0.6)
    return f"; close names: {close}" if close else ""


def _is_int(x: Any) -> bool:
    return type(x) is int  # bool is an int subclass, but True is not a valid dimension


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last duplicate silently; a repeated tensor name would shadow data.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise SafetensorsError(f"duplicate key {key!r} in header")
        out[key] = value
    return out


def _parse_entry(fname: str, name: str, raw: Any) -> _Entry:
    where = f"{fname}: tensor {name!r}"
    if not isinstance(raw, dict) or not {"dtype", "shape", "data_offsets"} <= raw.keys():
        raise SafetensorsError(
            f"{where}: expected an object with 'dtype', 'shape' and 'data_offsets', found {raw!r}")
    dtype_name, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if dtype_name not in DTYPES:
        raise SafetensorsError(
            f"{where}: unknown dtype {dtype_name!r}; expected one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise SafetensorsError(f"{where}: shape must be a list of non-negative ints, found {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise SafetensorsError(f"{where}: data_offsets must be two ints [begin, end], found {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise SafetensorsError(f"{where}: data_offsets must satisfy 0 <= begin <= end, found {offsets!r}")
    dtype = DTYPES[dtype_name]
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise SafetensorsError(
            f"{where} needs {nbytes} bytes (shape {shape}, {dtype_name}) "
            f"but its data_offsets span {end - begin}")
    return _Entry(TensorInfo(dtype, tuple(shape), nbytes), begin, end)


class SafetensorsFile:
    """A validated, memory-mapped view of one `.safetensors` file.

    Lifetime: arrays from `get`/`get_slice` are read-only views into the file's mmap and keep
    the mapping alive through their `.base` chain. `close()` drops this object's reference;
    if views still exist the mapping is unmapped when the last of them is garbage-collected,
    so a view can never point at unmapped memory. Call `close()` (or use `with`) after use.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        self._mmap: mmap.mmap | None = None
        with open(self.path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            self._data_start, self._metadata, self._entries = self._read_header(f, file_size)
            # Map only after the header proved every tensor lies inside the file.
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def _read_header(self, f: Any, file_size: int) -> tuple[int, dict[str, str], dict[str, _Entry]]:
        fname = self.name
        if file_size < 8:
            raise SafetensorsError(
                f"{fname}: file is {file_size} bytes, too short for the 8-byte header length "
                f"— re-download the shard")
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise SafetensorsError(
                f"{fname}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit "
                f"— not a safetensors file, or corrupt")
        if n > file_size - 8:
            raise SafetensorsError(
                f"{fname}: header length {n} is beyond the end of the file ({file_size} bytes) "
                f"— file is truncated or not a safetensors file")
        try:
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_reject_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{fname}: header is not valid UTF-8 JSON: {e}") from None
        except SafetensorsError as e:
            raise SafetensorsError(f"{fname}: {e}") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{fname}: header must be a JSON object, found {type(header).__name__}")

        metadata = header.pop("__metadata__", None)
        metadata = {} if metadata is None else metadata  # the reference writes null for none
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise SafetensorsError(f"{fname}: __metadata__ must map str to str, found {metadata!r}")

        data_start, data_size = 8 + n, file_size - 8 - n
        entries = {name: _parse_entry(fname, name, raw) for name, raw in header.items()}

        # Overlap check: sort by begin; zero-byte tensors occupy nothing and may sit anywhere.
        spans = sorted((e.begin, e.end, name) for name, e in entries.items() if e.end > e.begin)
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise SafetensorsError(
                    f"{fname}: tensor {n1!r} data_offsets [{b1}, {e1}] overlap tensor {n0!r} "
                    f"[{b0}, {e0}]; expected disjoint ranges")
        if entries:
            last_end, last_name = max((e.end, name) for name, e in entries.items())
            if last_end > data_size:
                raise SafetensorsError(
                    f"{fname}: file is truncated: header says data ends at byte "
                    f"{data_start + last_end} (end of tensor {last_name!r}) but the file has "
                    f"{file_size} bytes — re-download the shard")
        return data_start, metadata, entries

    # -- queries -----------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def metadata(self) -> dict[str, str]:
        """A copy of the `__metadata__` string map (empty if the file has none)."""
        return dict(self._metadata)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r} among {len(self._entries)} tensors"
                           f"{_close_names(name, self._entries)}") from None

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and byte size of `name`, read from the header only."""
        return self._entry(name).info

    def get(self, name: str) -> np.ndarray:
        """A zero-copy, read-only view of `name`; pages are read from disk only when touched."""
        entry = self._entry(name)
        if self._mmap is None:
            raise ValueError(f"{self.path}: file is closed")
        dtype, shape, nbytes = entry.info
        if nbytes == 0:
            empty = np.empty(shape, dtype)
            empty.flags.writeable = False
            return empty
        flat = np.frombuffer(self._mmap, dtype=dtype, count=nbytes // dtype.itemsize,
                             offset=self._data_start + entry.begin)
        return flat.reshape(shape)

    def get_slice(self, name: str, index: Any) -> np.ndarray:
        """A zero-copy view of `get(name)[index]` for basic indexing of the leading dims.

        `index` is an int, a slice, or a tuple of those (at most ndim long). Advanced indexing
        (lists, arrays) would copy the whole tensor, so it is rejected.
        """
        idx = index if isinstance(index, tuple) else (index,)
        shape = self._entry(name).info.shape
        if len(idx) > len(shape) or not all(
                isinstance(i, slice) or isinstance(i, (int, np.integer)) and not isinstance(i, bool)
                for i in idx):
            raise TypeError(f"{self.path}: tensor {name!r} (shape {list(shape)}): get_slice takes "
                            f"ints and slices for at most {len(shape)} leading dims, got {index!r}")
        try:
            return self.get(name)[idx]
        except IndexError as e:
            raise IndexError(f"{self.path}: tensor {name!r} (shape {list(shape)}): {e}") from None

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Release the mapping; live views keep it mapped until they are collected."""
        mm, self._mmap = self._mmap, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views still export the buffer; mmap unmaps itself when they die

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._mmap is None else "open"
        return f"SafetensorsFile({self.path!r}, {len(self._entries)} tensors, {state})"


# -- writing --------------------------------------------------------------------------------


def _as_little_endian(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype not in _DTYPE_NAMES:
        raise SafetensorsError(
            f"tensor {name!r}: dtype {arr.dtype} has no safetensors equivalent; "
            f"supported: {sorted(str(d) for d in _DTYPE_NAMES)}")
    return np.ascontiguousarray(arr)


def _write_array(f: Any, arr: np.ndarray) -> None:
    # A uint8 view is a buffer every dtype (bf16, fp8 included) can hand to write() uncopied.
    f.write(arr.reshape(-1).view(np.uint8))


def _atomic_write(path: str, write: Any) -> None:
    # Write beside the target and rename: a crash leaves at most a `.tmp`, never a short file
    # under the real name that a later run would take for a complete checkpoint.
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` to `path` in safetensors format, atomically.

    Tensors are laid out C-contiguous in sorted-name order; the JSON header is padded with
    spaces to a multiple of 8 bytes, as the reference implementation does.
    """
    path = os.fspath(path)
    arrays: dict[str, np.ndarray] = {}
    for name in sorted(tensors):
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise SafetensorsError(f"{path}: invalid tensor name {name!r}")
        arrays[name] = _as_little_endian(name, tensors[name])
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise SafetensorsError(f"{path}: metadata must map str to str, found {dict(metadata)!r}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, arr in arrays.items():
        header[name] = {"dtype": _DTYPE_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)

    def write(f: Any) -> None:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for arr in arrays.values():
            _write_array(f, arr)

    _atomic_write(path, write)


# -- sharded checkpoints --------------------------------------------------------------------


def read_index(directory: str | os.PathLike) -> dict[str, str]:
    """Map every tensor name to its shard filename for a checkpoint directory.

    Reads `model.safetensors.index.json` (`{"metadata": ..., "weight_map": {name: shard}}`);
    without one, falls back to a single `model.safetensors`. Every referenced shard must exist.
    """
    directory = os.fspath(directory)
    index_path = os.path.join(directory, INDEX_FILENAME)
    if not os.path.exists(index_path):
        single = os.path.join(directory, SINGLE_FILENAME)
        if not os.path.exists(single):
            raise FileNotFoundError(
                f"{directory}: neither {INDEX_FILENAME} nor {SINGLE_FILENAME} found "
                f"— is this a Hugging Face safetensors checkpoint directory?")
        with SafetensorsFile(single) as f:
            return {name: SINGLE_FILENAME for name in f.keys()}

    with open(index_path, "rb") as fh:
        try:
            index = json.loads(fh.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{index_path}: not valid UTF-8 JSON: {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise SafetensorsError(f"{index_path}: expected {{'weight_map': {{tensor: shard_file}}}}, "
                               f"found {str(index)[:200]}")
    shards = sorted(set(weight_map.values()))
    # A shard name is a bare filename; anything else could read outside the checkpoint.
    bad = [s for s in shards if os.path.basename(s) != s or s in ("", ".", "..")]
    if bad:
        raise SafetensorsError(f"{index_path}: shard names must be bare filenames, found {bad[:5]}")
    missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
    if missing:
        raise FileNotFoundError(
            f"{index_path}: {len(missing)} of {len(shards)} shard files are missing from "
            f"{directory}: {missing[:10]}{' ...' if len(missing) > 10 else ''} "
            f"— the download is incomplete")
    return dict(weight_map)


def write_index(directory: str | os.PathLike, weight_map: Mapping[str, str], total_size: int) -> str:
    """Write `model.safetensors.index.json` (atomically) and return its path."""
    path = os.path.join(os.fspath(directory), INDEX_FILENAME)
    index = {"metadata": {"total_size": int(total_size)},
             "weight_map": dict(sorted(weight_map.items()))}
    data = (json.dumps(index, indent=2) + "\n").encode("utf-8")
    _atomic_write(path, lambda f: f.write(data))
    return path


class ShardedCheckpointReader:
    """Read tensors from a sharded checkpoint directory, opening each shard on first use.

    Shards stay open (memory-mapped) until `close()`; arrays returned by `get` are zero-copy
    views with the lifetime described in `SafetensorsFile`.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self.weight_map = read_index(self.directory)
        self._files: dict[str, SafetensorsFile] = {}
        self._lock = threading.Lock()  # loaders may fetch tensors from a thread pool

    def _shard(self, name: str) -> SafetensorsFile:
        shard = self.weight_map.get(name)
        if shard is None:
            raise KeyError(f"{self.directory}: the index has no tensor {name!r} among "
                           f"{len(self.weight_map)} tensors{_close_names(name, self.weight_map)}")
        with self._lock:
            if shard not in self._files:
                self._files[shard] = SafetensorsFile(os.path.join(self.directory, shard))
            f = self._files[shard]
        if name not in f:
            raise KeyError(f"{self.directory}: the index says tensor {name!r} is in {shard}, "
                           f"but that shard has no such tensor — the index and shards disagree"
                           f"{_close_names(name, f.keys())}")
        return f

    def get(self, name: str) -> np.ndarray:
        """A zero-copy, read-only view of tensor `name` from whichever shard holds it."""
        return self._shard(name).get(name)

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and byte size of `name` (opens its shard's header, reads no data)."""
        return self._shard(name).info(name)

    def __contains__(self, name: object) -> bool:
        return name in self.weight_map

    def keys(self) -> list[str]:
        """All tensor names listed by the index."""
        return list(self.weight_map)

    def close(self) -> None:
        """Close every opened shard."""
        with self._lock:
            files, self._files = self._files, {}
        for f in files.values():
            f.close()

    def __enter__(self) -> ShardedCheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
