"""Hugging Face checkpoints in the release layout: read straight into the engine's tree, and write.

Reading never builds a full copy of the model on the host: each weight (a stacked group of layers
and experts) is assembled from memory-mapped tensors, placed on its devices, then dropped. With a
sharding, each device's slice is read on its own (`jax.make_array_from_callback`), so a process
touches only the bytes its devices hold.

Tensors of one linear weight `<m>.weight`, by how the config stores it:
  * plain: `<m>.weight` (bf16, f16 or f32);
  * block-fp8: `<m>.weight` (F8_E4M3) and `<m>.weight_scale_inv` (f32);
  * INT4 (compressed-tensors pack-quantized): `<m>.weight_packed` (int32), `<m>.weight_scale` (bf16)
    and `<m>.weight_shape` ([out, in], any integer dtype), checked against the config.
Kimi-K2.5/K2.6 name the text model's tensors `language_model.…` (`Config.weights_prefix`); their
vision tower and projector are skipped with a one-line notice.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from kimi_jax.checkpoint.safetensors import ShardedCheckpointReader, save_file, write_index
from kimi_jax.config import Config
from kimi_jax.model.quant import INT4, QArray, to_storage
from kimi_jax.model.weights import Leaf, ParamSpec, build_tree, leaves, stored_parts

SCALE_SUFFIX = "_scale_inv"  # `<name>.weight` -> `<name>.weight_scale_inv`
INT4_SUFFIXES = {"values": "_packed", "scales": "_scale"}  # `<name>.weight` -> `<name>.weight_packed`, ...
SHAPE_SUFFIX = "_shape"  # `<name>.weight_shape`: an INT4 weight's [out, in]
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)  # how the release stores its quantized weights
FLOAT_SOURCES = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32))
VISION_PREFIXES = ("vision_tower.", "mm_projector.")  # Kimi-K2.5/K2.6's image side: not served


def part_suffixes(spec: ParamSpec) -> dict[str, str]:
    """Suffix of each stored part's tensor name after `<m>.weight` (see the module docstring)."""
    if not spec.quantized:
        return {"values": ""}
    return dict(INT4_SUFFIXES) if spec.kind == INT4 else {"values": "", "scales": SCALE_SUFFIX}


