"""Every weight of the model, declared once: shape, logical axes, dtype, quantization, checkpoint name.

The Flax modules fetch their parameters from these declarations (`declare`), and everything else is
derived from the same table: the abstract parameter tree (`abstract_params`), random weights for
tests and the embedded default (`random_params`), Hugging Face checkpoint names for loading and
writing, and (in `sharding/`) each weight's placement on a mesh.

Weights keep the checkpoint's [out, in] orientation so fp8 scale blocks need no transposition.
Stacked groups (the dense prefix, the MoE layers) carry a leading `layers` axis.

Which linear weights are quantized, and how, follows the checkpoint's quantization_config: all of
them block-fp8 (`weight_block_size`), or INT4 where compressed-tensors' `ignore` list leaves them
(`Config.int4`: for Kimi-K2-Thinking the routed experts only). A spec says so with `quantized` and
`kind`; `stored_parts` gives the arrays that hold it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.config import Config, ConfigError
from kimi_jax.model.quant import FP8, FP8_KIND, INT4, INT4_PER_WORD, QArray, quantize_block_fp8, quantize_int4

BF16 = "bfloat16"
F32 = "float32"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One weight: its per-layer shape and logical axes, storage dtype, and Hugging Face name.

    `hf` is a template with `{layer}` and, for routed experts, `{expert}`; for a per-expert weight the
    leading `experts` axis is assembled from one checkpoint tensor per expert. A `quantized` weight is
    a QArray of `kind` "fp8" (block-fp8) or "int4" (compressed-tensors pack-quantized).
    """

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    hf: str
    dtype: str = BF16
    quantized: bool = False
    init: str = "normal"  # "normal" (std 0.02), "ones" or "zeros"
    kind: str = FP8_KIND  # how a quantized weight is stored (quant.QArray kinds)
    stored_rows: int | None = None  # rows in the checkpoint when `shape[0]` is padded (the vocabulary)

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.hf


def _linear(cfg: Config, out: int, inp: int, axes: tuple[str, str], hf: str,
            layers: tuple[int, int] | None = None, experts: int = 0) -> ParamSpec:
    """A linear layer weight [out, in]: block-fp8 when the checkpoint is, INT4 where its compressed-tensors
    config says so for every module the name covers (`layers`, default all; `experts` per-expert copies)."""
    shape = (out, inp) if not experts else (experts, out, inp)
    if cfg.int4 is None:
        return ParamSpec(shape, axes, hf + ".weight", quantized=cfg.quantized)
    int4 = _is_int4(cfg, hf, layers or (0, cfg.num_hidden_layers), experts)
    if int4 and inp % INT4_PER_WORD:
        raise ConfigError(f"{hf}: INT4 packs {INT4_PER_WORD} input values per int32 word, and its input dim "
                          f"{inp} is not a multiple of {INT4_PER_WORD}; the engine cannot hold it packed")
    return ParamSpec(shape, axes, hf + ".weight", quantized=int4, kind=INT4 if int4 else FP8_KIND)


@functools.lru_cache(maxsize=128)
def _is_int4(cfg: Config, module: str, layers: tuple[int, int], experts: int) -> bool:
    """Whether the modules named by the template `module` are INT4 under `cfg.int4`'s ignore list.

    Every concrete name is asked (all its layers and experts): one stacked weight has one format, so a
    list that quantizes some of them and not others is refused, naming two that disagree.
    """
    names = [module.format(layer=layer, expert=expert) for layer in range(*layers)
             for expert in (range(experts) if experts else (None,))]
    verdicts = {name: cfg.int4.quantizes(name) for name in names}
    if len(set(verdicts.values())) > 1:
        yes = next(n for n, v in verdicts.items() if v)
        no = next(n for n, v in verdicts.items() if not v)
        raise ConfigError(f"quantization_config.ignore makes '{yes}' INT4 but not '{no}': kimi_jax stacks "
                          "these weights, which need one format; the engine cannot load this checkpoint")
    return bool(names) and verdicts[names[0]]


def _norm(dim: int, axis: str, hf: str) -> ParamSpec:
    return ParamSpec((dim,), (axis,), hf + ".weight", init="ones")


