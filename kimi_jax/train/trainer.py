"""Training a tiny Kimi-K2-architecture model with MuonClip, and shipping it as a block-fp8 checkpoint.

The model trained is `kimi_jax.model.Transformer` itself, unquantized (`weight_block_size=None`)
in float32: the same module the engine serves. Its training forward pass also reports, per layer,
what the optimizer needs beyond gradients, without changing the model code: a Flax method
interceptor watches each MLA and MoE call and sows into the "intermediates" collection

  * `max_logit` [H]: each head's largest attention logit S_max^h (recomputed from the layer's
    weights and input by `muonclip.attention_max_logits`), for QK-Clip;
  * `expert_load` [E]: tokens routed to each expert (padding excluded), for the router bias rule.

The layer scan stacks both along the layer axis. One training step is then

    loss, grads   = next-token cross-entropy, weighted: assistant tokens 1, the rest `context_weight`
    params        = MuonClip update (Muon for matrices, AdamW for the rest)
    params        = QK-Clip with the step's S_max      (heads over τ rescaled)
    router bias  += γ · sign(mean load − load)          (auxiliary-loss-free balancing)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

from kimi_jax.checkpoint.hf import save_hf_checkpoint
from kimi_jax.config import KIMI_K2, TINY_KIMI, Config
from kimi_jax.model.attention import MLA
from kimi_jax.model.backend import REFERENCE
from kimi_jax.model.decoder import Transformer
from kimi_jax.model.moe import MoE, route
from kimi_jax.model.quant import QArray, quantize_block_fp8
from kimi_jax.model.weights import LAYER_GROUPS, build_tree
from kimi_jax.runtime.engine import Model, load
from kimi_jax.text.tokenizer import SentencePieceTokenizer
from kimi_jax.train import corpus, evaluate, muonclip
from kimi_jax.train.corpus import Batch

FP8_BLOCK = (128, 128)  # the release's block size for the shipped checkpoint


def tiny_chat_config(vocab_size: int, bos_token_id: int | None = None, eos_token_id: int | None = None,
                     **overrides) -> Config:
    """The Kimi-K2 architecture at toy size, unquantized for training.

    Hidden 128, 3 layers: MLA (4 heads, q/kv latents of 64, nope 32 + rope 32, v 32), a dense first
    layer (MLP 384), then two MoE layers with 8 routed experts of width 64 (top-2, noaux_tc sigmoid
    routing) and a shared expert of the same width; Kimi-K2's YaRN settings and routed scaling
    factor. `overrides` replace any of these sizes.

    The rotary part is as wide as the no-position part and uses DeepSeek-V3's base 10000 rather
    than Kimi-K2's 50000: copying an unseen name token by token needs a head that attends to
    exactly the previous token, and with 16 rotary dims at base 50000 only ~4 frequencies are
    fast enough to tell position t−1 from t−2 (measured: copying held-out names in a short
    context reached 66% after 600 steps against 48%).
    """
    sizes = dict(hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=3,
                 first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64,
                 qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2,
                 rope_theta=10000.0)
    return dataclasses.replace(TINY_KIMI, vocab_size=vocab_size, rope_scaling=KIMI_K2.rope_scaling,
                               max_position_embeddings=4096, weight_block_size=None, bos_token_id=bos_token_id,
                               eos_token_id=eos_token_id, name="kimi-jax-tiny-chat", **{**sizes, **overrides})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (the model's shape is the `Config`)."""

    steps: int = 1000
    learning_rate: float = 3e-3  # peak, shared by Muon and AdamW (Muon's update is RMS-matched)
    warmup_steps: int = 50
    final_lr_fraction: float = 0.1  # cosine decay to this fraction of the peak
    weight_decay: float = 0.1
    momentum: float = 0.95
    qk_clip_tau: float = 100.0  # QK-Clip threshold τ on the max attention logit (the report's value)
    router_bias_rate: float = 1e-3  # γ of the auxiliary-loss-free bias update (DeepSeek-V3's value)
    log_every: int = 25
    seed: int = 0

    def schedule(self) -> optax.Schedule:
        warmup = min(self.warmup_steps, self.steps // 2)  # short (test) runs still decay
        return optax.warmup_cosine_decay_schedule(0.0, self.learning_rate, warmup, max(self.steps, warmup + 1),
                                                  self.learning_rate * self.final_lr_fraction)


def init_params(cfg: Config, seed: int = 0) -> dict[str, Any]:
    """Fresh float32 weights from the declarations' initialisers (`Module.init`: N(0, 0.02), norms 1, bias 0)."""
    if cfg.quantized:
        raise ValueError(f"training needs unquantized weights: build the config with weight_block_size=None "
                         f"(got {cfg.weight_block_size})")
    tokens = jnp.zeros((1, 8), jnp.int32)
    positions = jnp.arange(8, dtype=jnp.int32)[None]
    params = jax.jit(Transformer(cfg, dtype=jnp.float32).init)(jax.random.key(seed), tokens, positions)["params"]
    return jax.tree.map(lambda a: a.astype(jnp.float32), params)


# Forward pass with the optimizer's statistics -------------------------------------------------------
def train_model(cfg: Config) -> Transformer:
    """The engine's Transformer in float32 with the reference backend: plain products, and the routed
    experts as `experts.reference_experts` (every expert on every token, weighted by the sparse
    routing weights, so the result is the sparse kernels').

    Training needs a reverse-differentiable kernel. The CPU "grouped" kernel skips unused tiles with
    a dynamic-trip-count loop, which reverse mode cannot differentiate; "ragged" differentiates but
    is a masked dense product on CPU. With 8 experts the plain loop is the fastest of the three
    (measured on 2 busy CPU cores, 4096-token steps: ~1.4 s against ~1.7 s for a differentiable
    variant of "grouped" and ~2.3 s for "ragged").
    """
    return Transformer(cfg, backend=REFERENCE, dtype=jnp.float32)


def forward_with_stats(cfg: Config, params: dict[str, Any], tokens: jax.Array,
                       positions: jax.Array) -> tuple[jax.Array, dict[str, dict[str, jax.Array]]]:
    """logits [B, T, V] and, per layer group, {"max_logit": [L, H], "expert_load": [L, E] (MoE groups)}."""
    valid = (positions >= 0).reshape(-1)  # (B·T,) padding tokens count for no expert

    def watch(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__":
            return out
        if isinstance(module, MLA):
            h, pos = args[0], args[1]
            module.sow("intermediates", "max_logit",
                       muonclip.attention_max_logits(cfg, module.variables["params"], h, pos))
        elif isinstance(module, MoE):
            p = module.variables["params"]
            _, idx = route(args[0].reshape(-1, cfg.hidden_size), p["router"], p["router_bias"], cfg)  # (N, k)
            chosen = jax.nn.one_hot(idx, cfg.n_routed_experts, dtype=jnp.float32).sum(1)  # (N, E)
            module.sow("intermediates", "expert_load", jnp.einsum("ne,n->e", chosen, valid.astype(jnp.float32)))
        return out

    with nn.intercept_methods(watch):
        (logits, _), state = train_model(cfg).apply(
            {"params": params}, tokens, positions, mutable=["intermediates"])
    found = state["intermediates"]
    stats = {}
    for group in LAYER_GROUPS:
        if group in found:
            stats[group] = {"max_logit": found[group]["attn"]["max_logit"][0]}
            if "ffn" in found[group] and "expert_load" in found[group]["ffn"]:
                stats[group]["expert_load"] = found[group]["ffn"]["expert_load"][0]
    return logits, stats


def masked_cross_entropy(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over the targets the mask marks: logits[t] predicts tokens[t+1]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # (B, T-1)
    weight = mask[:, 1:].astype(jnp.float32)
    return (nll * weight).sum() / jnp.maximum(weight.sum(), 1.0)


# The training step --------------------------------------------------------------------------------
class TrainState(NamedTuple):
    params: dict[str, Any]
    opt_state: Any
    step: jax.Array


def make_optimizer(cfg: Config, tcfg: TrainConfig) -> optax.GradientTransformation:
    return muonclip.muonclip(cfg, tcfg.schedule(), tcfg.weight_decay, tcfg.momentum)


def make_train_step(cfg: Config, tcfg: TrainConfig,
                    optimizer: optax.GradientTransformation) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """A jitted (state, batch) -> (state, metrics): gradient step, QK-Clip, router-bias update."""

    def loss_fn(params, tokens, positions, mask):
        logits, stats = forward_with_stats(cfg, params, tokens, positions)
        return masked_cross_entropy(logits, tokens, mask), stats

    @jax.jit
    def step(state: TrainState, tokens, positions, mask):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, tokens, positions, mask)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        max_logits = {g: s["max_logit"] for g, s in stats.items()}
        params = muonclip.qk_clip(params, max_logits, cfg, tcfg.qk_clip_tau)
        imbalance = []
        for group, s in stats.items():
            if "expert_load" in s:
                ffn = params[group]["ffn"]
                bias = muonclip.update_router_bias(ffn["router_bias"], s["expert_load"], tcfg.router_bias_rate)
                params = {**params, group: {**params[group], "ffn": {**ffn, "router_bias": bias}}}
                load = s["expert_load"]
                imbalance.append((load.max(-1) / jnp.maximum(load.mean(-1), 1.0)).max())
        all_logits = jnp.concatenate([m.reshape(-1) for m in max_logits.values()])
        metrics = {"loss": loss, "max_logit": all_logits.max(),
                   "clipped_heads": (all_logits > tcfg.qk_clip_tau).sum(),
                   "load_imbalance": jnp.max(jnp.stack(imbalance)) if imbalance else jnp.float32(1.0),
                   "grad_norm": optax.global_norm(grads)}
        return TrainState(params, opt_state, state.step + 1), metrics

    return lambda state, batch: step(state, batch.tokens, batch.positions, batch.mask)


def train(cfg: Config, tcfg: TrainConfig, params: dict[str, Any], batches: Iterator[Batch],
          log: Callable[[str], None] = print) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Run `tcfg.steps` steps from `params`; returns the trained params and a metrics row per step."""
    optimizer = make_optimizer(cfg, tcfg)
    state = TrainState(params, optimizer.init(params), jnp.int32(0))
    step_fn = make_train_step(cfg, tcfg, optimizer)
    schedule = tcfg.schedule()
    history: list[dict[str, float]] = []
    start = last = time.perf_counter()
    for i in range(tcfg.steps):
        batch = next(batches)
        state, metrics = step_fn(state, batch)
        row = {k: float(v) for k, v in metrics.items()}
        row.update(step=i + 1, tokens=int(batch.tokens.size), seconds=time.perf_counter() - start)
        history.append(row)
        if (i + 1) % tcfg.log_every == 0 or i == 0 or i + 1 == tcfg.steps:
            now = time.perf_counter()
            recent = history[-tcfg.log_every:]
            log(f"step {i + 1:5d}  loss {np.mean([r['loss'] for r in recent]):.4f}  "
                f"max_logit {max(r['max_logit'] for r in recent):6.2f}  "
                f"clipped {int(sum(r['clipped_heads'] for r in recent)):3d}  "
                f"load {row['load_imbalance']:.2f}  lr {float(schedule(i)):.2e}  "
                f"{(now - last) / len(recent):.2f}s/step")
            last = now
    return jax.device_get(state.params), history


# Shipping ------------------------------------------------------------------------------------------
def quantize_params(params: dict[str, Any], cfg: Config, block: tuple[int, int] = FP8_BLOCK) -> tuple[dict, Config]:
    """Trained float32 params -> the release's storage: block-fp8 linear weights, bf16 embeddings, norms
    and router weight, float32 router bias (as `weights` declares them for the quantized config)."""
    qcfg = dataclasses.replace(cfg, weight_block_size=block)

    def convert(leaf):
        node = params
        for k in leaf.path:
            node = node[k]
        w = np.asarray(node, np.float32)
        if leaf.spec.quantized:
            return QArray(*quantize_block_fp8(w, block))
        return w.astype(ml_dtypes.bfloat16 if leaf.spec.dtype == "bfloat16" else np.float32)

    return build_tree(qcfg, convert), qcfg


def save_tiny_chat(params: dict[str, Any], cfg: Config, tokenizer_model: bytes, directory: str | Path,
                   num_shards: int = 2) -> Path:
    """Write the block-fp8 checkpoint in the hub layout plus `tokenizer.model` (sentencepiece)."""
    qparams, qcfg = quantize_params(params, cfg)
    directory = save_hf_checkpoint(qparams, qcfg, directory, num_shards=num_shards)
    (directory / "tokenizer.model").write_bytes(tokenizer_model)
    return directory


def checkpoint_bytes(directory: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).iterdir() if f.is_file())


# The whole recipe --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that defines the shipped tiny chat model: corpus, tokenizer, batching, optimisation.

    Two phases: `copy_steps` steps on multi-turn copying conversations alone, then the chat mix
    with every `copy_every`-th batch a copying one. Copying an unseen city name into a tool call is
    what a tiny model learns last; non-assistant tokens are trained with weight `context_weight`,
    which is what lifted the answers from the tool's result (to 98-100%). Held-out tool calls with
    the right city (44 cities, greedy / sampled; 3500 steps, ~27 min on 2 CPU cores), as the corpus
    grew: made-up names of random consonant-vowel syllables, 39%; names with consonant clusters,
    accents and the training cities' letter statistics, 75% / 70% (the rest stopped the name too
    late or too early around words that follow it); with composed phrasings (and 1000 copy steps),
    73% / 73%; with "spot the city in a sentence" copy turns, 84% / 84% (the rest: second calls,
    index 1, copied the tool result's header "functions.get_weather:0\n" instead of opening the
    arguments); with whole new questions as second calls, the shipped recipe: 93% / 93% (answers
    98% / 100%, 1607 s of training).
    """

    conversations: int = 24000
    copy_conversations: int = 8000  # the copy phase's corpus (corpus.generate_copy_conversations)
    copy_steps: int = 1500  # steps on copying alone before the chat mix
    copy_every: int = 4  # then every copy_every-th batch is a copying batch, so that copying keeps improving
    context_weight: float = 0.3  # loss weight of non-assistant tokens (assistant tokens: 1)
    corpus_seed: int = 0
    vocab_size: int = 1024  # small, so that every piece of a name is frequent enough to be copied
    buckets: tuple[int, ...] = (64, 128, 256, 384, 512)  # padded lengths; longer conversations are dropped
    tokens_per_batch: int = 3072
    train: TrainConfig = TrainConfig(steps=3500, learning_rate=0.008, log_every=100)  # ~28 min on 2 CPU cores


def train_tiny_chat(out_dir: str | Path, recipe: Recipe = Recipe(), log: Callable[[str], None] = print,
                    eval_cases: int | None = None) -> dict[str, Any]:
    """Corpus -> tokenizer -> MuonClip training -> block-fp8 checkpoint in `out_dir` -> held-out eval.

    Returns (and writes to `out_dir/training.json`) the recipe, timings, losses and eval figures;
    the evaluation runs on the checkpoint as written, loaded back with `kimi_jax.load`.
    """
    start = time.perf_counter()
    conversations = corpus.generate_conversations(recipe.conversations, recipe.corpus_seed)
    corpus.check_heldout_unseen(conversations)
    tokenizer_model = corpus.train_tokenizer(conversations, recipe.vocab_size)
    tokenizer = SentencePieceTokenizer(tokenizer_model)
    examples = corpus.encode_corpus(tokenizer, conversations, max(recipe.buckets))
    log(f"corpus: {len(examples)} conversations, {sum(len(ids) for ids, _ in examples)} tokens "
        f"({sum(int(m.sum()) for _, m in examples)} trained on), vocab {tokenizer.vocab_size}, "
        f"{time.perf_counter() - start:.0f}s")

    cfg = tiny_chat_config(tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)
    params = init_params(cfg, recipe.train.seed)
    copies = corpus.encode_corpus(tokenizer, corpus.generate_copy_conversations(
        recipe.copy_conversations, recipe.corpus_seed + 1), max(recipe.buckets))
    copying = corpus.batches(copies, recipe.tokens_per_batch, recipe.buckets, tokenizer.pad_id, recipe.train.seed,
                             recipe.context_weight)
    chat = corpus.batches(examples, recipe.tokens_per_batch, recipe.buckets, tokenizer.pad_id, recipe.train.seed,
                          recipe.context_weight)
    batches = itertools.chain(itertools.islice(copying, recipe.copy_steps),
                              _interleave(chat, copying, recipe.copy_every))
    params, history = train(cfg, recipe.train, params, batches, log)
    train_seconds = history[-1]["seconds"]

    cases = corpus.heldout_weather_cases(eval_cases)
    trained = Model(cfg, jax.tree.map(jnp.asarray, params), dtype="float32", tokenizer=tokenizer)
    report_f32 = evaluate.evaluate(trained, tokenizer, cases)
    log(f"eval (float32 weights): {_figures(report_f32)}")
    out_dir = save_tiny_chat(params, cfg, tokenizer_model, out_dir)
    model = load(out_dir, dtype="float32")  # the shipped block-fp8 checkpoint, as a user loads it
    report = evaluate.evaluate(model, model.tokenizer, cases)
    window = history[-recipe.train.log_every:]
    summary = {
        "recipe": dataclasses.asdict(recipe),
        "parameters": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "final_loss": float(np.mean([r["loss"] for r in window])),
        "max_attention_logit": max(r["max_logit"] for r in history),
        "clipped_head_steps": int(sum(r["clipped_heads"] for r in history)),
        "loss_curve": [(r["step"], round(r["loss"], 4), round(r["max_logit"], 2)) for r in history
                       if r["step"] % recipe.train.log_every == 0],
        "checkpoint_bytes": checkpoint_bytes(out_dir),
        "eval": _figures(report),
        "eval_float32": _figures(report_f32),
        "eval_failures": report["failures"],
    }
    (out_dir / "training.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    log(f"eval: {summary['eval']}; checkpoint {summary['checkpoint_bytes'] / 1e6:.2f} MB in {out_dir}")
    return summary


def _interleave(main: Iterator[Batch], extra: Iterator[Batch], every: int) -> Iterator[Batch]:
    """`main`'s batches with one of `extra`'s in place of every `every`-th (never, if every <= 0)."""
    for i in itertools.count(1):
        yield next(extra) if every > 0 and i % every == 0 else next(main)


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k != "failures"}
