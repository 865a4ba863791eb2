"""The oracle: Hugging Face transformers' DeepseekV3ForCausalLM with the same (dequantized) weights.

Used by the parity tests and the benchmarks. transformers does not know `model_type: kimi_k2`, so
the DeepseekV3Config is built from the engine's config values. torch is imported lazily: the engine
itself never needs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kimi_jax.checkpoint.hf import SCALE_SUFFIX, hf_tensors
from kimi_jax.config import Config
from kimi_jax.model.quant import QArray, dequantize


def hf_config(cfg: Config):
    """A transformers DeepseekV3Config with the engine config's values."""
    from transformers import DeepseekV3Config

    d = cfg.to_hf_dict()
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


def hf_state_dict(params: dict[str, Any], cfg: Config, dtype=None) -> dict[str, Any]:
    """The engine's params as a transformers state dict: fp8 weights dequantized, experts fused."""
    import torch

    dtype = dtype or torch.float32
    tensors = dict(hf_tensors(params, cfg))
    out: dict[str, Any] = {}
    for name, arr in tensors.items():
        if name.endswith(SCALE_SUFFIX) or ".experts." in name:
            continue
        if name + SCALE_SUFFIX in tensors:
            arr = dequantize(QArray(arr, tensors[name + SCALE_SUFFIX]), np.float32, cfg.weight_block_size)
        out[name] = torch.from_numpy(np.array(arr, np.float32)).to(dtype)  # a writable copy
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        def expert(e: int, proj: str, layer: int = layer) -> np.ndarray:
            name = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
            w = tensors[name]
            if name + SCALE_SUFFIX in tensors:
                w = dequantize(QArray(w, tensors[name + SCALE_SUFFIX]), np.float32, cfg.weight_block_size)
            return np.asarray(w, np.float32)

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
    import torch
    from transformers import DeepseekV3ForCausalLM

    dtype = dtype or torch.float32
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf_config(cfg)).to(dtype).eval()
    missing, unexpected = model.load_state_dict(hf_state_dict(params, cfg, dtype), strict=False)
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