def attention_specs(cfg: Config) -> dict[str, ParamSpec]:
    """MLA projections of one layer (see attention.py for the equations)."""
    a = cfg.weights_prefix + "model.layers.{layer}.self_attn."
    h = cfg.num_attention_heads
    return {
        "q_a_proj": _linear(cfg, cfg.q_lora_rank, cfg.hidden_size, ("q_lora", "embed"), a + "q_a_proj"),
        "q_a_norm": _norm(cfg.q_lora_rank, "q_lora", a + "q_a_layernorm"),
        "q_b_proj": _linear(cfg, h * cfg.qk_head_dim, cfg.q_lora_rank, ("heads_qk", "q_lora"), a + "q_b_proj"),
        "kv_a_proj": _linear(cfg, cfg.kv_cache_width, cfg.hidden_size, ("kv_lora_rope", "embed"),
                             a + "kv_a_proj_with_mqa"),
        "kv_a_norm": _norm(cfg.kv_lora_rank, "kv_lora", a + "kv_a_layernorm"),
        "kv_b_proj": _linear(cfg, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank,
                             ("heads_kv", "kv_lora"), a + "kv_b_proj"),
        "o_proj": _linear(cfg, cfg.hidden_size, h * cfg.v_head_dim, ("embed", "heads_v"), a + "o_proj"),
    }


def mlp_specs(cfg: Config, inter: int, hf: str, layers: tuple[int, int] | None = None) -> dict[str, ParamSpec]:
    """SwiGLU MLP: the dense layers' MLP and the shared expert."""
    return {
        "gate": _linear(cfg, inter, cfg.hidden_size, ("mlp", "embed"), hf + "gate_proj", layers),
        "up": _linear(cfg, inter, cfg.hidden_size, ("mlp", "embed"), hf + "up_proj", layers),
        "down": _linear(cfg, cfg.hidden_size, inter, ("embed", "mlp"), hf + "down_proj", layers),
    }


def _moe_layers(cfg: Config) -> tuple[int, int]:
    return cfg.num_dense_layers, cfg.num_hidden_layers


def moe_specs(cfg: Config) -> dict[str, ParamSpec]:
    """Router (fp32 bias, bf16 weight, never quantized), routed experts stacked on `experts`, shared expert."""
    m = cfg.weights_prefix + "model.layers.{layer}.mlp."
    e, i, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    up = ("experts", "expert_mlp", "embed")
    specs = {
        "router": ParamSpec((e, d), ("router_experts", "embed"), m + "gate.weight"),
        "router_bias": ParamSpec((e,), ("router_experts",), m + "gate.e_score_correction_bias", dtype=F32,
                                 init="zeros"),
        "experts_gate": _linear(cfg, i, d, up, m + "experts.{expert}.gate_proj", _moe_layers(cfg), e),
        "experts_up": _linear(cfg, i, d, up, m + "experts.{expert}.up_proj", _moe_layers(cfg), e),
        "experts_down": _linear(cfg, d, i, ("experts", "embed", "expert_mlp"), m + "experts.{expert}.down_proj",
                                _moe_layers(cfg), e),
    }
    shared = mlp_specs(cfg, i * cfg.n_shared_experts, m + "shared_experts.", _moe_layers(cfg))
    specs.update({f"shared_{k}": v for k, v in shared.items()})
    return specs


def layer_specs(cfg: Config, moe: bool) -> dict[str, Any]:
    """One decoder layer: pre-norms, attention, and a dense MLP or an MoE block."""
    l = cfg.weights_prefix + "model.layers.{layer}."
    dense = mlp_specs(cfg, cfg.intermediate_size, l + "mlp.", (0, cfg.num_dense_layers)) if not moe else None
    return {
        "attn_norm": _norm(cfg.hidden_size, "embed", l + "input_layernorm"),
        "attn": attention_specs(cfg),
        "mlp_norm": _norm(cfg.hidden_size, "embed", l + "post_attention_layernorm"),
        "ffn": moe_specs(cfg) if moe else dense,
    }


