"""The feed-forward blocks: the dense SwiGLU MLP, and the mixture of experts (DeepSeek-V3 §2.1.2).

Routing (noaux_tc): s = sigmoid(x W_rᵀ) in float32. Experts are *selected* on s +
e_score_correction_bias (restricted to the `topk_group` best groups, a group scoring the sum of its
two best biased scores); the combine weights are the *unbiased* s of the chosen experts, normalised
to sum 1 and scaled by routed_scaling_factor. The routed experts run through the backend's kernel
(experts.py), placed by the layout; the shared expert, a SwiGLU MLP, is added unweighted.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_jax.config import Config
from kimi_jax.model.backend import REFERENCE, Backend
from kimi_jax.model.layers import swiglu
from kimi_jax.model.layout import UNSHARDED, Layout
from kimi_jax.model.weights import declare, layer_specs, moe_specs


def route(x: jax.Array, w_router: jax.Array, bias: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """x [N, D] -> (combine weights [N, k] float32, expert ids [N, k] int32)."""
    scores = jax.nn.sigmoid(jnp.einsum("nd,ed->ne", x.astype(jnp.float32), w_router.astype(jnp.float32)))
    choice = scores + bias.astype(jnp.float32)
    if cfg.n_group > 1:
        n, e = choice.shape
        grouped = choice.reshape(n, cfg.n_group, e // cfg.n_group)  # (N, G, E/G)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # (N, G)
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)
        group_mask = jnp.zeros_like(group_score, bool).at[jnp.arange(n)[:, None], keep].set(True)
        choice = jnp.where(group_mask[:, :, None], grouped, -jnp.inf).reshape(n, e)
    _, idx = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, idx.astype(jnp.int32)



class MLP(nn.Module):
    """Dense SwiGLU MLP of the first `first_k_dense_replace` layers."""

    cfg: Config
    backend: Backend = REFERENCE

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = declare(self, layer_specs(self.cfg, moe=False)["ffn"], self.cfg)
        return swiglu(x, p["gate"], p["up"], p["down"], self.backend.linear)


EXPERT_WEIGHTS = ("experts_gate", "experts_up", "experts_down")


class MoE(nn.Module):
    """Routed experts plus the shared expert, for x [B, T, D].

    Inside the layer loop the expert weights come whole: `stacks` holds the group's [layers, E, ...]
    stacks and `layer` says which layer this is, so the kernel reads only the experts it needs
    (experts.py). The per-layer slices the loop also passes (declared here, for init and the tree's
    shape) then go unused and the compiler drops them. Without `stacks` this layer's own are used.
    """

    cfg: Config
    backend: Backend = REFERENCE  # how the experts and the shared expert's products run
    layout: Layout = UNSHARDED  # where the experts run (sharding.MeshLayout: expert-parallel)

    @nn.compact
    def __call__(self, x: jax.Array, layer: jax.Array | None = None, stacks: dict | None = None) -> jax.Array:
        p = declare(self, moe_specs(self.cfg), self.cfg)
        flat = x.reshape(-1, x.shape[-1])  # (B·T, D)
        weights, idx = route(flat, p["router"], p["router_bias"], self.cfg)
        experts, which = (stacks, layer) if stacks is not None else (p, None)
        routed = self.layout.experts(self.backend.experts)(flat, weights, idx, *(experts[k] for k in EXPERT_WEIGHTS),
                                                           layer=which)
        shared = swiglu(flat, p["shared_gate"], p["shared_up"], p["shared_down"], self.backend.linear)
        return (routed + shared).reshape(x.shape)
