"""How the model's products run: a small policy object, chosen once and passed down like the layout.

The layout says *where* arrays live (`layout.py`); a backend says *how* the model's heavy products
run on the platform the program is compiled for. The model asks four things of it:

  * `linear(x, w)` / `logits(x, lm_head, dtype)` — the dense products (attention projections, dense
    and shared MLPs, lm_head), for plain or block-fp8 weights;
  * `experts(x, weights, idx, gate, up, down, first_expert=, out_dtype=)` — the routed experts
    (signature in `experts.py`);
  * `latent_attention(q_lat, q_rope, latent, k_rope, mask, layer, scale=)` — absorbed attention over
    one segment of cached keys, as partial softmax statistics (`latent_attention.py`);
  * `fp8_storage` — the dtype fp8 values are held in on the device (checkpoint loaders use it);
  * `decode_writes_first` — the order of decode's cache write and attention read.

This module defines the interface and `REFERENCE`: the plain products and the simple expert loop,
correct everywhere and what every fast path is tested against. The model knows no platform:
`kimi_jax.kernels.choose` is the one place that picks a backend for a platform.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_dtypes
import numpy as np

from kimi_jax.model import latent_attention, quant
from kimi_jax.model.experts import reference_experts


@dataclasses.dataclass(frozen=True)
class Backend:
    """The products a platform runs; hashable (its fields are module-level functions and dtypes)."""

    name: str
    fp8_storage: np.dtype = np.dtype(ml_dtypes.float8_e4m3fn)
    linear: Callable = quant.linear  # (x [..., in], w [out, in]) -> [..., out] in x's dtype
    logits: Callable = quant.logits  # (x [..., D], lm_head [V, D], dtype) -> float32 [..., V]
    experts: Callable = reference_experts  # routed experts, see experts.py
    latent_attention: Callable = latent_attention.attend  # one segment of keys -> Partial
    # Decode writes the step's keys into the cache before attention reads it (one segment), rather
    # than reading the cache as it was and the new keys apart (model/attention.py says why each).
    decode_writes_first: bool = True

    def describe(self) -> str:
        """e.g. 'cpu: grouped experts, streamed dense products, fp8 held as uint8'."""
        experts = getattr(self.experts, "name", None) or self.experts.__name__
        dense = "plain" if self.linear is quant.linear else self.linear.__module__.rsplit(".", 1)[-1]
        attention = "" if self.latent_attention is latent_attention.attend else ", one-pass latent attention"
        return f"{self.name}: {experts} experts, {dense} dense products{attention}, fp8 held as {self.fp8_storage}"

    def __repr__(self) -> str:
        return f"Backend({self.describe()})"


REFERENCE = Backend("reference")