# Names of the two stacked layer groups, in order; each holds `count(cfg)` layers from `first(cfg)`.
LAYER_GROUPS = {
    "dense_layers": (lambda c: 0, lambda c: c.num_dense_layers, False),
    "moe_layers": (lambda c: c.num_dense_layers, lambda c: c.num_moe_layers, True),
}


def model_specs(cfg: Config) -> dict[str, Any]:
    """The whole model's declarations. Layer groups are per-layer specs (stacking adds a `layers` axis)."""
    p = cfg.weights_prefix
    rows = cfg.vocab_size if cfg.vocab_padding else None  # padded rows read as zeros, never written
    specs: dict[str, Any] = {"embed": ParamSpec((cfg.padded_vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                                p + "model.embed_tokens.weight", stored_rows=rows)}
    for group, (_, count, moe) in LAYER_GROUPS.items():
        if count(cfg):
            specs[group] = layer_specs(cfg, moe)
    specs["final_norm"] = _norm(cfg.hidden_size, "embed", p + "model.norm")
    if cfg.int4 is not None and cfg.int4.quantizes(p + "lm_head"):
        raise ConfigError(f"quantization_config makes '{p}lm_head' INT4; kimi_jax keeps lm_head unquantized "
                          "(every Kimi INT4 release lists it in 'ignore'): add \"re:.*lm_head.*\" to the ignore list")
    specs["lm_head"] = ParamSpec((cfg.padded_vocab_size, cfg.hidden_size), ("vocab", "embed"), p + "lm_head.weight",
                                 stored_rows=rows)
    return specs


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A spec placed in the model: its tree path, stacked shape/axes, and checkpoint layers."""

    path: tuple[str, ...]
    spec: ParamSpec
    layers: tuple[int, ...] | None  # checkpoint layer indices of a stacked group, None if unstacked

    @property
    def shape(self) -> tuple[int, ...]:
        return self.spec.shape if self.layers is None else (len(self.layers), *self.spec.shape)

    @property
    def axes(self) -> tuple[str, ...]:
        return self.spec.axes if self.layers is None else ("layers", *self.spec.axes)

    @property
    def name(self) -> str:
        return "/".join(self.path)


def leaves(cfg: Config) -> Iterator[Leaf]:
    """Every weight of the model with its stacked shape, in a stable order."""
    specs = model_specs(cfg)
    for key, value in specs.items():
        if key in LAYER_GROUPS:
            first, count, _ = LAYER_GROUPS[key]
            layers = tuple(range(first(cfg), first(cfg) + count(cfg)))
            for path, spec in _walk(value, (key,)):
                yield Leaf(path, spec, layers)
        else:
            yield Leaf((key,), value, None)


def _walk(tree: dict, prefix: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], ParamSpec]]:
    for k, v in tree.items():
        if isinstance(v, ParamSpec):
            yield (*prefix, k), v
        else:
            yield from _walk(v, (*prefix, k))


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the float32 scale_inv of a quantized weight of `shape` [..., out, in]."""
    return (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))


def stored_parts(cfg: Config, spec: ParamSpec, shape: tuple[int, ...],
                 fp8_dtype: Any = FP8) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The arrays that hold a weight of logical `shape`: {"values": (shape, dtype)[, "scales": ...]}.

    Plain: the weight itself. fp8: fp8 values (stored as `fp8_dtype`) and float32 scale_inv per
    block. INT4: int32 words [..., out, in/8] and bf16 scales [..., out, ceil(in/group)]. The
    checkpoint readers, the orbax format and the abstract tree all take their shapes from here.
    """
    if not spec.quantized:
        return {"values": (shape, np.dtype(spec.dtype))}
    if spec.kind == INT4:
        *lead, cols = shape
        return {"values": ((*lead, cols // INT4_PER_WORD), np.dtype(np.int32)),
                "scales": ((*lead, math.ceil(cols / cfg.int4.group_size)), np.dtype(jnp.bfloat16))}
    return {"values": (shape, np.dtype(fp8_dtype)),
            "scales": (scale_shape(shape, cfg.weight_block_size), np.dtype(np.float32))}


def abstract_leaf(cfg: Config, shape: tuple[int, ...], spec: ParamSpec, fp8_dtype: Any = FP8) -> Any:
    parts = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in stored_parts(cfg, spec, shape, fp8_dtype).items()}
    if spec.quantized:
        return QArray(parts["values"], parts["scales"], spec.kind)
    return parts["values"]


def build_tree(cfg: Config, fn: Callable[[Leaf], Any]) -> dict[str, Any]:
    """A nested dict with `fn(leaf)` at each weight's path."""
    tree: dict[str, Any] = {}
    for leaf in leaves(cfg):
        node = tree
        for k in leaf.path[:-1]:
            node = node.setdefault(k, {})
        node[leaf.path[-1]] = fn(leaf)
    return tree