def source_dtypes(spec: ParamSpec, part: str) -> tuple[np.dtype, ...]:
    """The dtypes a checkpoint may hold a part in."""
    if not spec.quantized:
        return FLOAT_SOURCES
    if spec.kind == INT4:
        return (np.dtype(np.int32),) if part == "values" else (np.dtype(ml_dtypes.bfloat16),)
    return (FP8,) if part == "values" else (np.dtype(np.float32),)


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: the tensor, the file and the fix are named."""


def tensor_name(leaf: Leaf, layer: int | None, expert: int | None = None) -> str:
    return leaf.spec.hf.format(layer=layer, expert=expert)


def expected_names(leaf: Leaf) -> list[tuple[tuple[int, ...], str]]:
    """(index into the stacked array, checkpoint tensor name) for every piece of a weight."""
    layers = leaf.layers if leaf.layers is not None else (None,)
    experts = range(leaf.spec.shape[0]) if leaf.spec.per_expert else (None,)
    out = []
    for li, layer in enumerate(layers):
        for expert in experts:
            index = tuple(i for i in (li if layer is not None else None, expert) if i is not None)
            out.append((index, tensor_name(leaf, layer, expert)))
    return out


class HFReader:
    """Validated access to an HF checkpoint directory for one config."""

    def __init__(self, directory: str | os.PathLike, cfg: Config):
        self.directory = Path(directory)
        self.cfg = cfg
        self.files = ShardedCheckpointReader(self.directory)
        self._check_names()

    def _check_names(self) -> None:
        names = set(self.files.keys())
        expected = set()
        for leaf in leaves(self.cfg):
            suffixes = list(part_suffixes(leaf.spec).values()) + ([SHAPE_SUFFIX] if leaf.spec.kind == INT4 else [])
            for _, name in expected_names(leaf):
                expected.update(name + suffix for suffix in suffixes)
        missing = sorted(expected - names)
        if missing:
            raise CheckpointError(
                f"{self.directory}: {len(missing)} tensor(s) the config needs are not in the checkpoint, e.g. "
                f"{missing[:3]}. Check that config.json belongs to these weights (layers, experts, "
                f"quantization_config) and that model.safetensors.index.json lists every shard.")
        extra = names - expected
        vision = sorted(n for n in extra if n.startswith(VISION_PREFIXES))
        if vision:
            warnings.warn(f"{self.directory}: skipping {len(vision)} vision tensor(s) ({', '.join(VISION_PREFIXES)}"
                          "...): kimi_jax serves the text model", stacklevel=3)
        # The release may carry rotary inv_freq buffers and DeepSeek-V3's multi-token-prediction layer.
        mtp = re.compile(re.escape(self.cfg.weights_prefix) + r"model\.layers\.(\d+)\.")
        unknown = sorted(n for n in extra - set(vision) if not n.endswith("rotary_emb.inv_freq")
                         and not ((m := mtp.match(n)) and int(m.group(1)) >= self.cfg.num_hidden_layers))
        if unknown:
            warnings.warn(f"{self.directory}: ignoring {len(unknown)} unexpected tensor(s), e.g. {unknown[:3]}",
                          stacklevel=3)

    def _tensor(self, name: str, want_shape: tuple[int, ...], dtypes: tuple[np.dtype, ...]) -> np.ndarray:
        info = self.files.info(name)
        if tuple(info.shape) != tuple(want_shape):
            raise CheckpointError(f"{self.directory}: tensor '{name}' has shape {list(info.shape)} but the config "
                                  f"implies {list(want_shape)}: config.json does not match these weights")
        if np.dtype(info.dtype) not in dtypes:
            raise CheckpointError(f"{self.directory}: tensor '{name}' has dtype {np.dtype(info.dtype).name}, "
                                  f"expected {' or '.join(d.name for d in dtypes)}")
        return self.files.get(name)

    def check_shapes(self, leaf: Leaf) -> None:
        """Every tensor of a weight has the shape and dtype the config implies, and an INT4 weight's
        `weight_shape` says [out, in] (read from the headers; only `weight_shape` values are read)."""
        spec = leaf.spec
        for part, (shape, _) in stored_parts(self.cfg, spec, leaf.shape).items():
            per_tensor = stored_shape(spec, shape[len(shape) - len(spec.shape) + spec.per_expert:])
            for _, name in expected_names(leaf):
                self._tensor(name + part_suffixes(spec)[part], per_tensor, source_dtypes(spec, part))
        if spec.kind == INT4 and spec.quantized:
            for _, name in expected_names(leaf):
                self.check_int4_shape(name + SHAPE_SUFFIX, spec.shape[-2:])

    def check_int4_shape(self, name: str, want: tuple[int, int]) -> None:
        """`<m>.weight_shape` must hold [out, in] in an integer dtype (compressed-tensors writes int64)."""
        info = self.files.info(name)
        dtype = np.dtype(info.dtype)
        if dtype.kind not in "iu" or tuple(info.shape) != (2,):
            raise CheckpointError(f"{self.directory}: tensor '{name}' is {dtype.name}{list(info.shape)}; an INT4 "
                                  "weight_shape is the weight's [out, in] as 2 integers")
        got = [int(v) for v in np.asarray(self.files.get(name))]
        if got != list(want):
            raise CheckpointError(f"{self.directory}: tensor '{name}' says the weight is {got} but the config "
                                  f"implies {list(want)}: config.json does not match these weights")

    def read(self, leaf: Leaf, part: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The stacked `part` ("values" or "scales") of a weight, or its `index` slice, as a host array."""
        spec = leaf.spec
        full, out_dtype = stored_parts(self.cfg, spec, leaf.shape)[part]
        per_tensor = full[len(full) - len(spec.shape) + spec.per_expert:]  # one checkpoint tensor's shape
        suffix, dtypes = part_suffixes(spec)[part], source_dtypes(spec, part)
        index = index or tuple(slice(None) for _ in full)
        n_stack = len(full) - len(per_tensor)  # leading dims assembled from separate tensors
        stack_ranges = [range(*index[d].indices(full[d])) for d in range(n_stack)]
        inner = index[n_stack:]
        out_shape = tuple(len(r) for r in stack_ranges) + tuple(
            len(range(*s.indices(n))) for s, n in zip(inner, per_tensor))
        out = np.empty(out_shape, out_dtype)
        names = dict(expected_names(leaf))
        stored = stored_shape(spec, per_tensor)
        if stored != per_tensor:  # padded rows (the vocabulary): read the stored ones, zeros after them
            rows = range(*inner[0].indices(per_tensor[0]))
            kept = len([r for r in rows if r < stored[0]])
            out[...] = 0
            if kept:
                part = self._tensor(names[()] + suffix, stored, dtypes)
                out[:kept] = part[(slice(rows.start, rows.start + kept * rows.step, rows.step), *inner[1:])]
            return out
        for pos in np.ndindex(*out_shape[:n_stack]):
            src = tuple(r[i] for r, i in zip(stack_ranges, pos))
            name = names[src] + suffix
            out[pos] = self._tensor(name, per_tensor, dtypes)[inner]  # mmap: only this slice is read
        return out

    def close(self) -> None:
        self.files.close()


