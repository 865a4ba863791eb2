"""The embedded default: a tiny Kimi-K2-architecture model that needs no download.

It is the Kimi-K2 architecture at toy size (the TINY_KIMI test shape: 3 layers, the first dense,
16 routed experts with top-4 sigmoid routing, MLA with a 40-wide latent, YaRN rotary) with
block-fp8 weights drawn from a fixed seed, and a byte-level BPE tokenizer (768 ranks plus Kimi's
256 reserved special tokens) trained on the short text in `assets/default_corpus.txt`.

The weights are random: the model prints noise. It exists so that `python -m kimi_jax.generate`
runs end to end with no arguments, through the same path a real checkpoint takes: it is written
once, atomically, as a Hugging Face hub-layout directory (config.json, two safetensors shards,
model.safetensors.index.json, tiktoken.model) under `<cache_root>/default-<version>` and loaded
with `kimi_jax.load`. The version hashes everything that defines it, so a change rebuilds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from kimi_jax.config import TINY_KIMI, Config
from kimi_jax.generation import cache_root

CORPUS = Path(__file__).resolve().parent / "assets" / "default_corpus.txt"
BPE_RANKS = 768  # + 256 reserved specials = a 1024-token vocabulary
SEED = 20250711
WEIGHT_STD = 0.05  # wide enough that attention and routing are not flat
NUM_SHARDS = 2
FORMAT = 1  # bump when the on-disk recipe changes in a way the hash below cannot see
DEFAULT_PROMPT = "The capital of France is"


def default_config() -> Config:
    """TINY_KIMI with the tokenizer's vocabulary and a 4096-token context."""
    return dataclasses.replace(TINY_KIMI, vocab_size=BPE_RANKS + 256, max_position_embeddings=4096,
                               bos_token_id=BPE_RANKS, eos_token_id=BPE_RANKS + 1, name="kimi-jax-default")


def version() -> str:
    """FORMAT plus a hash of the config, seed, std and corpus."""
    recipe = f"{FORMAT}|{default_config()}|{SEED}|{WEIGHT_STD}|{BPE_RANKS}|{NUM_SHARDS}|".encode() + CORPUS.read_bytes()
    return f"{FORMAT}-{hashlib.sha256(recipe).hexdigest()[:12]}"


def _write(directory: Path) -> None:
    from kimi_jax.checkpoint import save_hf_checkpoint
    from kimi_jax.tokenizer import train_bpe_ranks, write_tiktoken_file
    from kimi_jax.weights import random_params

    ranks = train_bpe_ranks([CORPUS.read_text(encoding="utf-8")], BPE_RANKS)
    if len(ranks) != BPE_RANKS:
        raise RuntimeError(f"the default corpus yields {len(ranks)} BPE ranks, fewer than {BPE_RANKS}")
    cfg = default_config()
    save_hf_checkpoint(random_params(cfg, seed=SEED, std=WEIGHT_STD), cfg, directory, num_shards=NUM_SHARDS)
    write_tiktoken_file(ranks, directory / "tiktoken.model")


def default_checkpoint(root: str | os.PathLike | None = None) -> Path:
    """The default checkpoint's directory, written first if absent (safe under concurrent callers).

    It is built in a temporary sibling directory and renamed into place, so a reader never sees a
    half-written checkpoint; when two processes race, the second rename fails and its copy is dropped.
    """
    root = Path(root) if root is not None else cache_root()
    final = root / f"default-{version()}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".default-tmp-", dir=root))
    try:
        _write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint is ordinary data
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_default(dtype: str = "bfloat16", **kwargs):
    """`kimi_jax.load` of the default checkpoint (writing it first if needed)."""
    from kimi_jax.engine import load

    return load(default_checkpoint(), dtype=dtype, **kwargs)
