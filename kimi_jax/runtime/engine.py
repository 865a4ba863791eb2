"""The public model object: `kimi_jax.load(path)` -> `Model` with `.config` and `.logits(tokens)`."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax import kernels
from kimi_jax.checkpoint.hf import load_hf_params
from kimi_jax.checkpoint.orbax import is_orbax_checkpoint, load_orbax_params
from kimi_jax.config import Config
from kimi_jax.model.backend import Backend
from kimi_jax.model.decoder import Transformer
from kimi_jax.model.layout import UNSHARDED, Layout
from kimi_jax.runtime import generation
from kimi_jax.runtime.requests import make_requests
from kimi_jax.runtime.sampling import DEFAULT_TEMPERATURE
from kimi_jax.text.tokenizer import load_tokenizer
from sharding import MeshLayout
from sharding.rules import leaf_sharding

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
                 mesh: Any = None, backend: Backend | str | None = None, tokenizer: Any = None, rules: Any = None):
        self.tokenizer = tokenizer  # a kimi_jax.text.tokenizer.Tokenizer, or None
        self.dtype = compute_dtype(dtype)
        # On a mesh: `layout` maps the model's logical axes to devices (sharding.MeshLayout);
        # `mesh` is the jax.sharding.Mesh. Params already placed by `load` stay where they are.
        self.layout = UNSHARDED if mesh is None else mesh_layout(mesh, config, rules)
        self.mesh = getattr(self.layout, "mesh", None)
        # A vocabulary the mesh does not split is padded (Config.vocab_padding; masked in the logits).
        self.config = config = fit_vocab(config, self.layout)
        params = pad_vocab(params, config)
        self.params = params if self.mesh is None else jax.device_put(params, self.layout.param_shardings(config))
        # How products run, chosen once for the devices the model lives on (kimi_jax.kernels.choose).
        self.backend = backend_for(self.layout, backend)
        self._module = Transformer(config, absorb=False, backend=self.backend, dtype=self.dtype, layout=self.layout)

    @functools.cached_property
    def _forward(self):
        def forward(params, tokens, positions):
            return self._module.apply({"params": params}, tokens, positions)[0]

        if self.mesh is None:
            return jax.jit(forward)
        tokens = self.layout.sharding(("batch", "seq"))
        return jax.jit(forward, in_shardings=(self.layout.param_shardings(self.config), tokens, tokens),
                       out_shardings=self.layout.sharding(("batch", "seq", "vocab")))

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
        shards = getattr(self.layout, "batch_shards", 1)
        if b % shards:  # on a mesh the batch splits evenly: pad with empty rows (position −1), drop them after
            pad = shards - b % shards
            tokens = np.pad(tokens, ((0, pad), (0, 0)))
            positions = np.pad(positions, ((0, pad), (0, 0)), constant_values=-1)
        out = np.asarray(jax.block_until_ready(self._forward(self.params, tokens, positions)))[:b]
        out = out[..., :self.config.vocab_size]  # without the rows that pad the vocabulary for a mesh
        return out[0] if squeeze else out

    # Generation: thin wrappers over kimi_jax.runtime.generation---------------------------------------
    @functools.cached_property
    def generator(self) -> generation.Generator:
        """The compiled prefill/decode engine (built on first use)."""
        return generation.Generator(self.config, self.params, self.dtype, self.backend, self.layout)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Default stops: the tokenizer's <|im_end|> and [EOS], else config.json's eos_token_id."""
        if self.tokenizer is not None:
            return tuple(self.tokenizer.stop_ids)
        return () if self.config.eos_token_id is None else (self.config.eos_token_id,)

    def generate(self, prompts, max_new_tokens=64, temperature=DEFAULT_TEMPERATURE, top_p=1.0,
                 top_k=0, seed=0, stop_token_ids=None) -> list[list[int]]:
        """Continue each prompt (a list of token-id lists) -> each one's new token ids.

        Every sampling argument is one value for all prompts or a list with one per prompt;
        temperature 0 is greedy. Generation stops after max_new_tokens or on a stop id (kept as the
        last token): `stop_token_ids` (ids, or one list per prompt) replaces the default
        `self.stop_ids`. A request's tokens depend on its seed, not on the batch it is in.
        """
        requests = make_requests(self.config, prompts, max_new_tokens, temperature, top_p, top_k,
                                            seed, stop_token_ids, self.stop_ids)
        return [c.token_ids for c in self.generator.generate(requests)]

    def stream(self, prompt, max_new_tokens=64, temperature=DEFAULT_TEMPERATURE, top_p=1.0,
               top_k=0, seed=0, stop_token_ids=None):
        """Yield `Piece(token_id, text)` for one prompt (token ids, or text if there is a tokenizer)
        as tokens are generated; text is "" without a tokenizer."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; this model has none: pass token ids")
            prompt = self.tokenizer.encode(prompt)
        request, = make_requests(self.config, [prompt], max_new_tokens, temperature, top_p, top_k,
                                            seed, stop_token_ids, self.stop_ids)
        return generation.stream_pieces(self.generator, request, self.tokenizer)

    def chat(self, messages, tools=None, **sampling) -> dict[str, Any]:
        """One assistant reply to OpenAI-style `messages` (and `tools`):
        {"content": str | None, "tool_calls": [...], "finish_reason": "stop" | "length"}."""
        return generation.chat(self.generator, self.tokenizer, messages, tools, **sampling)


def load(path: str | os.PathLike, dtype: str | Any = "bfloat16", mesh: Any = None,
         backend: Backend | str | None = None, rules: Any = None) -> Model:
    """Load a Hugging Face checkpoint directory (config.json + safetensors shards, and a tokenizer
    file if present: `Model.tokenizer`), or one converted by `python -m kimi_jax.convert` (orbax).

    dtype: compute dtype ("bfloat16", or "float32" for exact parity). Block-fp8 weights stay
    float8_e4m3fn with their scales and are dequantized inside the compiled forward, one layer at a
    time. `mesh` (a spec string such as "data=1,expert=4,tensor=2", a dict or a `jax.sharding.Mesh`)
    shards the model over devices, each parameter read straight into its sharding; `rules` picks
    the rules table (a `sharding.Rules` or its name, default "default"; see sharding/DESIGN.md).
    backend: how products run (a `kimi_jax.kernels` Backend, or the name of an expert kernel
    — "grouped", "ragged", "reference" — to use instead of the platform's); by default chosen for
    the devices the model is placed on (`kernels.choose`), which also decides how fp8 is stored.
    """
    path = Path(path)
    if path.is_file():
        raise FileNotFoundError(f"checkpoint {path} is a file; pass the checkpoint directory (the one holding "
                                "config.json)")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config = Config.from_json(path)
    layout = UNSHARDED if mesh is None else mesh_layout(mesh, config, rules)
    config = fit_vocab(config, layout)  # read with zero rows after the checkpoint's when padded
    backend = backend_for(layout, backend)
    storage = backend.fp8_storage
    if is_orbax_checkpoint(path):  # converted by kimi_jax.convert: each group restored into its sharding
        shardings = None if mesh is None else functools.partial(leaf_sharding_of, layout, config)
        params = load_orbax_params(path, config, shardings, storage)
    elif mesh is None:
        params = load_hf_params(path, config, storage=storage)
    else:  # each device reads its own slice of each weight, straight into its sharding
        params = load_hf_params(path, config, layout.placer(config), storage)
    return Model(config, params, dtype=dtype, mesh=None if mesh is None else layout.mesh, backend=backend,
                 tokenizer=_find_tokenizer(path), rules=rules)


def backend_for(layout: Layout, backend: Backend | str | None = None) -> Backend:
    """The backend for a model placed by `layout`: `backend` itself, or the platform's choice for the
    layout's devices (one device without a mesh), with an expert kernel named by `backend`."""
    if isinstance(backend, Backend):
        return backend
    mesh = getattr(layout, "mesh", None)
    return kernels.for_devices(None if mesh is None else list(mesh.devices.flat), experts=backend)


def leaf_sharding_of(layout, config: Config, leaf):
    """A weight's sharding under `layout` (a QArray of two for fp8 weights), for the orbax restore."""
    return leaf_sharding(leaf, config, layout.mesh, layout.rules)


def mesh_layout(mesh: Any, config: Config, rules: Any = None):
    """A `sharding.MeshLayout` for a mesh spec ("data=1,expert=4,tensor=2", a dict or a Mesh) and rules
    table, checked against the config: a dimension that does not split is a MeshError naming it."""
    layout = MeshLayout.build(mesh, rules)
    layout.param_shardings(fit_vocab(config, layout))  # raises on the first weight that cannot split
    return layout


def fit_vocab(config: Config, layout: Layout) -> Config:
    """`config` with its vocabulary padded to split evenly over the mesh axes the layout's rules give
    it (fine-tuned checkpoints add tokens: 163,842 splits over no even `tensor`); unchanged off a mesh
    or when it divides."""
    mesh = getattr(layout, "mesh", None)
    if mesh is None:
        return config
    return config.with_vocab_multiple(math.prod(mesh.shape[a] for a in layout.rules.mesh_axes("vocab")))


def pad_vocab(params: dict[str, Any], config: Config) -> dict[str, Any]:
    """Zero rows appended to the embedding and lm_head of `params` held at the checkpoint's vocabulary
    (params `load` read are already padded)."""
    if not config.vocab_padding or params["embed"].shape[0] == config.padded_vocab_size:
        return params
    pad = lambda w: jnp.pad(w, ((0, config.vocab_padding), (0, 0)))  # noqa: E731
    return {**params, "embed": pad(params["embed"]), "lm_head": pad(params["lm_head"])}


def _find_tokenizer(path: Path):
    """The checkpoint's tokenizer (tiktoken.model or tokenizer.model next to config.json), or None."""
    try:
        return load_tokenizer(path)
    except FileNotFoundError:
        return None