def abstract_params(cfg: Config, fp8_dtype: Any = FP8) -> dict[str, Any]:
    """The parameter tree as `jax.ShapeDtypeStruct`s (QArray pairs for fp8 weights): no memory.

    fp8_dtype: the storage dtype of fp8 values (`Backend.fp8_storage`: uint8 on CPU).
    """
    return build_tree(cfg, lambda leaf: abstract_leaf(cfg, leaf.shape, leaf.spec, fp8_dtype))


def count_params(tree: Any) -> int:
    """Number of stored values in a tree, fp8 scales included (as the release counts its tensors); an
    INT4 weight counts its logical values (8 per stored word) and its scales."""
    def count(x) -> int:
        if isinstance(x, QArray):
            return math.prod(x.shape) + math.prod(x.scales.shape)
        return math.prod(x.shape)

    return sum(count(x) for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QArray)))


def param_bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# Initial and random weights ----------------------------------------------------------------------
def initial_value(cfg: Config, spec: ParamSpec, shape: tuple[int, ...], key: jax.Array, std: float = 0.02,
                  jitter: float = 0.0) -> Any:
    """One weight of `shape` from its declaration: N(0, std), or ones / zeros, block-fp8 when the spec is.

    `jitter` adds jitter · N(0, 1) to the ones and zeros (norm weights, the router bias), so that tests
    exercise them; `Module.init` (training) uses none.
    """
    if spec.init == "normal":
        w = std * jax.random.normal(key, shape, jnp.float32)
    else:
        base = jnp.ones(shape, jnp.float32) if spec.init == "ones" else jnp.zeros(shape, jnp.float32)
        w = base + jitter * jax.random.normal(key, shape, jnp.float32) if jitter else base
    if spec.quantized and spec.kind == INT4:
        return QArray(*quantize_int4(w, cfg.int4.group_size), INT4)
    if spec.quantized:
        return QArray(*quantize_block_fp8(w, cfg.weight_block_size))
    return w.astype(spec.dtype)


# Norm weights get 1 + N(0, 0.1²) and the router bias N(0, 0.05²) in random test weights.
RANDOM_JITTER = {"ones": 0.1, "zeros": 0.05, "normal": 0.0}


def random_params(cfg: Config, seed: int = 0, std: float = 0.02) -> dict[str, Any]:
    """Deterministic random weights (numpy, host memory) in the engine's tree layout, for tests,
    benchmarks and the random test checkpoint: `initial_value` per weight, one key per weight."""
    key = jax.random.key(seed)
    # One compiled program per distinct (shape, spec): the big stacks are generated without Python loops.
    make = jax.jit(lambda k, spec, shape: initial_value(cfg, spec, shape, k, std, RANDOM_JITTER[spec.init]),
                   static_argnums=(1, 2))
    counter = iter(range(1 << 30))
    return build_tree(cfg, lambda leaf: jax.device_get(make(jax.random.fold_in(key, next(counter)), leaf.spec,
                                                            leaf.shape)))


def declare(module, specs: dict[str, ParamSpec], cfg: Config) -> dict[str, Any]:
    """Inside a Flax `@nn.compact` method: one `self.param` per declared weight."""
    return {name: module.param(name, lambda key, s=spec: initial_value(cfg, s, s.shape, key))
            for name, spec in specs.items() if isinstance(spec, ParamSpec)}
