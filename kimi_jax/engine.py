"""The public model object: `kimi_jax.load(path)` -> `Model` with `.config` and `.logits(tokens)`."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.checkpoint import load_hf_params
from kimi_jax.config import Config
from kimi_jax.model import Transformer

DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32}


def compute_dtype(dtype: str | Any) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


class Model:
    """A loaded model: config, parameters (fp8 weights stay fp8 on device), compiled forward passes."""

    def __init__(self, config: Config, params: dict[str, Any], dtype: str | Any = "bfloat16",
                 mesh: Any = None, backend: str | None = None):
        self.config = config
        self.params = params
        self.dtype = compute_dtype(dtype)
        self.mesh = mesh
        self.backend = backend
        self._module = Transformer(config, absorb=False, backend=backend, dtype=self.dtype)

    @functools.cached_property
    def _forward(self):
        def forward(params, tokens, positions):
            return self._module.apply({"params": params}, tokens, positions)[0]

        return jax.jit(forward)

    def logits(self, token_ids) -> np.ndarray:
        """int [B, T] (or [T]) -> float32 numpy [B, T, vocab]: a causal forward pass with no cache."""
        tokens = np.asarray(token_ids)
        squeeze = tokens.ndim == 1
        tokens = np.atleast_2d(tokens).astype(np.int32)
        if tokens.ndim != 2:
            raise ValueError(f"token_ids must be [batch, time] or [time], got shape {tokens.shape}")
        b, t = tokens.shape
        if t > self.config.max_position_embeddings:
            raise ValueError(f"{t} tokens exceed the context of {self.config.max_position_embeddings} "
                             "(max_position_embeddings); shorten the input")
        bad = (tokens < 0) | (tokens >= self.config.vocab_size)
        if bad.any():
            raise ValueError(f"token id {int(tokens[bad][0])} is outside the vocabulary [0, {self.config.vocab_size})")
        positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
        out = np.asarray(jax.block_until_ready(self._forward(self.params, tokens, positions)))
        return out[0] if squeeze else out


def load(path: str | os.PathLike, dtype: str | Any = "bfloat16", mesh: Any = None,
         backend: str | None = None) -> Model:
    """Load a Hugging Face checkpoint directory (config.json + safetensors shards).

    dtype: compute dtype ("bfloat16", or "float32" for exact parity). Block-fp8 weights stay
    float8_e4m3fn with their scales and are dequantized inside the compiled forward, one layer at a
    time. `mesh` (a spec string, dict or `jax.sharding.Mesh`) shards the model over devices.
    backend: routed-expert kernel ("grouped" or "ragged"; default: chosen for the platform).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config = Config.from_json(path)
    if mesh is not None:
        raise NotImplementedError("mesh= arrives with the sharding package")
    params = load_hf_params(path, config)
    return Model(config, params, dtype=dtype, mesh=mesh, backend=backend)
