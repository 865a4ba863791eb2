"""One rules table maps the model's logical axes to mesh axes; every sharding is derived from it.

Weights name their dimensions once, in `kimi_jax.weights` (`vocab`, `embed`, `heads_qk`, `experts`,
`expert_mlp`, `layers` …); activations name theirs at a few `Layout.constrain` calls (`batch`,
`seq`, `heads` …). A rules table says which mesh axes split each name. Change the table, not the
model, to change the parallelism.

Block-fp8 scales. A quantized weight's `scales` [..., ceil(out/bo), ceil(in/bi)] follow its
`values` on the leading (layers, experts) dimensions. On the two block dimensions a scale dimension
is split only when every shard of the values holds whole blocks (dim / shards a multiple of the
block); otherwise the scales stay replicated on that dimension (they are ~1/16000 of the weight)
and the code that dequantizes a local shard picks its own blocks (`sharding.layout.local_blocks`;
GSPMD does the same on its own outside shard_map). Kimi-K2's head- and expert-split dimensions
are whole blocks up to tensor=16; the tiny test configs exercise the replicated case.

INT4 weights (compressed-tensors, Kimi-K2-Thinking's routed experts): `values` are int32 words
[..., out, in/8] and `scales` bf16 [..., out, in/32], both named by the weight's logical axes. The
out dim splits as any other; the in dim (for the experts' down_proj, `expert_mlp` along `tensor`)
splits whole words (in/8 must divide), and its scales follow where each shard holds whole groups of
32, else stay replicated (the same rule as fp8 blocks, with blocks of (1, 32)).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kimi_jax.config import Config
from kimi_jax.model.decoder import init_cache
from kimi_jax.model.quant import INT4, INT4_PER_WORD, QArray
from kimi_jax.model.weights import Leaf, abstract_leaf, build_tree, leaves
from sharding.mesh import MeshError, MeshSpec, abstract_mesh

HEAD_AXES = ("heads", "heads_qk", "heads_kv", "heads_v")  # flattened head dims split by whole heads


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical axis -> the mesh axes that split it (empty: replicated). Hashable, so jit can key on it."""

    name: str
    table: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def of(cls, name: str, table: Mapping[str, str | Sequence[str] | None]) -> Rules:
        def axes(v):
            return () if v is None else (v,) if isinstance(v, str) else tuple(v)

        return cls(name, tuple((k, axes(v)) for k, v in table.items()))

    def replace(self, name: str, **changes: str | Sequence[str] | None) -> Rules:
        """A copy with some logical axes remapped, e.g. `RULES.replace("x", experts=None)`."""
        return Rules.of(name, {**dict(self.table), **changes})

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        if logical is None:
            return ()
        table = dict(self.table)
        if logical not in table:
            raise MeshError(f"rules table '{self.name}' has no entry for logical axis '{logical}'; "
                            f"add it (known: {', '.join(table)})")
        return table[logical]

    def spec(self, axes: Sequence[str | None], what: str = "array") -> P:
        """PartitionSpec for logical `axes`; a mesh axis used by two dimensions is an error."""
        used: dict[str, str] = {}
        entries = []
        for logical in axes:
            mesh_axes = self.mesh_axes(logical)
            for m in mesh_axes:
                if m in used:
                    raise MeshError(f"rules table '{self.name}' maps both '{used[m]}' and '{logical}' of {what} "
                                    f"(axes {tuple(axes)}) to mesh axis '{m}'; a mesh axis can split one "
                                    "dimension of an array only")
                used[m] = logical
            entries.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        return P(*entries)


_BASE = {
    "layers": None, "batch": "data", "seq": None, "cache_seq": None, "embed": None, "vocab": "tensor",
    # MLA: per-head projections split by head; the small latent projections stay replicated.
    "heads": "tensor", "heads_qk": "tensor", "heads_kv": "tensor", "heads_v": "tensor",
    "q_lora": None, "kv_lora": None, "kv_lora_rope": None,
    # Dense MLP and shared expert: Megatron split of the intermediate dim. Router: replicated.
    "mlp": "tensor", "router_experts": None,
    # Routed experts: whole experts along `expert`, each expert's intermediate dim along `tensor`.
    "experts": "expert", "expert_mlp": "tensor",
}

RULES = Rules.of("default", _BASE)
# Attention data-parallel over `expert` too: each expert-group device attends for its own slice of
# the batch and holds only that slice's KV cache; the MoE gathers the group's tokens (see DESIGN.md).
DP_ATTENTION_RULES = RULES.replace("dp_attention", batch=("data", "expert"))
# Every device holds every expert (split only along `tensor`): the baseline expert parallelism beats.
REPLICATED_EXPERTS_RULES = RULES.replace("replicated_experts", experts=None)
RULE_TABLES = {r.name: r for r in (RULES, DP_ATTENTION_RULES, REPLICATED_EXPERTS_RULES)}


def get_rules(rules: Rules | str | None) -> Rules:
    if rules is None:
        return RULES
    if isinstance(rules, Rules):
        return rules
    if rules not in RULE_TABLES:
        raise MeshError(f"unknown rules table {rules!r}; choose one of {', '.join(RULE_TABLES)}")
    return RULE_TABLES[rules]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _split_size(mesh: Mesh, spec_entry) -> int:
    names = () if spec_entry is None else (spec_entry,) if isinstance(spec_entry, str) else spec_entry
    return math.prod(mesh.shape[n] for n in names)


def _axis_label(spec_entry) -> str:
    return spec_entry if isinstance(spec_entry, str) else "×".join(spec_entry)


