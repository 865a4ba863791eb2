"""One-accelerator benchmark at Kimi-K2 width: decode tokens/s against the HBM roofline, prefill TFLOP/s.

Run by scripts/bench_gpu.sh (`scripts/bench.py --gpu`). The layers are Kimi-K2's (hidden 7168, 384
experts top-8, moe dim 2048, 64 heads, block-fp8) with as many layers as fit in about half of the
device memory (the rest is for the cache and the dequantized temporaries of the expert kernel).
Weights are random and generated *on the device*: nothing is read from or written to disk. Each
fp8 weight is one random [out, in] block of bytes (NaN patterns masked out) broadcast over its
layers and experts with a constant scale: every expert is a distinct buffer of the full size, so
the memory traffic is the real model's, only the values repeat.

The "tiny" config runs the same code path on any backend in seconds (tests/test_bench.py on CPU).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from kimi_jax import kernels
from kimi_jax.bench import roofline
from kimi_jax.bench.compare import TINY, Settings, kimi_decode, kimi_prefill
from kimi_jax.bench.generation import machine
from kimi_jax.bench.timing import median_seconds
from kimi_jax.config import KIMI_K2, Config
from kimi_jax.model.quant import QArray
from kimi_jax.model.weights import build_tree, param_bytes, scale_shape
from kimi_jax.runtime.engine import Model

GPU_SETTINGS = Settings(reps=3, decode_steps=32, decode_prompt=64, prefill_prompt=2048, batches=(1, 8, 64))
TINY_SETTINGS = Settings(reps=1, decode_steps=4, decode_prompt=8, prefill_prompt=32, batches=(1,))
WEIGHT_FRACTION = 0.5  # of device memory for the weights
FP8_SCALE = 0.02  # random fp8 magnitudes are ≲ 1.9, so weights are ≲ 0.04


def k2_width(layers: int) -> Config:
    """Kimi-K2 with `layers` layers (the first dense) and a 4096-token context."""
    return dataclasses.replace(KIMI_K2, name=f"k2-width-{layers}", num_hidden_layers=layers, first_k_dense_replace=1,
                               max_position_embeddings=4096, bos_token_id=None, eos_token_id=None)


def layers_that_fit(device_bytes: int, fraction: float = WEIGHT_FRACTION) -> int:
    """The most Kimi-K2 layers (≥ 2: one dense, one MoE) whose weights fit in `fraction` of `device_bytes`."""
    n = 2
    while roofline.weight_bytes(k2_width(n + 1)) <= fraction * device_bytes:
        n += 1
    return n


def _fp8_values(shape: tuple[int, ...], dtype, key: jax.Array) -> jax.Array:
    block = jax.random.bits(key, shape[-2:], jnp.uint8) & 0xB7  # clear the exponent's top bit: no NaN/inf
    block = jnp.broadcast_to(block, shape)
    return block if dtype == jnp.uint8 else jax.lax.bitcast_convert_type(block, dtype)


def _plain(shape: tuple[int, ...], dtype, init: str, key: jax.Array) -> jax.Array:
    if init == "ones":
        return jnp.ones(shape, dtype)
    if init == "zeros":
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def device_params(cfg: Config, seed: int = 0) -> dict:
    """Random parameters built on the default device by one compiled program, in its backend's storage dtypes.

    Not `weights.random_params`: that quantizes float32 draws on the host, far too slow and too big for
    the ~70 GB a GPU holds; here fp8 values are random bytes (no NaN) with one fixed scale."""
    fp8 = kernels.for_devices().fp8_storage

    def build(key):
        counter = iter(range(1 << 20))

        def make(leaf):
            k = jax.random.fold_in(key, next(counter))
            if leaf.spec.quantized:
                scales = jnp.full(scale_shape(leaf.shape, cfg.weight_block_size), FP8_SCALE, jnp.float32)
                return QArray(_fp8_values(leaf.shape, fp8, k), scales)
            return _plain(leaf.shape, jnp.dtype(leaf.spec.dtype), leaf.spec.init, k)
        return build_tree(cfg, make)
    return jax.block_until_ready(jax.jit(build)(jax.random.key(seed)))




def copy_bandwidth(nbytes: int, reps: int = 5) -> float:
    """Device memory bandwidth in bytes/s from an elementwise pass over a large array (read + write)."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    return 2 * x.nbytes / median_seconds(lambda: f(x), reps)


