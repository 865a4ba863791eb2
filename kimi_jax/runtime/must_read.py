"""What a decode step must read from memory, per device: the yardstick for every decode kernel.

Defined once, here (the planner, the benchmarks and the README use it):

  * every local non-expert weight shard once, as stored (fp8 values and their scales, bf16 norms
    and router, the lm_head shard) — except the embedding table, of which a step looks up only its
    tokens' rows;
  * the KV-cache rows it attends over, once: the local sequences' `context` positions, every layer;
  * per MoE layer, min(B·k, E_local) local experts' weights, where B is the number of tokens the
    device's expert group routes (the batch, divided by the batch splits that are not inside the
    group), k the experts per token and E_local the experts the device holds.

A prefill step reads each weight once and is judged by flops instead.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from kimi_jax.config import Config
from kimi_jax.model.weights import Leaf, abstract_leaf, leaves
from sharding.rules import Rules, leaf_sharding, shard_bytes

FP8 = np.dtype("float8_e4m3fn")


@dataclasses.dataclass(frozen=True)
class MustRead:
    """Bytes per device per decode step, by part; `per_moe_layer` is one MoE layer's share."""

    dense_weights: int  # non-expert weights of every layer, lm_head, norms (embedding rows apart)
    embedding_rows: int
    experts: int  # all MoE layers
    kv_cache: int
    per_moe_layer: int  # one MoE layer: its non-expert weights, its experts, its cache rows
    experts_per_moe_layer: int  # min(B·k, E_local)

    @property
    def total(self) -> int:
        return self.dense_weights + self.embedding_rows + self.experts + self.kv_cache


def _local_bytes(cfg: Config, leaf: Leaf, mesh, rules: Rules, storage: np.dtype) -> int:
    """Bytes of `leaf` one device holds, values and scales, fp8 counted in `storage`."""
    shapes = abstract_leaf(cfg, leaf.shape, leaf.spec, storage)
    shardings = leaf_sharding(leaf, cfg, mesh, rules)
    return sum(shard_bytes(s.shape, s.dtype, sh) for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


def _split(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def decode_must_read(cfg: Config, mesh, rules: Rules, batch: int, context: int,
                     storage: np.dtype = FP8, cache_itemsize: int = 2) -> MustRead:
    """The module docstring's definition, for a decode step of `batch` sequences over `context`
    cached positions on `mesh` (a Mesh or AbstractMesh) under `rules`."""
    batch_axes = rules.mesh_axes("batch")
    group_axes = set(rules.mesh_axes("experts")) | set(rules.mesh_axes("expert_mlp"))
    local_batch = math.ceil(batch / _split(mesh, batch_axes))
    group_tokens = math.ceil(batch / _split(mesh, [a for a in batch_axes if a not in group_axes]))
    local_experts = math.ceil(cfg.n_routed_experts / _split(mesh, rules.mesh_axes("experts")))
    hit = min(group_tokens * cfg.num_experts_per_tok, local_experts)

    dense = embedding = experts = 0
    moe_layer_dense = moe_layer_experts = 0
    for leaf in leaves(cfg):
        nbytes = _local_bytes(cfg, leaf, mesh, rules, storage)
        if leaf.path == ("embed",):
            vocab_local = math.ceil(cfg.vocab_size / _split(mesh, rules.mesh_axes("vocab")))
            embedding = nbytes * min(local_batch, vocab_local) // vocab_local
        elif leaf.spec.per_expert:
            per_layer = nbytes // len(leaf.layers)
            experts += per_layer * hit // local_experts * len(leaf.layers)
            moe_layer_experts += per_layer * hit // local_experts
        else:
            dense += nbytes
            if leaf.path[0] == "moe_layers":
                moe_layer_dense += nbytes // len(leaf.layers)
    cache_layer = local_batch * context * cfg.kv_cache_width * cache_itemsize
    return MustRead(dense_weights=dense, embedding_rows=embedding, experts=experts,
                    kv_cache=cache_layer * cfg.num_hidden_layers,
                    per_moe_layer=moe_layer_dense + moe_layer_experts + cache_layer if cfg.num_moe_layers else 0,
                    experts_per_moe_layer=hit)