def stored_shape(spec, per_tensor: tuple[int, ...]) -> tuple[int, ...]:
    """A checkpoint tensor's shape: `per_tensor` with the stored row count when the rows are padded."""
    return per_tensor if spec.stored_rows is None else (spec.stored_rows, *per_tensor[1:])


Placer = Callable[[Leaf, str, tuple[int, ...], Callable[[Any], np.ndarray]], jax.Array]


def default_placer(leaf: Leaf, part: str, shape: tuple[int, ...], read: Callable[[Any], np.ndarray]) -> jax.Array:
    """Unsharded: the whole stacked weight on the default device."""
    return jnp.asarray(read(None))


def load_hf_params(directory: str | os.PathLike, cfg: Config, placer: Placer = default_placer,
                   storage: np.dtype = FP8) -> dict[str, Any]:
    """Read an HF checkpoint into the engine's parameter tree, one weight at a time.

    `placer(leaf, part, shape, read)` turns a weight into a device array; `read(index)` returns the
    host slice `index` (None: everything), fp8 values already in `storage` (the backend's
    `fp8_storage`: uint8 bytes on CPU). The sharding package provides a placer that reads only each
    device's slice.
    """
    reader = HFReader(directory, cfg)
    try:
        def place(leaf: Leaf) -> Any:
            parts = {}
            for name, (shape, _) in stored_parts(cfg, leaf.spec, leaf.shape).items():
                read = functools.partial(lambda index, name: to_storage(reader.read(leaf, name, index), storage),
                                         name=name)
                parts[name] = placer(leaf, name, shape, read)
            if leaf.spec.quantized:
                if leaf.spec.kind == INT4:  # the packed words' meaning rests on weight_shape: check it
                    for _, tensor in expected_names(leaf):
                        reader.check_int4_shape(tensor + SHAPE_SUFFIX, leaf.spec.shape[-2:])
                return QArray(parts["values"], parts["scales"], leaf.spec.kind)
            return parts["values"]

        return build_tree(cfg, place)
    finally:
        reader.close()


# Writing ----------------------------------------------------------------------------------------
def hf_tensors(params: dict[str, Any], cfg: Config):
    """Yield (checkpoint name, host array) for every tensor of a parameter tree, in release layout."""
    for leaf in leaves(cfg):
        node = params
        for k in leaf.path:
            node = node[k]
        for index, name in expected_names(leaf):
            if isinstance(node, QArray) and node.kind == INT4:
                yield name + INT4_SUFFIXES["values"], np.asarray(node.values[index])
                yield name + INT4_SUFFIXES["scales"], np.asarray(node.scales[index])
                yield name + SHAPE_SUFFIX, np.asarray(leaf.spec.shape[-2:], np.int64)  # as compressed-tensors
            elif isinstance(node, QArray):
                yield name, np.asarray(node.values[index]).view(ml_dtypes.float8_e4m3fn)
                yield name + SCALE_SUFFIX, np.asarray(node.scales[index])
            else:
                yield name, np.asarray(node[index])[:leaf.spec.stored_rows]  # a padded vocabulary unpadded


def save_hf_checkpoint(params: dict[str, Any], cfg: Config, directory: str | os.PathLike,
                       num_shards: int = 2) -> Path:
    """Write `params` as config.json + `model-N-of-M.safetensors` shards + the index, as the release does.

    Tensors are spread over shards in order, each shard holding about total/num_shards bytes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = list(hf_tensors(params, cfg))
    total = sum(a.nbytes for _, a in tensors)
    per_shard = math.ceil(total / num_shards)
    weight_map: dict[str, str] = {}
    shard, batch, size = 1, {}, 0

    def flush():
        nonlocal shard, batch, size
        fname = f"model-{shard}-of-{num_shards}.safetensors"
        save_file(batch, directory / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in batch})
        shard, batch, size = shard + 1, {}, 0

    for i, (name, arr) in enumerate(tensors):
        batch[name] = arr
        size += arr.nbytes
        left_tensors, left_shards = len(tensors) - i - 1, num_shards - shard
        if shard < num_shards and (size >= per_shard or left_tensors == left_shards) and left_tensors > 0:
            flush()
    flush()
    write_index(directory, weight_map, total)
    (directory / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    return directory
