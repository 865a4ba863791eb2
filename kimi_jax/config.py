"""One frozen config for the Kimi-K2 / DeepSeek-V3 architecture, read from Hugging Face `config.json`.

The real Kimi-K2 `config.json` loads unchanged (`model_type: kimi_k2`); DeepSeek-V3 style files
(grouped routing, several dense layers) load too. A value the engine does not implement is a
`ConfigError` that names the field, never a silent approximation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json value the engine cannot run, with the field named."""


@dataclasses.dataclass(frozen=True)
class YarnRope:
    """YaRN rotary scaling parameters (the `rope_scaling` block of config.json)."""

    factor: float = 32.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclasses.dataclass(frozen=True)
class Config:
    """Architecture hyperparameters, named as in Hugging Face's DeepseekV3Config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int  # each routed expert and, times n_shared_experts, the shared one
    num_hidden_layers: int
    first_k_dense_replace: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: YarnRope | None
    max_position_embeddings: int
    # (rows, cols) of one fp8 scale block, or None for a checkpoint with unquantized weights.
    weight_block_size: tuple[int, int] | None = (128, 128)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = "custom"

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "q_lora_rank",
                    "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                    "max_position_embeddings")
        for field in positive:
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                raise ConfigError(f"config field '{field}' must be a positive integer, got {getattr(self, field)!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"config field 'qk_rope_head_dim' must be even (rotary pairs), "
                              f"got {self.qk_rope_head_dim}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(f"config field 'first_k_dense_replace'={self.first_k_dense_replace} must lie in "
                              f"[0, num_hidden_layers={self.num_hidden_layers}]")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"config field 'n_routed_experts'={self.n_routed_experts} is not divisible by "
                              f"'n_group'={self.n_group}")
        if self.topk_group > self.n_group:
            raise ConfigError(f"config field 'topk_group'={self.topk_group} exceeds 'n_group'={self.n_group}")
        eligible = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > eligible:
            raise ConfigError(f"config field 'num_experts_per_tok'={self.num_experts_per_tok} exceeds the "
                              f"{eligible} experts in topk_group={self.topk_group} groups")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ConfigError("config field 'n_group' leaves fewer than 2 experts per group; "
                              "group scores sum each group's top-2")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def quantized(self) -> bool:
        return self.weight_block_size is not None

    @property
    def kv_cache_width(self) -> int:
        """Values cached per token per layer: the normalised latent plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dictionary that `from_hf_dict` reads back to this config."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("rope_scaling", "weight_block_size", "name")}
        d.update(architectures=["DeepseekV3ForCausalLM"], model_type="kimi_k2", hidden_act="silu",
                 num_key_value_heads=self.num_attention_heads, attention_bias=False,
                 moe_layer_freq=1, scoring_func="sigmoid", topk_method="noaux_tc",
                 tie_word_embeddings=False, num_nextn_predict_layers=0, torch_dtype="bfloat16")
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(type="yarn", **dataclasses.asdict(self.rope_scaling))
        if self.weight_block_size is not None:
            d["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                        "quant_method": "fp8", "weight_block_size": list(self.weight_block_size)}
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "custom") -> Config:
        """Build from a parsed Hugging Face config.json (DeepseekV3 / kimi_k2)."""
        return cls(**_parse_hf(d), name=name)

    @classmethod
    def from_json(cls, path: str | Path) -> Config:
        """Read a config.json file (or the config.json inside a checkpoint directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}: a Hugging Face checkpoint directory holds one")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d, name=path.parent.name or "custom")


# Values the engine implements exactly one way; anything else is refused by name.
_REQUIRED = {
    "hidden_act": "silu",
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "attention_bias": False,
    "moe_layer_freq": 1,
    "tie_word_embeddings": False,
}


def _parse_hf(d: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type not in ("kimi_k2", "deepseek_v3", None):
        raise ConfigError(f"config field 'model_type'={model_type!r} is not supported: "
                          "expected 'kimi_k2' or 'deepseek_v3'")
    for field, want in _REQUIRED.items():
        if field in d and d[field] != want:
            raise ConfigError(f"config field '{field}'={d[field]!r} is not supported (the engine implements {want!r})")
    if d.get("q_lora_rank") is None:
        raise ConfigError("config field 'q_lora_rank' is null: the engine implements MLA with a query LoRA "
                          "(q_a_proj/q_b_proj) as Kimi-K2 and DeepSeek-V3 use")
    heads = d.get("num_attention_heads")
    if d.get("num_key_value_heads", heads) != heads:
        raise ConfigError(f"config field 'num_key_value_heads'={d['num_key_value_heads']} must equal "
                          f"num_attention_heads={heads} under MLA")
    if d.get("n_shared_experts") in (None, 0):
        raise ConfigError("config field 'n_shared_experts' must be ≥ 1 "
                          "(Kimi-K2 and DeepSeek-V3 have one shared expert)")

    required = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim", "n_routed_experts", "num_experts_per_tok")
    missing = [k for k in required if k not in d]
    if missing:
        raise ConfigError(f"config.json lacks required field(s) {missing}")

    out = {k: d[k] for k in required}
    out.update(
        first_k_dense_replace=d.get("first_k_dense_replace", 0),
        n_shared_experts=d["n_shared_experts"],
        n_group=d.get("n_group") or 1,
        topk_group=d.get("topk_group") or 1,
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(d.get("rope_theta", 10000.0)),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        rope_scaling=_parse_rope(d.get("rope_scaling") or d.get("rope_parameters")),
        weight_block_size=_parse_quant(d.get("quantization_config")),
    )
    return out


def _parse_rope(r: dict[str, Any] | None) -> YarnRope | None:
    if r is None:
        return None
    kind = r.get("type", r.get("rope_type"))
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise ConfigError(f"config field 'rope_scaling.type'={kind!r} is not supported: the engine implements 'yarn'")
    defaults = YarnRope()
    return YarnRope(
        factor=float(r.get("factor", defaults.factor)),
        original_max_position_embeddings=int(r.get("original_max_position_embeddings",
                                                   defaults.original_max_position_embeddings)),
        # Hugging Face treats a falsy beta as its default (32 / 1); so do we.
        beta_fast=float(r.get("beta_fast") or 32.0),
        beta_slow=float(r.get("beta_slow") or 1.0),
        mscale=float(r.get("mscale") or 0.0),
        mscale_all_dim=float(r.get("mscale_all_dim") or 0.0),
    )


def _parse_quant(q: dict[str, Any] | None) -> tuple[int, int] | None:
    if q is None:
        return None
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"config field 'quantization_config'={q} is not supported: the engine reads block-fp8 "
                          "(quant_method 'fp8', fmt 'e4m3') or unquantized checkpoints")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"config field 'quantization_config.weight_block_size'={block!r} must be [rows, cols]")
    return tuple(block)


# Presets --------------------------------------------------------------------------------------
KIMI_K2 = Config(
    vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, first_k_dense_replace=1, num_attention_heads=64, q_lora_rank=1536,
    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_routed_experts=384, num_experts_per_tok=8, n_shared_experts=1, n_group=1, topk_group=1,
    norm_topk_prob=True, routed_scaling_factor=2.827, rms_norm_eps=1e-6, rope_theta=50000.0,
    rope_scaling=YarnRope(factor=32.0, original_max_position_embeddings=4096, beta_fast=1.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    max_position_embeddings=131072, bos_token_id=163584, eos_token_id=163585, name="kimi-k2",
)

DEEPSEEK_V3 = dataclasses.replace(
    KIMI_K2, vocab_size=129280, num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128,
    n_routed_experts=256, n_group=8, topk_group=4, routed_scaling_factor=2.5, rope_theta=10000.0,
    rope_scaling=YarnRope(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    max_position_embeddings=163840, bos_token_id=0, eos_token_id=1, name="deepseek-v3",
)

# Tiny test configs keep the real structure with awkward sizes: dims that are not multiples of the
# 128 block (ragged scale edges), and a latent narrower than a block.
TINY_KIMI = dataclasses.replace(
    KIMI_K2, vocab_size=320, hidden_size=200, intermediate_size=272, moe_intermediate_size=72,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=96,
    kv_lora_rank=40, qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=20, n_routed_experts=16,
    num_experts_per_tok=4, rope_scaling=dataclasses.replace(KIMI_K2.rope_scaling, original_max_position_embeddings=64),
    max_position_embeddings=2048, bos_token_id=None, eos_token_id=None, name="tiny-kimi",
)

TINY_DEEPSEEK = dataclasses.replace(
    DEEPSEEK_V3, vocab_size=288, hidden_size=136, intermediate_size=200, moe_intermediate_size=48,
    num_hidden_layers=4, first_k_dense_replace=2, num_attention_heads=4, q_lora_rank=72,
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16,
    num_experts_per_tok=4, n_group=4, topk_group=2,
    rope_scaling=dataclasses.replace(DEEPSEEK_V3.rope_scaling, original_max_position_embeddings=64),
    max_position_embeddings=2048, bos_token_id=None, eos_token_id=None, name="tiny-deepseek",
)

PRESETS: dict[str, Config] = {c.name: c for c in (KIMI_K2, DEEPSEEK_V3, TINY_KIMI, TINY_DEEPSEEK)}


def get_config(name_or_path: str | Path) -> Config:
    """A preset by name, or a config.json (file or checkpoint directory) by path."""
    if str(name_or_path) in PRESETS:
        return PRESETS[str(name_or_path)]
    path = Path(name_or_path)
    if path.exists():
        return Config.from_json(path)
    raise ConfigError(f"'{name_or_path}' is neither a preset ({', '.join(PRESETS)}) nor an existing config path")