def check_divisible(what: str, logical: str, size: int, count: int, unit: str, mesh, entry,
                    valid: list[int] | None = None) -> None:
    """`count` things (heads, experts, rows) of dimension `logical` must split evenly over the mesh axes."""
    shards = _split_size(mesh, entry)
    if count % shards:
        axis = _axis_label(entry)
        things = f"{count} {unit} (dimension '{logical}' of size {size})" if unit else \
            f"dimension '{logical}' of size {size}"
        scope = "for this model" if valid else "for this dimension"
        valid = valid or divisors(count)
        raise MeshError(f"{what}: {things} does not split over mesh axis '{axis}' of size {shards}; valid "
                        f"'{axis}' sizes {scope}: {', '.join(str(d) for d in valid[:16])}")


def _count(cfg: Config, logical: str, size: int) -> tuple[int, str]:
    """What must divide evenly: whole heads for flattened head dims, else the dimension itself."""
    return (cfg.num_attention_heads, "heads") if logical in HEAD_AXES else (size, "")


def valid_sizes(cfg: Config, rules: Rules, entry) -> list[int]:
    """Sizes of the mesh axes `entry` that every weight this model splits over them allows."""
    g = 0
    for leaf in leaves(cfg):
        for logical, size in zip(leaf.axes, leaf.shape):
            if rules.spec((logical,))[0] == entry:
                g = math.gcd(g, _count(cfg, logical, size)[0])
    return divisors(g) if g else [1]


def leaf_spec(leaf: Leaf, cfg: Config, mesh, rules: Rules) -> P:
    """The weight's PartitionSpec, with its divisibility checked against the mesh."""
    spec = rules.spec(leaf.axes, leaf.name)
    for logical, size, entry in zip(leaf.axes, leaf.shape, spec):
        count, unit = _count(cfg, logical, size)
        if entry is not None and count % _split_size(mesh, entry):
            check_divisible(leaf.name, logical, size, count, unit, mesh, entry, valid_sizes(cfg, rules, entry))
    if leaf.spec.quantized and leaf.spec.kind == INT4 and spec[-1] is not None:
        words = leaf.shape[-1] // INT4_PER_WORD  # the packed input dim splits whole int32 words
        check_divisible(leaf.name, f"{leaf.axes[-1]}, packed {INT4_PER_WORD} INT4 values per int32 word", words,
                        words, "words", mesh, spec[-1])
    return spec


def scale_spec(values_spec: P, shape: tuple[int, ...], block: tuple[int, int], mesh: Mesh) -> P:
    """Scales follow the values where each shard holds whole blocks, else stay replicated (module doc)."""
    entries = list(values_spec) + [None] * (len(shape) - len(values_spec))
    for d, b in zip((-2, -1), block):
        shards = _split_size(mesh, entries[d])
        if shards > 1 and (shape[d] // shards) % b:
            entries[d] = None
    return P(*entries)


def leaf_sharding(leaf: Leaf, cfg: Config, mesh: Mesh, rules: Rules) -> NamedSharding | QArray:
    """NamedSharding of a weight; a QArray of two (values, scales) for a quantized weight, of its kind."""
    spec = leaf_spec(leaf, cfg, mesh, rules)
    if not leaf.spec.quantized:
        return NamedSharding(mesh, spec)
    block = (1, cfg.int4.group_size) if leaf.spec.kind == INT4 else cfg.weight_block_size
    return QArray(NamedSharding(mesh, spec), NamedSharding(mesh, scale_spec(spec, leaf.shape, block, mesh)),
                  leaf.spec.kind)


def param_shardings(cfg: Config, mesh: Mesh, rules: Rules) -> dict[str, Any]:
    """Every weight's sharding, in the parameter tree's layout (raises on the first weight that cannot split)."""
    return build_tree(cfg, lambda leaf: leaf_sharding(leaf, cfg, mesh, rules))


def check(cfg: Config, mesh: MeshSpec, rules: Rules | str | None = None) -> None:
    """Raise MeshError if some weight of `cfg` cannot split over `mesh` (a spec or Mesh; no devices needed)."""
    param_shardings(cfg, abstract_mesh(mesh), get_rules(rules))


def activation_sharding(mesh: Mesh, rules: Rules, axes: Sequence[str | None], shape: Sequence[int] | None = None,
                        what: str = "activation") -> NamedSharding:
    """NamedSharding for an activation with logical `axes`; with `shape`, divisibility is checked."""
    spec = rules.spec(axes, what)
    if shape is not None:
        for logical, size, entry in zip(axes, shape, spec):
            check_divisible(what, logical or "?", size, size, "", mesh, entry)
    return NamedSharding(mesh, spec)


CACHE_AXES = ("layers", "batch", "cache_seq", None)  # [layers, B, S, width] of each LatentCache leaf


def cache_shardings(cfg: Config, mesh: Mesh, rules: Rules, batch: int, length: int) -> dict[str, Any]:
    """Shardings of `init_cache(cfg, batch, length)`: the latent is shared by all heads, so split by batch only."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, length))
    return jax.tree.map(lambda s: activation_sharding(mesh, rules, CACHE_AXES, s.shape, "KV cache"), shapes)


def shard_bytes(shape: Sequence[int], dtype, sharding: NamedSharding) -> int:
    """Bytes one device holds of an array (its largest shard)."""
    return math.prod(sharding.shard_shape(tuple(shape))) * jnp.dtype(dtype).itemsize


def per_device_param_bytes(cfg: Config, mesh: Mesh, rules: Rules) -> int:
    """Weight bytes on one device, scales included, from the shardings (no arrays are built)."""
    total = 0
    for leaf in leaves(cfg):
        shapes = abstract_leaf(cfg, leaf.shape, leaf.spec)
        shardings = leaf_sharding(leaf, cfg, mesh, rules)
        for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
            total += shard_bytes(s.shape, s.dtype, sh)
    return total