def matmul_rate(n: int, reps: int = 5) -> float:
    """bf16 matmul FLOP/s on an n×n×n product (f32 accumulation)."""
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    return 2 * n ** 3 / median_seconds(lambda: f(a, a), reps)


def run(config: str = "k2-width", log=print) -> dict:
    """Every figure for the GPU report (or the tiny smoke version of it)."""
    dev = jax.devices()[0]
    device_bytes = (dev.memory_stats() or {}).get("bytes_limit", 0)
    tiny = config == "tiny"
    s = TINY_SETTINGS if tiny else GPU_SETTINGS
    cfg = TINY if tiny else k2_width(layers_that_fit(device_bytes))
    log(f"device {dev.device_kind} ({device_bytes / 2**30:.0f} GiB); config {cfg.name}")
    bandwidth = copy_bandwidth(64 << 20 if tiny else 8 << 30)
    rate = matmul_rate(256 if tiny else 8192)
    log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s, bf16 matmul {rate / 1e12:.1f} TFLOP/s")
    start = time.perf_counter()
    params = device_params(cfg)
    model = Model(cfg, params, dtype="bfloat16")
    out = {"config": cfg.name, "layers": cfg.num_hidden_layers, "machine": machine(), "device": dev.device_kind,
           "device_bytes": device_bytes, "weight_bytes": param_bytes(params),
           "init_s": time.perf_counter() - start, "copy_bandwidth_bytes_per_s": bandwidth,
           "bf16_matmul_flops_per_s": rate}
    log(f"{out['weight_bytes'] / 1e9:.1f} GB of weights generated in {out['init_s']:.0f} s")
    prefill_s = median_seconds(kimi_prefill(model, s.prefill_prompt), s.reps)
    flops = roofline.prefill_flops(cfg, s.prefill_prompt)
    out.update(prefill_prompt=s.prefill_prompt, prefill_tokens_per_s=s.prefill_prompt / prefill_s,
               prefill_flops_per_s=flops / prefill_s, prefill_fraction_of_matmul_rate=flops / prefill_s / rate)
    log(f"prefill {out['prefill_tokens_per_s']:.0f} tokens/s, {out['prefill_flops_per_s'] / 1e12:.1f} TFLOP/s")
    context = s.decode_prompt + s.decode_steps // 2
    for b in s.batches:
        step = median_seconds(kimi_decode(model, b, s), s.reps)
        need = roofline.decode_step_bytes(cfg, b, context)
        out[f"decode_tokens_per_s_b{b}"] = b / step
        out[f"decode_step_bytes_b{b}"] = need["total"]
        out[f"decode_roofline_fraction_b{b}"] = roofline.roofline_fraction(need["total"], bandwidth, step)
        log(f"batch {b}: {b / step:.1f} tokens/s, {100 * out[f'decode_roofline_fraction_b{b}']:.1f}% of roofline")
    return out


def markdown(r: dict) -> str:
    lines = [f"Device: {r['device']}; config {r['config']} ({r['layers']} layers, "
             f"{r['weight_bytes'] / 1e9:.1f} GB of weights generated on device in {r['init_s']:.0f} s).", "",
             f"Copy bandwidth {r['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s; bf16 matmul "
             f"{r['bf16_matmul_flops_per_s'] / 1e12:.1f} TFLOP/s.", "",
             f"Prefill ({r['prefill_prompt']} tokens): {r['prefill_tokens_per_s']:.0f} tokens/s, "
             f"{r['prefill_flops_per_s'] / 1e12:.2f} TFLOP/s = {100 * r['prefill_fraction_of_matmul_rate']:.1f}% "
             "of the measured matmul rate.", "", "| batch | decode tokens/s | bytes/step (MB) | roofline reached |",
             "|---:|---:|---:|---:|"]
    for key in sorted((k for k in r if k.startswith("decode_tokens_per_s_b")), key=lambda k: int(k.rsplit("b", 1)[1])):
        b = key.rsplit("b", 1)[1]
        lines.append(f"| {b} | {r[key]:.1f} | {r[f'decode_step_bytes_b{b}'] / 1e6:.0f} | "
                     f"{100 * r[f'decode_roofline_fraction_b{b}']:.1f}% |")
    return "\n".join(lines) + "\n"
