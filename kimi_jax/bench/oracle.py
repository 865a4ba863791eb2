"""The oracle: Hugging Face transformers' DeepseekV3ForCausalLM with the same (dequantized) weights.

Used by the parity tests and the benchmarks. transformers does not know `model_type: kimi_k2`, so
the DeepseekV3Config is built from the engine's config values. INT4 weights (compressed-tensors
pack-quantized) are dequantized by compressed-tensors itself, in float32. torch and compressed-tensors
are imported lazily: the engine itself never needs them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from kimi_jax.checkpoint.hf import INT4_SUFFIXES, SCALE_SUFFIX, SHAPE_SUFFIX, VISION_PREFIXES, hf_tensors
from kimi_jax.config import Config
from kimi_jax.model.quant import QArray, dequantize

PACKED, INT4_SCALE = INT4_SUFFIXES["values"], INT4_SUFFIXES["scales"]


def hf_config(cfg: Config):
    """A transformers DeepseekV3Config with the engine config's values."""
    from transformers import DeepseekV3Config

    d = dataclasses.replace(cfg, weights_prefix="").to_hf_dict()  # the text model's values, unwrapped
    d.pop("quantization_config", None)  # the oracle runs on dequantized weights
    d.pop("model_type", None)
    d.pop("architectures", None)
    rope = d.pop("rope_scaling", None)
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if rope is not None:
        rope.pop("type")
        rope_parameters = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, **rope}
    return DeepseekV3Config(**d, rope_parameters=rope_parameters, rope_interleave=True,
                            attn_implementation="eager")


def int4_dequantized(tensors: dict[str, np.ndarray], name: str, cfg: Config) -> np.ndarray:
    """`<name>_packed/_scale/_shape` -> the float32 weight, unpacked and scaled by compressed-tensors."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=cfg.int4.group_size)
    shape = torch.Size(int(v) for v in tensors[name + SHAPE_SUFFIX])
    q = unpack_from_int32(torch.from_numpy(np.asarray(tensors[name + PACKED])), 4, shape)
    scale = torch.from_numpy(np.asarray(tensors[name + INT4_SCALE], np.float32))  # bf16 -> f32 is exact
    return ct_dequantize(q, scale, args=args, dtype=torch.float32).numpy()


def _weight(tensors: dict[str, np.ndarray], name: str, cfg: Config) -> np.ndarray:
    """One weight in float32, dequantized from whichever layout the tensors hold it in."""
    if name + PACKED in tensors:
        return int4_dequantized(tensors, name, cfg)
    w = tensors[name]
    if name + SCALE_SUFFIX in tensors:
        w = dequantize(QArray(w, tensors[name + SCALE_SUFFIX]), np.float32, cfg.weight_block_size)
    return np.array(w, np.float32)  # a writable copy


def hf_state_dict(params: dict[str, Any], cfg: Config, dtype=None) -> dict[str, Any]:
    """The engine's params as a transformers state dict: quantized weights dequantized, experts fused."""
    return state_dict_from_tensors(dict(hf_tensors(params, cfg)), cfg, dtype)


def state_dict_from_tensors(tensors: dict[str, np.ndarray], cfg: Config, dtype=None) -> dict[str, Any]:
    """A checkpoint's tensors (release names, any layout kimi_jax reads) as a transformers state dict.

    The `language_model.` prefix of K2.5/K2.6 is dropped, vision tensors and rotary buffers skipped.
    """
    import torch

    dtype = dtype or torch.float32
    p = cfg.weights_prefix
    tensors = {k.removeprefix(p): v for k, v in tensors.items()
               if k.startswith(p) and not k.startswith(VISION_PREFIXES) and not k.endswith("inv_freq")}
    cfg = dataclasses.replace(cfg, weights_prefix="")
    suffixes = (SCALE_SUFFIX, PACKED, INT4_SCALE, SHAPE_SUFFIX)
    names = {n.removesuffix(s) for n in tensors for s in suffixes if n.endswith(s)} | {
        n for n in tensors if not n.endswith(suffixes)}
    out: dict[str, Any] = {}
    for name in sorted(names):
        if ".experts." not in name:
            out[name] = torch.from_numpy(_weight(tensors, name, cfg)).to(dtype)
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        def expert(e: int, proj: str, layer: int = layer) -> np.ndarray:
            return _weight(tensors, f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight", cfg)

        experts = range(cfg.n_routed_experts)
        gate_up = np.stack([np.concatenate([expert(e, "gate_proj"), expert(e, "up_proj")]) for e in experts])
        down = np.stack([expert(e, "down_proj") for e in experts])
        prefix = f"model.layers.{layer}.mlp.experts."
        out[prefix + "gate_up_proj"] = torch.from_numpy(gate_up).to(dtype)
        out[prefix + "down_proj"] = torch.from_numpy(down).to(dtype)
        # transformers keeps the router in float32 whatever the model dtype.
        for n in ("gate.weight", "gate.e_score_correction_bias"):
            key = f"model.layers.{layer}.mlp.{n}"
            out[key] = out[key].to(torch.float32)
    return out


def hf_model(params: dict[str, Any], cfg: Config, dtype=None):
    """A DeepseekV3ForCausalLM (eval mode) holding exactly the engine's weight values."""
    return hf_model_from_tensors(dict(hf_tensors(params, cfg)), cfg, dtype)


def hf_model_from_tensors(tensors: dict[str, np.ndarray], cfg: Config, dtype=None):
    """A DeepseekV3ForCausalLM (eval mode) from a checkpoint's tensors (`state_dict_from_tensors`)."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    dtype = dtype or torch.float32
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf_config(cfg)).to(dtype).eval()
    missing, unexpected = model.load_state_dict(state_dict_from_tensors(tensors, cfg, dtype), strict=False)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"transformers layout drifted: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def hf_logits(model, token_ids: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] float32 from the oracle for int tokens [B, T]."""
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(token_ids, np.int64)))
    return out.logits.float().numpy()
