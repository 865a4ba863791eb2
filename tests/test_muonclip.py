"""MuonClip: Newton–Schulz orthogonalisation, the Muon update, optimizer groups, QK-Clip, router-bias rule."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.model.attention import MLA
from kimi_jax.model.layers import rms_norm
from kimi_jax.model.weights import build_tree
from kimi_jax.train import muonclip
from kimi_jax.train.trainer import forward_with_stats, init_params, tiny_chat_config

pytestmark = pytest.mark.unit

CFG = tiny_chat_config(vocab_size=96)


def _singular_values(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


@pytest.mark.parametrize("shape", [(48, 160), (160, 48), (96, 96)])
def test_newton_schulz_is_near_orthogonal(shape):
    # Gaussian matrices are well conditioned when not square; the square case gets a spread-out
    # spectrum (condition number 20), still inside what 5 quintic steps bring into the band.
    rng = np.random.default_rng(0)
    g = rng.standard_normal(shape)
    if shape[0] == shape[1]:
        u, _, vt = np.linalg.svd(g)
        g = u @ np.diag(np.geomspace(1.0, 0.05, shape[0])) @ vt
    s = _singular_values(muonclip.newton_schulz(jnp.asarray(g, jnp.float32)))
    assert s.min() > 0.68 and s.max() < 1.2, (s.min(), s.max())
    # Same singular vectors: NS(G) = U S' Vᵀ, so NS(G)ᵀ G is symmetric positive semi-definite.
    m = np.asarray(muonclip.newton_schulz(jnp.asarray(g, jnp.float32)), np.float64)
    p = m.T @ g if shape[0] >= shape[1] else g @ m.T
    np.testing.assert_allclose(p, p.T, atol=1e-3 * np.abs(p).max())


def test_newton_schulz_orthogonalises_each_stacked_matrix():
    # [layers, experts, out, in]: every [out, in] slice on its own, not the flattened tensor.
    g = jax.random.normal(jax.random.key(0), (2, 3, 16, 40)) * jnp.arange(1, 7.0).reshape(2, 3, 1, 1)
    out = muonclip.newton_schulz(g)
    for l in range(2):
        for e in range(3):
            np.testing.assert_allclose(out[l, e], muonclip.newton_schulz(g[l, e]), atol=1e-5)
            s = _singular_values(out[l, e])
            assert 0.68 < s.min() and s.max() < 1.2


def test_muon_update_rms_matches_adamw_scale():
    # An orthogonalised [out, in] update scaled by 0.2·sqrt(max(out, in)) has RMS ≈ 0.2.
    params = {"w": jnp.zeros((64, 256)), "experts": jnp.zeros((4, 32, 64))}
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    tx = muonclip.scale_by_muon()
    updates, state = tx.update(grads, tx.init(params))
    for name, u in updates.items():
        rms = float(jnp.sqrt(jnp.mean(u**2)))
        assert 0.14 < rms < 0.24, (name, rms)
    # Momentum accumulates the raw gradients: M1 = G, M2 = βG + G.
    np.testing.assert_allclose(state.momentum["w"], grads["w"])
    _, state = tx.update(grads, state)
    np.testing.assert_allclose(state.momentum["w"], 1.95 * grads["w"], rtol=1e-6)


def test_muon_decoupled_weight_decay():
    # W <- W − η (O + λ W): with a zero gradient the momentum is zero, so only the decay acts.
    w = {"w": jnp.ones((8, 8))}
    tx = muonclip.muon(learning_rate=0.1, weight_decay=0.5)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, w), tx.init(w), w)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * w["w"], rtol=1e-6)


@pytest.mark.slow
def test_optimizer_groups():
    labels = build_tree(CFG, muonclip.param_label)
    moe = labels["moe_layers"]
    assert labels["embed"] == labels["lm_head"] == moe["ffn"]["router"] == "adamw"
    assert labels["final_norm"] == moe["attn_norm"] == moe["attn"]["q_a_norm"] == "adam"
    assert moe["ffn"]["router_bias"] == "router_bias"
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj", "o_proj"):
        assert moe["attn"][name] == "muon"
    for name in ("experts_gate", "experts_up", "experts_down", "shared_gate", "shared_up", "shared_down"):
        assert moe["ffn"][name] == "muon"
    assert labels["dense_layers"]["ffn"]["gate"] == "muon"
    # The router bias gets no update from the optimizer (only the balancing rule moves it).
    params = init_params(CFG)
    tx = muonclip.muonclip(CFG, 1e-2)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert not np.any(updates["moe_layers"]["ffn"]["router_bias"])
    assert np.any(updates["moe_layers"]["ffn"]["router"])


# QK-Clip ------------------------------------------------------------------------------------------
def _layer(params, group="moe_layers", layer=0):
    return jax.tree.map(lambda a: a[layer], params[group]["attn"])


def _inputs(seed=0, b=2, t=12):
    h = jax.random.normal(jax.random.key(seed), (b, t, CFG.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t)).at[1, 9:].set(-1)  # row 1 is padded
    return h, positions


def test_attention_logits_reproduce_the_mla_layer():
    # softmax(recomputed logits) · V through o_proj equals what attention.MLA computes.
    params = init_params(CFG, seed=1)
    p = _layer(params)
    p = {**p, "q_b_proj": p["q_b_proj"] * 20.0}  # sharp attention, so a wrong logit would show
    h, positions = _inputs()
    logits = muonclip.attention_logits(CFG, p, h, positions)
    heads, nope, vd = CFG.num_attention_heads, CFG.qk_nope_head_dim, CFG.v_head_dim
    latent = rms_norm(h @ p["kv_a_proj"][: CFG.kv_lora_rank].T, p["kv_a_norm"], CFG.rms_norm_eps)
    v = (latent @ p["kv_b_proj"].T).reshape(*h.shape[:2], heads, nope + vd)[..., nope:]
    probs = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("bhts,bshv->bthv", probs, v).reshape(*h.shape[:2], heads * vd) @ p["o_proj"].T
    want, _ = MLA(CFG).apply({"params": p}, h, positions)
    valid = np.asarray(positions >= 0)
    np.testing.assert_allclose(np.asarray(o)[valid], np.asarray(want)[valid], atol=2e-5, rtol=1e-4)
    assert np.all(np.isneginf(np.asarray(logits)[1, :, :, 9:]))  # padded keys are never seen


def test_qk_clip_caps_heads_over_tau_and_leaves_the_rest():
    params = init_params(CFG, seed=2)
    attn = params["moe_layers"]["attn"]
    heads, nope, rope = CFG.num_attention_heads, CFG.qk_nope_head_dim, CFG.qk_rope_head_dim
    # Blow up heads 0 and 2 of layer 0 (queries) so their logits are far above the others'.
    boost = jnp.ones((heads, nope + rope)).at[0].set(300.0).at[2].set(120.0).reshape(-1, 1)
    attn = {**attn, "q_b_proj": attn["q_b_proj"].at[0].multiply(boost)}
    params = {**params, "moe_layers": {**params["moe_layers"], "attn": attn}}
    h, positions = _inputs(seed=3)

    def max_logits(ps):
        return jnp.stack([muonclip.attention_max_logits(CFG, _layer(ps, layer=l), h, positions) for l in range(2)])

    before = max_logits(params)
    tau = float(jnp.sort(before[0])[-2]) * 0.5  # below heads 0 and 2, above every other head
    over = np.asarray(before > tau)
    assert over[0, 0] and over[0, 2] and over.sum() == 2, before
    clipped = muonclip.qk_clip(params, {"moe_layers": before}, CFG, tau)
    after = max_logits(clipped)
    np.testing.assert_allclose(after[over], tau, rtol=1e-4)  # capped at τ exactly (γ scales every logit)
    np.testing.assert_array_equal(after[~over], before[~over])  # the others: bit-identical logits

    new, old = clipped["moe_layers"]["attn"], params["moe_layers"]["attn"]
    q_new = new["q_b_proj"].reshape(2, heads, nope + rope, -1)
    q_old = old["q_b_proj"].reshape(2, heads, nope + rope, -1)
    kv_new = new["kv_b_proj"].reshape(2, heads, nope + CFG.v_head_dim, -1)
    kv_old = old["kv_b_proj"].reshape(2, heads, nope + CFG.v_head_dim, -1)
    gamma = tau / before[0, 0]
    np.testing.assert_allclose(q_new[0, 0, :nope], q_old[0, 0, :nope] * jnp.sqrt(gamma), rtol=1e-6)  # q_nope √γ
    np.testing.assert_allclose(q_new[0, 0, nope:], q_old[0, 0, nope:] * gamma, rtol=1e-6)  # q_rope γ
    np.testing.assert_allclose(kv_new[0, 0, :nope], kv_old[0, 0, :nope] * jnp.sqrt(gamma), rtol=1e-6)  # k_nope √γ
    np.testing.assert_array_equal(kv_new[..., nope:, :], kv_old[..., nope:, :])  # values untouched
    for l, hd in np.argwhere(~over):  # heads under τ: weights untouched
        np.testing.assert_array_equal(q_new[l, hd], q_old[l, hd])
        np.testing.assert_array_equal(kv_new[l, hd], kv_old[l, hd])
    # The shared rotary key (kv_a_proj's rope rows) and every other weight are untouched.
    np.testing.assert_array_equal(new["kv_a_proj"], old["kv_a_proj"])
    untouched = [k for k in old if k not in ("q_b_proj", "kv_b_proj")]
    for k in untouched:
        np.testing.assert_array_equal(new[k], old[k])
    dense = clipped["dense_layers"]["attn"]["q_b_proj"]  # another group, no statistics given: untouched
    np.testing.assert_array_equal(dense, params["dense_layers"]["attn"]["q_b_proj"])


def test_forward_reports_max_logits_and_expert_loads():
    params = init_params(CFG, seed=4)
    tokens = jax.random.randint(jax.random.key(5), (2, 10), 0, CFG.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10)).at[0, 7:].set(-1)
    logits, stats = forward_with_stats(CFG, params, tokens, positions)
    assert stats["dense_layers"]["max_logit"].shape == (1, CFG.num_attention_heads)
    assert stats["moe_layers"]["max_logit"].shape == (2, CFG.num_attention_heads)
    load = np.asarray(stats["moe_layers"]["expert_load"])
    assert load.shape == (2, CFG.n_routed_experts)
    np.testing.assert_array_equal(load.sum(-1), 17 * CFG.num_experts_per_tok)  # 17 unpadded tokens, k each
    # The first layer's statistic is the one recomputed from its input: the embedded, normed tokens.
    p0 = jax.tree.map(lambda a: a[0], params["dense_layers"])
    h = rms_norm(params["embed"][tokens], p0["attn_norm"], CFG.rms_norm_eps)
    np.testing.assert_allclose(stats["dense_layers"]["max_logit"][0],
                               muonclip.attention_max_logits(CFG, p0["attn"], h, positions), rtol=1e-5)


def test_router_bias_rule():
    bias = jnp.zeros((2, 4))
    load = jnp.array([[10.0, 30.0, 20.0, 20.0], [20.0, 20.0, 20.0, 20.0]])
    new = muonclip.update_router_bias(bias, load, 0.01)
    np.testing.assert_allclose(new, [[0.01, -0.01, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_clip_factors():
    g = muonclip.clip_factors(jnp.array([50.0, 100.0, 200.0, -3.0]), 100.0)
    np.testing.assert_allclose(g, [1.0, 1.0, 0.5, 1.0])
