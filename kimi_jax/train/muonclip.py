"""MuonClip, the optimizer of the Kimi K2 report (§2.1, Algorithm 1), as optax transformations.

Per step t, for each weight matrix W [out, in] with gradient G:

    M_t = μ M_{t-1} + G_t                                   momentum (μ = 0.95)
    O_t = NewtonSchulz(M_t) · 0.2 · sqrt(max(out, in))      orthogonalised; RMS matched to AdamW's
    W_t = W_{t-1} − η (O_t + λ W_{t-1})                     decoupled weight decay

and then QK-Clip: for every attention head h whose largest pre-softmax logit in the step's batch
S_max^h exceeds τ, rescale that head's query and key weights by γ = τ / S_max^h so its logits
shrink by γ. Under MLA the per-head pieces are q_nope and k_nope (each × √γ: their product
shrinks by γ) and q_rope (× γ); the rotary key k_rope is shared by all heads and left alone, so
that clipping one head does not touch the others.

Muon applies to the 2-D matrices of the layers (attention projections, dense and shared MLPs, and
each routed expert's matrices separately); embeddings, lm_head, norms and the router weight use
AdamW. The router's `e_score_correction_bias` gets no gradient (it only picks experts): it follows
DeepSeek-V3's auxiliary-loss-free balancing rule instead (`update_router_bias`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kimi_jax.config import Config
from kimi_jax.model.attention import attention_mask
from kimi_jax.model.layers import apply_rope, rms_norm, rope_angles, softmax_scale
from kimi_jax.model.quant import linear
from kimi_jax.model.weights import LAYER_GROUPS, Leaf, build_tree

# Keller Jordan's quintic: a x + b x³ + c x⁵ pushes every singular value in (0, 1] into ~[0.7, 1.2]
# within 5 iterations (it trades exact convergence to 1 for a steep slope near 0).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
# An orthogonal [out, in] matrix has RMS 1/sqrt(max(out, in)); scaled by 0.2·sqrt(max(out, in)) its
# RMS is 0.2, within AdamW's typical 0.2–0.4, so one learning rate and weight decay serve both.
RMS_MATCH = 0.2


def newton_schulz(g: jax.Array, steps: int = NS_STEPS, eps: float = 1e-7) -> jax.Array:
    """Approximately orthogonalise each matrix of g [..., m, n]: U S Vᵀ -> U S' Vᵀ, S' ≈ 1 (in ~[0.7, 1.2]).

    The matrix is scaled to unit Frobenius norm (so every singular value is ≤ 1), then each step
    applies X <- a X + (b A + c A²) X with A = X Xᵀ, an odd polynomial in the singular values.
    Leading axes (layers, experts) are independent matrices.
    """
    a, b, c = NS_COEFFS
    x = g.astype(jnp.float32)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:  # iterate on the smaller Gram matrix
        x = jnp.swapaxes(x, -1, -2)
    x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps)
    for _ in range(steps):
        gram = x @ jnp.swapaxes(x, -1, -2)  # (..., m, m)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else jnp.swapaxes(x, -1, -2)).astype(g.dtype)


class MuonState(NamedTuple):
    momentum: Any


def scale_by_muon(beta: float = 0.95, rms_match: float = RMS_MATCH) -> optax.GradientTransformation:
    """M <- βM + G; update = NewtonSchulz(M) · rms_match · sqrt(max(out, in)) per trailing [out, in] matrix."""

    def init(params):
        return MuonState(jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        momentum = jax.tree.map(lambda m, g: beta * m + g, state.momentum, updates)
        out = jax.tree.map(lambda m: newton_schulz(m) * (rms_match * math.sqrt(max(m.shape[-2:]))), momentum)
        return out, MuonState(momentum)

    return optax.GradientTransformation(init, update)


def muon(learning_rate, weight_decay: float = 0.1, beta: float = 0.95) -> optax.GradientTransformation:
    """Muon with decoupled weight decay: W <- W − η (O + λ W)."""
    return optax.chain(scale_by_muon(beta), optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))


def param_label(leaf: Leaf) -> str:
    """Which optimizer a weight gets: "muon", "adamw", "adam" (no decay: norms) or "router_bias" (no gradient)."""
    name = leaf.path[-1]
    if name == "router_bias":
        return "router_bias"
    if leaf.spec.init == "ones":  # RMSNorm weights
        return "adam"
    if name in ("embed", "lm_head", "router"):
        return "adamw"
    if len(leaf.spec.shape) >= 2:  # [out, in], or [experts, out, in]: one matrix per expert
        return "muon"
    raise ValueError(f"no optimizer rule for weight {leaf.name} of shape {leaf.spec.shape}")


def muonclip(cfg: Config, learning_rate, weight_decay: float = 0.1, beta: float = 0.95,
             adam_b1: float = 0.9, adam_b2: float = 0.95) -> optax.GradientTransformation:
    """The optimizer half of MuonClip: Muon for matrices, AdamW for the rest, router bias left out.

    QK-Clip needs the step's attention logits, so the training step applies it after this
    update (`qk_clip`); the router bias is moved by `update_router_bias`.
    """
    adam = dict(b1=adam_b1, b2=adam_b2, eps=1e-8)
    return optax.multi_transform(
        {"muon": muon(learning_rate, weight_decay, beta),
         "adamw": optax.adamw(learning_rate, weight_decay=weight_decay, **adam),
         "adam": optax.adamw(learning_rate, weight_decay=0.0, **adam),
         "router_bias": optax.set_to_zero()},
        build_tree(cfg, param_label))


# QK-Clip -----------------------------------------------------------------------------------------
def attention_logits(cfg: Config, p: dict[str, Any], h: jax.Array, positions: jax.Array) -> jax.Array:
    """The pre-softmax logits [B, H, T, T] (softmax scale included) of one MLA layer, recomputed from its
    weights `p` and its input h [B, T, D]; pairs the causal/padding mask hides are −inf.

    The same projections as `attention.MLA` (tests/test_muonclip.py checks the softmax of these
    against the layer's attention), in float32.
    """
    h = h.astype(jnp.float32)
    b, t, _ = h.shape
    heads, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    cos, sin = rope_angles(cfg, jnp.maximum(positions, 0))
    q = linear(rms_norm(linear(h, p["q_a_proj"]), p["q_a_norm"], cfg.rms_norm_eps), p["q_b_proj"])
    q = q.reshape(b, t, heads, nope + rope)  # (B, T, H, nope+rope)
    kv = linear(h, p["kv_a_proj"])  # (B, T, kv_lora + rope)
    latent = rms_norm(kv[..., :cfg.kv_lora_rank], p["kv_a_norm"], cfg.rms_norm_eps)
    w_kv = linear(latent, p["kv_b_proj"]).reshape(b, t, heads, -1)  # (B, T, H, nope+v)
    scores = (jnp.einsum("bthn,bshn->bhts", q[..., :nope], w_kv[..., :nope])
              + jnp.einsum("bthr,bsr->bhts", apply_rope(q[..., nope:], cos, sin),
                           apply_rope(kv[..., cfg.kv_lora_rank:], cos, sin)))
    return jnp.where(attention_mask(positions, positions)[:, None], scores * softmax_scale(cfg), -jnp.inf)


def attention_max_logits(cfg: Config, p: dict[str, Any], h: jax.Array, positions: jax.Array) -> jax.Array:
    """S_max^h [H]: each head's largest logit over the batch's visible (query, key) pairs."""
    return jax.lax.stop_gradient(attention_logits(cfg, p, h, positions).max(axis=(0, 2, 3)))


def clip_factors(max_logits: jax.Array, tau: float) -> jax.Array:
    """γ = τ / S_max for heads over the threshold, exactly 1 for the others."""
    return jnp.where(max_logits > tau, tau / jnp.maximum(max_logits, tau), 1.0)


def qk_clip_attention(attn: dict[str, Any], max_logits: jax.Array, cfg: Config, tau: float) -> dict[str, Any]:
    """Rescale one stack of MLA weights (leading `layers` axis; max_logits [layers, H]) per head.

    q_b_proj rows of head h are [q_nope (nope) | q_rope (rope)]; kv_b_proj rows are
    [k_nope (nope) | v (v_head_dim)]. q_nope and k_nope get √γ, q_rope γ, v and the shared
    k_rope (kv_a_proj) nothing.
    """
    nope, rope, vd = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    gamma = clip_factors(max_logits, tau)[..., None]  # (L, H, 1)
    root = jnp.sqrt(gamma)

    def rescale(w, per_head_rows):  # w [L, H·rows, in], per_head_rows (L, H, rows)
        l, out, inp = w.shape
        scaled = w.reshape(l, gamma.shape[1], -1, inp) * per_head_rows[..., None].astype(w.dtype)
        return scaled.reshape(l, out, inp)

    q_rows = jnp.concatenate([jnp.broadcast_to(root, (*root.shape[:2], nope)),
                              jnp.broadcast_to(gamma, (*gamma.shape[:2], rope))], axis=-1)
    kv_rows = jnp.concatenate([jnp.broadcast_to(root, (*root.shape[:2], nope)),
                               jnp.ones((*gamma.shape[:2], vd), gamma.dtype)], axis=-1)
    return {**attn, "q_b_proj": rescale(attn["q_b_proj"], q_rows), "kv_b_proj": rescale(attn["kv_b_proj"], kv_rows)}


def qk_clip(params: dict[str, Any], max_logits: dict[str, jax.Array], cfg: Config, tau: float) -> dict[str, Any]:
    """QK-Clip every layer group: `max_logits[group]` is [layers, H] from the step's forward pass."""
    out = dict(params)
    for group in LAYER_GROUPS:
        if group in max_logits:
            out[group] = {**params[group], "attn": qk_clip_attention(params[group]["attn"], max_logits[group],
                                                                     cfg, tau)}
    return out


# Router bias -------------------------------------------------------------------------------------
def update_router_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3's auxiliary-loss-free balancing: b_e += rate · sign(mean load − load_e).

    bias, load [..., experts]: an under-loaded expert's bias rises (it gets picked more), an
    over-loaded one's falls. Load is the number of tokens routed to each expert this step.
    """
    mean = load.mean(axis=-1, keepdims=True)
    return bias + rate * jnp.sign(mean - load).astype(bias.dtype)
