"""Training smoke test: a few MuonClip steps on a tiny corpus lower the loss; QK-Clip and the router-bias
rule act inside the step; the block-fp8 export loads back through `kimi_jax.load`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.runtime.engine import load
from kimi_jax.text.tokenizer import SentencePieceTokenizer
from kimi_jax.train import corpus, trainer

pytestmark = pytest.mark.unit

# A smaller model than the shipped one (same structure), so the test compiles and runs in seconds.
SMALL = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4)


@functools.cache
def _setup():
    convs = corpus.generate_conversations(300, seed=0)
    model_bytes = corpus.train_tokenizer(convs, vocab_size=600)
    tok = SentencePieceTokenizer(model_bytes)
    examples = corpus.encode_corpus(tok, convs, max_len=256)
    cfg = trainer.tiny_chat_config(tok.vocab_size, tok.bos_id, tok.eos_id, **SMALL)
    return cfg, tok, model_bytes, examples


def _batches(seed=0):
    cfg, tok, _, examples = _setup()
    return corpus.batches(examples, tokens_per_batch=2048, buckets=(256,), pad_id=tok.pad_id, seed=seed)


@functools.cache
def _trained():
    cfg, *_ = _setup()
    tcfg = trainer.TrainConfig(steps=12, learning_rate=1e-2, warmup_steps=2, log_every=4)
    params, history = trainer.train(cfg, tcfg, trainer.init_params(cfg, seed=0), _batches(), log=lambda s: None)
    return params, history


@pytest.mark.slow
def test_loss_decreases():
    _, history = _trained()
    losses = [r["loss"] for r in history]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2]), losses
    assert all(r["clipped_heads"] == 0 for r in history)  # τ = 100 is far above a fresh model's logits


@pytest.mark.slow
def test_step_applies_qk_clip_and_moves_the_router_bias():
    cfg, *_ = _setup()
    params = trainer.init_params(cfg, seed=1)
    batch = next(_batches(seed=1))
    _, stats = trainer.forward_with_stats(cfg, params, batch.tokens, batch.positions)
    before = jnp.concatenate([s["max_logit"].reshape(-1) for s in stats.values()])
    tau = float(jnp.median(before))  # half the heads are over it
    # A learning rate of ~0 isolates the clip: after the step the batch's logits are capped at τ.
    tcfg = trainer.TrainConfig(steps=1, learning_rate=1e-9, warmup_steps=0, qk_clip_tau=tau)
    optimizer = trainer.make_optimizer(cfg, tcfg)
    step = trainer.make_train_step(cfg, tcfg, optimizer)
    state, metrics = step(trainer.TrainState(params, optimizer.init(params), jnp.int32(0)), batch)
    assert int(metrics["clipped_heads"]) == int((before > tau).sum()) > 0
    _, stats = trainer.forward_with_stats(cfg, state.params, batch.tokens, batch.positions)
    after = jnp.concatenate([s["max_logit"].reshape(-1) for s in stats.values()])
    np.testing.assert_allclose(np.minimum(before, tau), after, rtol=1e-3)
    # The balancing rule moved the router bias by ±γ (or 0 for an expert exactly at the mean).
    delta = state.params["moe_layers"]["ffn"]["router_bias"] - params["moe_layers"]["ffn"]["router_bias"]
    assert np.all(np.isin(np.round(np.asarray(delta) / tcfg.router_bias_rate, 4), [-1.0, 0.0, 1.0]))
    assert np.any(delta != 0)


def test_export_loads_back_as_block_fp8(tmp_path):
    cfg, tok, model_bytes, examples = _setup()
    params, _ = _trained()
    directory = trainer.save_tiny_chat(params, cfg, model_bytes, tmp_path / "tiny")
    assert {"config.json", "model.safetensors.index.json", "model-1-of-2.safetensors", "model-2-of-2.safetensors",
            "tokenizer.model"} <= {p.name for p in directory.iterdir()}
    model = load(directory, dtype="float32")
    assert model.config.weight_block_size == (128, 128)
    assert model.tokenizer.special_ids == tok.special_ids
    ids = examples[0][0][None, :64]
    got = model.logits(ids)
    want, _ = trainer.forward_with_stats(cfg, jax.tree.map(jnp.asarray, params), ids,
                                         jnp.arange(ids.shape[1])[None])
    # fp8 weights: close, not equal; the top token mostly agrees.
    assert np.mean(np.argmax(got, -1) == np.argmax(np.asarray(want), -1)) > 0.9
    assert np.abs(got - np.asarray(want)).max() < 0.1 * np.abs(np.asarray(want)).max()
