"""The decoder: embedding, the dense prefix and the MoE layers as two scanned stacks, norm, lm_head.

Parameters are a plain pytree passed to `Transformer.apply({"params": params}, ...)`; its layout is
the one `weights.model_specs` declares (stacked groups have a leading `layers` axis).

The layer loop (`nn.scan`) carries the residual stream and the group's whole KV-cache stack, which
each layer updates in its own row (in place: a step holds one cache), and scans over the layer
index. Per-layer weights are sliced by the loop; the routed experts' stacks are instead passed whole
and read by index (experts.py: slicing a layer out would copy all of its experts every step).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_jax.config import Config
from kimi_jax.model.attention import MLA, LatentCache
from kimi_jax.model.backend import REFERENCE, Backend
from kimi_jax.model.layers import rms_norm
from kimi_jax.model.layout import UNSHARDED, Layout
from kimi_jax.model.moe import EXPERT_WEIGHTS, MLP, MoE
from kimi_jax.model.weights import LAYER_GROUPS, declare, layer_specs, model_specs


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + MLA(norm(x)), then + FFN(norm(·)) where FFN is a dense MLP or MoE."""

    cfg: Config
    moe: bool
    absorb: bool = False
    backend: Backend = REFERENCE
    dtype: jnp.dtype = jnp.bfloat16
    layout: Layout = UNSHARDED

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, LatentCache | None], layer: jax.Array, positions: jax.Array,
                 experts: dict | None):
        """carry: (x [B, T, D] the float32 residual stream, the group's cache stack or None); `layer` is
        this layer's index in the group, `experts` the group's expert stacks (None at init). The
        blocks compute in `dtype`."""
        cfg = self.cfg
        x, cache = carry
        p = declare(self, layer_specs(cfg, self.moe), cfg)  # the two norms; attn/ffn declare their own
        h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps).astype(self.dtype)
        h, cache = MLA(cfg, self.absorb, self.backend, self.layout, name="attn")(h, positions, cache, layer)
        x = x + h.astype(jnp.float32)
        y = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps).astype(self.dtype)
        if self.moe:
            y = MoE(cfg, self.backend, self.layout, name="ffn")(y, layer, experts)
        else:
            y = MLP(cfg, self.backend, name="ffn")(y)
        return (x + y.astype(jnp.float32), cache), None


class Transformer(nn.Module):
    """Token ids -> logits. With `cache` (a dict of stacked LatentCaches per group) it reads and updates it."""

    cfg: Config
    absorb: bool = False  # absorbed MLA (decode) instead of expanded (prefill / full forward)
    backend: Backend = REFERENCE  # how products run: kimi_jax.kernels.choose picks one per platform
    dtype: jnp.dtype = jnp.bfloat16  # compute dtype
    layout: Layout = UNSHARDED  # device placement hooks (sharding.MeshLayout on a mesh)
    unroll: bool = False  # inline the layers instead of a loop (the planner's cost accounting)

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: dict | None = None,
                 return_hidden: bool = False):
        """tokens, positions [B, T] (position −1 marks padding) -> (logits [B, T, V] f32, cache)."""
        cfg = self.cfg
        p = declare(self, model_specs(cfg), cfg)  # embed, final_norm, lm_head; the stacks declare the rest
        # The residual stream stays float32 (one rounding per block instead of per addition); the
        # blocks compute in `dtype`. Cheap, and bf16 logits land closer to the float32 reference.
        x = p["embed"][tokens].astype(jnp.float32)  # (B, T, D)
        x = self.layout.constrain(x, ("batch", "seq", "embed"))
        new_cache = {} if cache is not None else None
        for group, (_, count, moe) in LAYER_GROUPS.items():
            n = count(cfg)
            if not n:
                continue
            # Layers scan: compile time does not grow with depth. Params carry a layer axis, and so do
            # values sown into "intermediates" (the trainer's per-layer attention statistics).
            stack = nn.scan(DecoderLayer, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                            in_axes=(0, nn.broadcast, nn.broadcast), out_axes=0, length=n,
                            unroll=n if self.unroll else 1)
            experts = None
            if moe and not self.is_initializing():  # the group's expert stacks, whole
                experts = {k: self.variables["params"][group]["ffn"][k] for k in EXPERT_WEIGHTS}
            layers = stack(cfg, moe, self.absorb, self.backend, self.dtype, self.layout, name=group)
            group_cache = None if cache is None else cache[group]
            (x, group_cache), _ = layers((x, group_cache), jnp.arange(n), positions, experts)
            if cache is not None:
                new_cache[group] = group_cache
        x = rms_norm(x, p["final_norm"], cfg.rms_norm_eps).astype(self.dtype)
        if return_hidden:
            return x, new_cache
        return vocab_logits(cfg, self.backend, x, p["lm_head"], self.dtype), new_cache


def vocab_logits(cfg: Config, backend, x: jax.Array, lm_head, dtype) -> jax.Array:
    """The lm_head's logits, f32 [..., padded vocab]; rows added to pad the vocabulary for a mesh
    (`Config.vocab_padding`) get the lowest float, so they are never sampled."""
    logits = backend.logits(x, lm_head, dtype)
    if cfg.vocab_padding:
        real = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
        logits = jnp.where(real, logits, jnp.finfo(logits.dtype).min)
    return logits


def init_cache(cfg: Config, batch: int, length: int, dtype=jnp.bfloat16) -> dict[str, LatentCache]:
    """An empty latent cache: per group, [layers, B, S, kv_lora_rank] and [layers, B, S, rope]."""
    cache = {}
    for group, (_, count, _) in LAYER_GROUPS.items():
        n = count(cfg)
        if n:
            cache[group] = LatentCache(jnp.zeros((n, batch, length, cfg.kv_lora_rank), dtype),
                                       jnp.zeros((n, batch, length, cfg.qk_rope_head_dim), dtype))
    return cache
