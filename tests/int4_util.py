"""Small checkpoints in the exact Kimi-K2-Thinking INT4 layout, quantized and packed by compressed-tensors.

The routed experts are quantized by compressed-tensors' own code (its min-max group scale, rounded to
bf16 as the release stores it, then `PackedQuantizationCompressor.compress`), so the engine is
checked against the format's reference implementation rather than against its own packer. The
rest is random bf16, as in the release. Written with kimi_jax's writer (release names, shards,
index, config.json with the compressed-tensors quantization_config).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np

from kimi_jax.checkpoint.hf import save_hf_checkpoint
from kimi_jax.checkpoint.safetensors import INDEX_FILENAME, save_file
from kimi_jax.config import K25_PREFIX, Config
from kimi_jax.model.quant import INT4, QArray
from kimi_jax.model.weights import leaves, random_params


def ct_scheme(group: int):
    """compressed-tensors' W4A16 scheme as the Thinking release declares it."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group,
                            dynamic=False, observer="minmax")
    return QuantizationScheme(targets=["Linear"], weights=args)


def ct_quantize(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """One weight [out, in] -> (weight_packed int32 [out, in/8], weight_scale bf16 [out, in/group]),
    computed by compressed-tensors."""
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = ct_scheme(group)
    x = torch.from_numpy(np.asarray(w, np.float32))
    blocks = x.reshape(x.shape[0], -1, group)
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), scheme.weights)
    scale = scale.to(torch.bfloat16)  # the release stores bf16 scales; quantize against exactly those
    out = PackedQuantizationCompressor.compress({"weight": x, "weight_scale": scale}, scheme)
    assert out["weight_packed"].dtype == torch.int32 and list(out["weight_shape"]) == list(w.shape)
    scale_bf16 = out["weight_scale"].float().numpy().astype(ml_dtypes.bfloat16)
    return out["weight_packed"].numpy(), scale_bf16


def int4_params(cfg: Config, seed: int = 0, std: float = 0.05) -> dict:
    """Random params for an INT4 config: bf16 where the config keeps bf16, compressed-tensors INT4
    where it says INT4 (one compress call per expert matrix, as the release was written)."""
    params = random_params(dataclasses.replace(cfg, int4=None, weight_block_size=None), seed, std)
    for leaf in leaves(cfg):
        if leaf.spec.kind != INT4 or not leaf.spec.quantized:
            continue
        node = params
        for k in leaf.path[:-1]:
            node = node[k]
        w = np.asarray(node[leaf.path[-1]], np.float32)  # (layers, experts, out, in)
        packed = np.empty((*w.shape[:-1], w.shape[-1] // 8), np.int32)
        scales = np.empty((*w.shape[:-1], w.shape[-1] // cfg.int4.group_size), ml_dtypes.bfloat16)
        for index in np.ndindex(*w.shape[:-2]):
            packed[index], scales[index] = ct_quantize(w[index], cfg.int4.group_size)
        node[leaf.path[-1]] = QArray(packed, scales, INT4)
    return params


def write_int4_checkpoint(cfg: Config, directory: Path, seed: int = 0, num_shards: int = 3) -> tuple[Path, dict]:
    """The checkpoint and its params; with the `language_model.` prefix (`cfg.weights_prefix`) it is
    laid out as Kimi-K2.5/K2.6: nested text_config, plus vision tensors the loader must skip. Every
    layout also carries the rotary inv_freq buffers the Thinking release ships."""
    params = int4_params(cfg, seed)
    save_hf_checkpoint(params, cfg, directory, num_shards=num_shards)
    extra = {f"{cfg.weights_prefix}model.layers.{i}.self_attn.rotary_emb.inv_freq":
             np.ones(cfg.qk_rope_head_dim // 2, np.float32) for i in range(cfg.num_hidden_layers)}
    if cfg.weights_prefix == K25_PREFIX:
        extra["vision_tower.encoder.blocks.0.wqkv.weight"] = np.zeros((8, 4), ml_dtypes.bfloat16)
        extra["mm_projector.proj.0.weight"] = np.zeros((4, 4), ml_dtypes.bfloat16)
    save_file(extra, directory / "model-extra.safetensors", metadata={"format": "pt"})
    index = json.loads((directory / INDEX_FILENAME).read_text())
    index["weight_map"].update({name: "model-extra.safetensors" for name in extra})
    (directory / INDEX_FILENAME).write_text(json.dumps(index, indent=2))
    return directory, params


def checkpoint_tensors(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory, read with the `safetensors` package (not kimi_jax's reader)."""
    from safetensors.numpy import load_file

    index = json.loads((directory / INDEX_FILENAME).read_text())
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(directory / shard))
    return out
