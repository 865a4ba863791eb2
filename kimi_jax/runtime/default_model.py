"""The embedded default: a tiny Kimi-K2-architecture chat model that needs no download.

`assets/tiny_chat` holds it, in the release's layout (config.json, two safetensors shards with
block-fp8 weights and their scales, model.safetensors.index.json, and a sentencepiece
tokenizer.model with Kimi's special tokens): ~1M parameters trained on this CPU by
`make train-tiny` (kimi_jax/train) on a generated corpus, with MuonClip. It introduces itself,
answers some facts (not all rightly), and calls a `get_weather` tool for a city, then answers
from the tool's result; it knows nothing else. `generate` and `serve` load it when no `--checkpoint` is
given, through `kimi_jax.load`, the path a real checkpoint takes.

`random_checkpoint` writes a second one for tests: the TINY_KIMI test shape (16 routed experts,
top-4) with random block-fp8 weights from a fixed seed and a byte-level BPE tokenizer
(tiktoken.model, the release's tokenizer format) trained on `assets/default_corpus.txt`, written
once, atomically, under `<cache_root>/random-<version>`; the version hashes everything that
defines it, so a change rebuilds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from kimi_jax.checkpoint.hf import save_hf_checkpoint
from kimi_jax.config import TINY_KIMI, Config
from kimi_jax.model.weights import random_params
from kimi_jax.runtime.compile_cache import cache_root
from kimi_jax.runtime.engine import load
from kimi_jax.text.tokenizer import train_bpe_ranks, write_tiktoken_file

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # kimi_jax/assets
TINY_CHAT = ASSETS / "tiny_chat"
CORPUS = ASSETS / "default_corpus.txt"
BPE_RANKS = 768  # + 256 reserved specials = a 1024-token vocabulary
SEED = 20250711
WEIGHT_STD = 0.05  # wide enough that attention and routing are not flat
NUM_SHARDS = 2
# The model card's declaration of its weather tool ("Tool Calling" in the release README): the tool the
# embedded model was trained to call, and the one the `generate` demo declares.
CARD_WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Retrieve current weather information. Call this when the user asks about "
                                          "the weather.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "Name of the city"}},
                   "required": ["city"]}}}
FORMAT = 2  # bump when the on-disk recipe changes in a way the hash below cannot see


def random_config() -> Config:
    """TINY_KIMI with the tokenizer's vocabulary and a 4096-token context."""
    return dataclasses.replace(TINY_KIMI, vocab_size=BPE_RANKS + 256, max_position_embeddings=4096,
                               bos_token_id=BPE_RANKS, eos_token_id=BPE_RANKS + 1, name="kimi-jax-random")


def version() -> str:
    """FORMAT plus a hash of the config, seed, std and corpus."""
    recipe = f"{FORMAT}|{random_config()}|{SEED}|{WEIGHT_STD}|{BPE_RANKS}|{NUM_SHARDS}|".encode() + CORPUS.read_bytes()
    return f"{FORMAT}-{hashlib.sha256(recipe).hexdigest()[:12]}"


def _write(directory: Path) -> None:
    ranks = train_bpe_ranks([CORPUS.read_text(encoding="utf-8")], BPE_RANKS)
    if len(ranks) != BPE_RANKS:
        raise RuntimeError(f"the default corpus yields {len(ranks)} BPE ranks, fewer than {BPE_RANKS}")
    cfg = random_config()
    save_hf_checkpoint(random_params(cfg, seed=SEED, std=WEIGHT_STD), cfg, directory, num_shards=NUM_SHARDS)
    write_tiktoken_file(ranks, directory / "tiktoken.model")


def default_checkpoint() -> Path:
    """The embedded tiny chat checkpoint's directory (an error that says how to restore it if absent)."""
    if not (TINY_CHAT / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded tiny chat model is missing from {TINY_CHAT} (it ships with the package): reinstall "
            "kimi_jax, rebuild it with `make train-tiny`, or pass --checkpoint")
    return TINY_CHAT


def random_checkpoint(root: str | os.PathLike | None = None) -> Path:
    """The random-weight test checkpoint's directory, written first if absent (safe under concurrent callers).

    It is built in a temporary sibling directory and renamed into place, so a reader never sees a
    half-written checkpoint; when two processes race, the second rename fails and its copy is dropped.
    """
    root = Path(root) if root is not None else cache_root()
    final = root / f"random-{version()}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".random-tmp-", dir=root))
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


def load_default(dtype: str = "float32", **kwargs):
    """`kimi_jax.load` of the embedded tiny chat model (float32 compute: at this size it costs nothing)."""
    return load(default_checkpoint(), dtype=dtype, **kwargs)


def load_checkpoint_or_default(checkpoint: str | os.PathLike | None, dtype: str | None = None, **kwargs):
    """What the command lines load: `checkpoint` (bfloat16 compute unless `dtype` says otherwise), or with
    none the embedded tiny chat model (float32 unless told)."""
    if checkpoint:
        return load(checkpoint, dtype=dtype or "bfloat16", **kwargs)
    return load_default(dtype=dtype or "float32", **kwargs)
