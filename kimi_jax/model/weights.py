"""Every weight of the model, declared once: shape, logical axes, dtype, quantization, checkpoint name.

The Flax modules fetch their parameters from these declarations (`declare`), and everything else is
derived from the same table: the abstract parameter tree (`abstract_params`), random weights for
tests and the embedded default (`random_params`), Hugging Face checkpoint names for loading and
writing, and (in `sharding/`) each weight's placement on a mesh.

Weights keep the checkpoint's [out, in] orientation so fp8 scale blocks need no transposition.
Stacked groups (the dense prefix, the MoE layers) carry a leading `layers` axis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from kimi_jax.config import Config
from kimi_jax.model.quant import FP8, QArray, quantize_block_fp8

BF16 = "bfloat16"
F32 = "float32"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One weight: its per-layer shape and logical axes, storage dtype, and Hugging Face name.

    `hf` is a template with `{layer}` and, for routed experts, `{expert}`; for a per-expert weight the
    leading `experts` axis is assembled from one checkpoint tensor per expert.
    """

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    hf: str
    dtype: str = BF16
    quantized: bool = False
    init: str = "normal"  # "normal" (std 0.02), "ones" or "zeros"

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.hf


def _linear(cfg: Config, out: int, inp: int, axes: tuple[str, str], hf: str) -> ParamSpec:
    """A linear layer weight [out, in], block-fp8 when the checkpoint is quantized."""
    return ParamSpec((out, inp), axes, hf + ".weight", quantized=cfg.quantized)


def _norm(dim: int, axis: str, hf: str) -> ParamSpec:
    return ParamSpec((dim,), (axis,), hf + ".weight", init="ones")


def attention_specs(cfg: Config) -> dict[str, ParamSpec]:
    """MLA projections of one layer (see attention.py for the equations)."""
    a = "model.layers.{layer}.self_attn."
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


def mlp_specs(cfg: Config, inter: int, hf: str) -> dict[str, ParamSpec]:
    """SwiGLU MLP: the dense layers' MLP and the shared expert."""
    return {
        "gate": _linear(cfg, inter, cfg.hidden_size, ("mlp", "embed"), hf + "gate_proj"),
        "up": _linear(cfg, inter, cfg.hidden_size, ("mlp", "embed"), hf + "up_proj"),
        "down": _linear(cfg, cfg.hidden_size, inter, ("embed", "mlp"), hf + "down_proj"),
    }


def moe_specs(cfg: Config) -> dict[str, ParamSpec]:
    """Router (fp32 bias, bf16 weight, never quantized), routed experts stacked on `experts`, shared expert."""
    m = "model.layers.{layer}.mlp."
    e, i, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    q = cfg.quantized
    specs = {
        "router": ParamSpec((e, d), ("router_experts", "embed"), m + "gate.weight"),
        "router_bias": ParamSpec((e,), ("router_experts",), m + "gate.e_score_correction_bias", dtype=F32,
                                 init="zeros"),
        "experts_gate": ParamSpec((e, i, d), ("experts", "expert_mlp", "embed"),
                                  m + "experts.{expert}.gate_proj.weight", quantized=q),
        "experts_up": ParamSpec((e, i, d), ("experts", "expert_mlp", "embed"),
                                m + "experts.{expert}.up_proj.weight", quantized=q),
        "experts_down": ParamSpec((e, d, i), ("experts", "embed", "expert_mlp"),
                                  m + "experts.{expert}.down_proj.weight", quantized=q),
    }
    shared = mlp_specs(cfg, i * cfg.n_shared_experts, m + "shared_experts.")
    specs.update({f"shared_{k}": v for k, v in shared.items()})
    return specs


def layer_specs(cfg: Config, moe: bool) -> dict[str, Any]:
    """One decoder layer: pre-norms, attention, and a dense MLP or an MoE block."""
    l = "model.layers.{layer}."
    return {
        "attn_norm": _norm(cfg.hidden_size, "embed", l + "input_layernorm"),
        "attn": attention_specs(cfg),
        "mlp_norm": _norm(cfg.hidden_size, "embed", l + "post_attention_layernorm"),
        "ffn": moe_specs(cfg) if moe else mlp_specs(cfg, cfg.intermediate_size, l + "mlp."),
    }


# Names of the two stacked layer groups, in order; each holds `count(cfg)` layers from `first(cfg)`.
LAYER_GROUPS = {
    "dense_layers": (lambda c: 0, lambda c: c.num_dense_layers, False),
    "moe_layers": (lambda c: c.num_dense_layers, lambda c: c.num_moe_layers, True),
}


def model_specs(cfg: Config) -> dict[str, Any]:
    """The whole model's declarations. Layer groups are per-layer specs (stacking adds a `layers` axis)."""
    specs: dict[str, Any] = {"embed": ParamSpec((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                                "model.embed_tokens.weight")}
    for group, (_, count, moe) in LAYER_GROUPS.items():
        if count(cfg):
            specs[group] = layer_specs(cfg, moe)
    specs["final_norm"] = _norm(cfg.hidden_size, "embed", "model.norm")
    specs["lm_head"] = ParamSpec((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), "lm_head.weight")
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


def abstract_leaf(cfg: Config, shape: tuple[int, ...], spec: ParamSpec, fp8_dtype: Any = FP8) -> Any:
    if spec.quantized:
        return QArray(jax.ShapeDtypeStruct(shape, fp8_dtype),
                      jax.ShapeDtypeStruct(scale_shape(shape, cfg.weight_block_size), jnp.float32))
    return jax.ShapeDtypeStruct(shape, jnp.dtype(spec.dtype))


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
    """Number of stored values in a tree, fp8 scales included (as the release counts its tensors)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


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
