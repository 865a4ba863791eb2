"""Hugging Face checkpoints in the release layout: read straight into the engine's tree, and write.

Reading never builds a full copy of the model on the host: each weight (a stacked group of layers
and experts) is assembled from memory-mapped tensors, placed on its devices, then dropped. With a
sharding, each device's slice is read on its own (`jax.make_array_from_callback`), so a process
touches only the bytes its devices hold.
"""

from __future__ import annotations

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
from kimi_jax.model.quant import QArray, to_storage
from kimi_jax.model.weights import Leaf, build_tree, leaves, scale_shape

SCALE_SUFFIX = "_scale_inv"  # `<name>.weight` -> `<name>.weight_scale_inv`
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)  # how the release stores its quantized weights
FLOAT_SOURCES = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32))


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
            for _, name in expected_names(leaf):
                expected.add(name)
                if leaf.spec.quantized:
                    expected.add(name + SCALE_SUFFIX)
        missing = sorted(expected - names)
        if missing:
            raise CheckpointError(
                f"{self.directory}: {len(missing)} tensor(s) the config needs are not in the checkpoint, e.g. "
                f"{missing[:3]}. Check that config.json belongs to these weights (layers, experts, "
                f"quantization_config) and that model.safetensors.index.json lists every shard.")
        extra = names - expected
        # The release may carry rotary inv_freq buffers and DeepSeek-V3's multi-token-prediction layer.
        mtp = re.compile(r"model\.layers\.(\d+)\.")
        unknown = sorted(n for n in extra if not n.endswith("rotary_emb.inv_freq")
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

    def read(self, leaf: Leaf, part: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The stacked `part` ("values" or "scales") of a weight, or its `index` slice, as a host array."""
        spec = leaf.spec
        if part == "scales":
            full = scale_shape(leaf.shape, self.cfg.weight_block_size)
            per_tensor, suffix, dtypes, out_dtype = full[-2:], SCALE_SUFFIX, (np.dtype(np.float32),), np.float32
        elif spec.quantized:
            full = leaf.shape
            per_tensor, suffix, dtypes = full[-2:], "", (np.dtype(ml_dtypes.float8_e4m3fn),)
            out_dtype = ml_dtypes.float8_e4m3fn
        else:
            full = leaf.shape
            per_tensor, suffix, dtypes = spec.shape[1:] if spec.per_expert else spec.shape, "", FLOAT_SOURCES
            out_dtype = ml_dtypes.bfloat16 if spec.dtype == "bfloat16" else np.float32
        index = index or tuple(slice(None) for _ in full)
        n_stack = len(full) - len(per_tensor)  # leading dims assembled from separate tensors
        stack_ranges = [range(*index[d].indices(full[d])) for d in range(n_stack)]
        inner = index[n_stack:]
        out_shape = tuple(len(r) for r in stack_ranges) + tuple(
            len(range(*s.indices(n))) for s, n in zip(inner, per_tensor))
        out = np.empty(out_shape, out_dtype)
        names = dict(expected_names(leaf))
        for pos in np.ndindex(*out_shape[:n_stack]):
            src = tuple(r[i] for r, i in zip(stack_ranges, pos))
            name = names[src] + suffix
            out[pos] = self._tensor(name, per_tensor, dtypes)[inner]  # mmap: only this slice is read
        return out

    def close(self) -> None:
        self.files.close()


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
            def part(name: str, shape: tuple[int, ...]) -> jax.Array:
                return placer(leaf, name, shape, lambda index: to_storage(reader.read(leaf, name, index), storage))

            if leaf.spec.quantized:
                return QArray(part("values", leaf.shape),
                              part("scales", scale_shape(leaf.shape, cfg.weight_block_size)))
            return part("values", leaf.shape)

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
            if isinstance(node, QArray):
                yield name, np.asarray(node.values[index]).view(ml_dtypes.float8_e4m3fn)
                yield name + SCALE_SUFFIX, np.asarray(node.scales[index])
            else:
                yield name, np.asarray(node[index])


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
