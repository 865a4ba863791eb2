"""The decode roofline: bytes one decode step must read, against a measured memory bandwidth.

A decode step is memory bound: every weight it uses is read once per step, plus the KV cache.
For the routed experts only the experts some token chose are read. We *estimate* how many: with
B tokens each choosing k of E experts and routing close to uniform (random weights, a trained
router's load balancing), the expected number of distinct experts per layer is
    E · (1 − (1 − k/E)^B)
(exact for independent uniform choices; real routing is skewed, which only lowers it). The
embedding table contributes only the B rows looked up; the lm_head is read whole.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import numpy as np

from kimi_jax.config import Config
from kimi_jax.model.weights import leaves, scale_shape

FP8_BYTES = 1


def expected_distinct_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """E · (1 − (1 − k/E)^B): distinct experts hit by `tokens` uniform top-k choices."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def _leaf_bytes(cfg: Config, shape: tuple[int, ...], spec: Any) -> int:
    """Stored bytes of one (stacked) weight: fp8 values + f32 scales, or its plain dtype."""
    if spec.quantized:
        return math.prod(shape) * FP8_BYTES + 4 * math.prod(scale_shape(shape, cfg.weight_block_size))
    return math.prod(shape) * np.dtype(spec.dtype).itemsize


def weight_bytes(cfg: Config) -> int:
    """Stored bytes of every weight of `cfg` (fp8 values + scales, bf16/f32 elsewhere), with no arrays."""
    return sum(_leaf_bytes(cfg, leaf.shape, leaf.spec) for leaf in leaves(cfg))


def decode_step_bytes(cfg: Config, batch: int, context: int, cache_itemsize: int = 2) -> dict[str, float]:
    """Bytes a decode step at `batch` rows and `context` cached tokens must read, by part.

    Returns {"dense": every non-routed weight but the embedding, "embedding_rows": the B rows looked
    up, "experts": expected distinct routed experts × their bytes, "cache": the latent cache read,
    "total": the sum, "experts_hit_per_layer": the estimate used}.
    """
    parts = {"dense": 0.0, "embedding_rows": 0.0, "experts": 0.0}
    hit = expected_distinct_experts(cfg.n_routed_experts, cfg.num_experts_per_tok, batch)
    for leaf in leaves(cfg):
        nbytes = _leaf_bytes(cfg, leaf.shape, leaf.spec)
        if leaf.path == ("embed",):
            parts["embedding_rows"] += nbytes * min(batch, cfg.vocab_size) / cfg.vocab_size
        elif leaf.spec.per_expert:
            parts["experts"] += nbytes * hit / cfg.n_routed_experts
        else:
            parts["dense"] += nbytes
    parts["cache"] = float(cfg.num_hidden_layers * batch * context * cfg.kv_cache_width * cache_itemsize)
    parts["total"] = sum(parts.values())
    parts["experts_hit_per_layer"] = hit
    return parts


def host_copy_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Host memory bandwidth in bytes/s: median of `reps` copies of a large numpy array (read + write counted)."""
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times)


def roofline_fraction(step_bytes: float, bandwidth: float, seconds_per_step: float) -> float:
    """Fraction of the bandwidth roofline reached: (bytes / bandwidth) / measured seconds per step."""
    return step_bytes / bandwidth / seconds_per_step


def matmul_params_per_token(cfg: Config) -> float:
    """Weights one token is multiplied by in every layer: each matmul weight it uses, routed experts
    k of E (the embedding is a lookup; the lm_head is counted apart, on the rows that need logits)."""
    per_token = 0.0
    for leaf in leaves(cfg):
        if leaf.path in (("embed",), ("lm_head",)) or len(leaf.spec.shape) < 2:
            continue
        n = math.prod(leaf.shape)
        per_token += n * cfg.num_experts_per_tok / cfg.n_routed_experts if leaf.spec.per_expert else n
    return per_token


def prefill_flops(cfg: Config, tokens: int) -> float:
    """Matmul FLOPs of a causal prefill of `tokens` tokens (batch 1) and one lm_head row.

    Per token: 2 × every matmul weight it uses (`matmul_params_per_token`; the lm_head runs on the last
    token only). Attention (expanded MLA at prefill): per layer and head, QKᵀ over qk_head_dim and PV
    over v_head_dim, on the causal half of the T×T scores.
    """
    attention = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * tokens * tokens
    return 2 * matmul_params_per_token(cfg) * tokens + attention + 2 * cfg.vocab_size * cfg.hidden_size


def decode_flops(cfg: Config, batch: int, context: int) -> float:
    """Matmul FLOPs of one decode step of `batch` rows over `context` cached positions each.

    Per row: 2 × every matmul weight it uses and the lm_head, and absorbed-MLA attention: per layer,
    head and cached position, scores over kv_lora_rank + qk_rope_head_dim and values over kv_lora_rank.
    """
    attention = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    return batch * (2 * matmul_params_per_token(cfg) + attention * context + 2 * cfg.vocab_size * cfg.hidden_size)
