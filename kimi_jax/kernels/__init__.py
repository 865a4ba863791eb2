"""Backend-specific fast paths, and the one policy that picks them for a platform.

Each kernel here computes exactly what a plain function of the model does, faster on some platform,
and is tested against it:

  * `grouped` — routed experts in expert tiles with per-tile weight gathers (CPU);
  * `indexed` — routed experts at decode reading each needed expert once by index (GPU, TPU; larger
    steps go to `ragged`);
  * `ragged` — routed experts with `jax.lax.ragged_dot`, each expert dequantized once per layer;
  * `scaled` — block-fp8 dense products that apply the block scales to the activations, so the fp8
    weight is read once and never dequantized into a copy (GPU, TPU);
  * `streamed` — few-row dense products that convert the weight slice by slice (one CPU device);
  * `latent_attention` — absorbed decode attention in one pass over the latent cache, a Pallas
    kernel (TPU).

`choose(platform, devices)` is the policy: it is called once, where a model is loaded (for the
devices it is placed on) or a program is planned (for the target it compiles for), and the
resulting `Backend` is passed down to every layer. Nothing else in the engine asks JAX which
platform it runs on.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_dtypes
import numpy as np

from kimi_jax.kernels import latent_attention, scaled, streamed
from kimi_jax.kernels.grouped import GROUPED
from kimi_jax.kernels.indexed import indexed_experts
from kimi_jax.kernels.ragged import RAGGED
from kimi_jax.model.backend import REFERENCE, Backend
from kimi_jax.model.experts import reference_experts

INDEXED = indexed_experts
EXPERT_KERNELS = {"grouped": GROUPED, "indexed": INDEXED, "ragged": RAGGED, "reference": reference_experts}
PLATFORMS = ("cpu", "gpu", "tpu")


def choose(platform: str, devices: int = 1, experts: str | None = None) -> Backend:
    """The backend for `devices` devices of `platform` ("cpu", "gpu" or "tpu").

    * fp8 storage: XLA's CPU backend has no fp8 data movement (it rewrites a slice or gather of an fp8
      array as the same op on an f16 copy of the whole operand, and hoists that copy out of the layer
      scan), so CPU holds fp8 values as their raw bytes (uint8); GPU and TPU hold float8_e4m3fn.
    * routed experts: `grouped` on CPU (ragged_dot is a masked dense product there), `indexed` on GPU
      and TPU (which hands prefill-sized steps to `ragged`); `experts` overrides the choice (tests
      run every kernel on CPU).
    * dense products: GPU/TPU use `scaled` (they fuse an fp8 convert into a dot but not the block
      scales); CPU streams the weights on a single device, and on a CPU mesh (where a sliced product
      would gather a sharded weight) uses the plain product.
    * latent attention: the Pallas kernel on TPU (XLA reads the latent cache twice, once to score and
      once to weight); the reference elsewhere (the kernel is written for Mosaic, TPU's compiler).
    * decode's cache write: before attention reads the cache, except on TPU, whose kernel reads
      the cache as it was and the new keys apart (model/attention.py).
    """
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; kimi_jax runs on {', '.join(PLATFORMS)}")
    if experts is not None and experts not in EXPERT_KERNELS:
        raise ValueError(f"unknown expert kernel {experts!r}; choose one of {', '.join(EXPERT_KERNELS)}")
    cpu = platform == "cpu"
    kernel = EXPERT_KERNELS[experts or ("grouped" if cpu else "indexed")]
    storage = np.dtype(np.uint8) if cpu else np.dtype(ml_dtypes.float8_e4m3fn)
    if cpu and devices == 1:
        return Backend(platform, storage, streamed.linear, streamed.logits, kernel)
    if cpu:
        return Backend(platform, storage, REFERENCE.linear, REFERENCE.logits, kernel)
    tpu = platform == "tpu"
    attention = latent_attention.attend if tpu else REFERENCE.latent_attention
    return Backend(platform, storage, scaled.linear, REFERENCE.logits, kernel, attention, decode_writes_first=not tpu)


def for_devices(devices: Sequence[jax.Device] | None = None, experts: str | None = None) -> Backend:
    """The backend for a model placed on `devices` (default: JAX's first device, where an unsharded
    model lives)."""
    devices = list(devices) if devices is not None else jax.devices()[:1]
    return choose(devices[0].platform, len(devices), experts)


__all__ = ["Backend", "EXPERT_KERNELS", "GROUPED", "INDEXED", "PLATFORMS", "RAGGED", "REFERENCE", "choose",
           "for_devices"]
