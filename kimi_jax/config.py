"""One frozen config for the Kimi-K2 / DeepSeek-V3 architecture, read from Hugging Face `config.json`.

The real Kimi-K2 `config.json` loads unchanged (`model_type: kimi_k2`); DeepSeek-V3 style files
(grouped routing, several dense layers) load too, and so do the newer releases: Kimi-K2-Thinking
(routed experts in compressed-tensors INT4, `Int4Quant`) and the text model of Kimi-K2.5/K2.6
(`model_type: kimi_k25`, the DeepSeek-V3 values under `text_config`, weights under
`language_model.`). A value the engine does not implement is a `ConfigError` that names the
field, never a silent approximation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json value the engine cannot run, with the field named."""


def _check_value(field: str, value: Any, kind: type, lo: float | None, optional: bool = False) -> None:
    """`value` of config field `field` is a `kind` (int: an integer, never a boolean; float: a finite
    number; bool: a boolean) and, if `lo` is given, > lo for floats or ≥ lo for integers."""
    if value is None and optional:
        return
    if kind is bool:
        ok = isinstance(value, bool)
        want = "a boolean (true or false)"
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and (lo is None or value >= lo)
        want = "an integer" + ("" if lo is None else f" ≥ {lo}")
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
            lo is None or value > lo)
        want = "a finite number" + ("" if lo is None else f" > {lo}")
    if not ok:
        raise ConfigError(f"config field '{field}' must be {want}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class YarnRope:
    """YaRN rotary scaling parameters (the `rope_scaling` block of config.json)."""

    factor: float = 32.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self):
        for field, (kind, lo) in _ROPE_TYPES.items():
            _check_value(f"rope_scaling.{field}", getattr(self, field), kind, lo)


_ROPE_TYPES: dict[str, tuple[type, float | None]] = {  # field -> (type, lower bound)
    "factor": (float, 0), "original_max_position_embeddings": (int, 1), "beta_fast": (float, None),
    "beta_slow": (float, None), "mscale": (float, None), "mscale_all_dim": (float, None)}


@dataclasses.dataclass(frozen=True)
class Int4Quant:
    """compressed-tensors `pack-quantized` W4A16 (Kimi-K2-Thinking, K2.5, K2.6): which linear weights
    are INT4 and their group size.

    Every `nn.Linear` is INT4 unless an `ignore` entry matches its module name, as compressed-tensors
    matches: `re:PATTERN` is `re.match` against the name, any other entry the exact name (or `Linear`,
    the class, which ignores them all). Kimi-K2-Thinking ignores lm_head, attention, the shared
    experts and the dense MLP, so only the routed experts are INT4.
    """

    group_size: int = 32
    ignore: tuple[str, ...] = ()

    def quantizes(self, module: str) -> bool:
        """Whether the linear layer named `module` (e.g. `model.layers.1.mlp.experts.0.gate_proj`) is INT4."""
        return not any(_matches(module, entry) for entry in self.ignore)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `quantization_config` block of config.json (as the Thinking release writes it)."""
        weights = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": self.group_size,
                   "num_bits": 4, "observer": "minmax", "observer_kwargs": {}, "strategy": "group",
                   "symmetric": True, "type": "int"}
        return {"config_groups": {"group_0": {"input_activations": None, "output_activations": None,
                                              "targets": ["Linear"], "weights": weights}},
                "format": "pack-quantized", "ignore": list(self.ignore), "kv_cache_scheme": None,
                "quant_method": "compressed-tensors", "quantization_status": "compressed"}


def _matches(module: str, entry: str) -> bool:
    if entry.startswith("re:"):
        return re.match(entry[3:], module) is not None
    return entry in (module, "Linear")


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
    # compressed-tensors INT4 (then weight_block_size is None: such checkpoints hold no fp8).
    int4: Int4Quant | None = None
    # Prefix of every text-model tensor name: "language_model." in the K2.5/K2.6 layout.
    weights_prefix: str = ""
    # Rows added to the embedding and lm_head so that a mesh can split the vocabulary evenly
    # (`with_vocab_multiple`; never in config.json): their logits are masked, their ids never valid.
    vocab_padding: int = 0

    def __post_init__(self):
        for field, (kind, lo) in _FIELD_TYPES.items():
            _check_value(field, getattr(self, field), kind, lo, optional=field in _OPTIONAL)
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
        if self.int4 is not None and self.weight_block_size is not None:
            raise ConfigError("a config cannot be both block-fp8 (weight_block_size) and INT4 (int4): "
                              "a checkpoint has one quantization_config")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and lm_head as held on devices (vocab_size + vocab_padding)."""
        return self.vocab_size + self.vocab_padding

    def with_vocab_multiple(self, multiple: int) -> Config:
        """This config with the vocabulary padded up to a multiple of `multiple` (the shards it splits
        into); itself when it already divides."""
        padding = -self.vocab_size % multiple
        return self if padding == self.vocab_padding else dataclasses.replace(self, vocab_padding=padding)

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
        """A config.json dictionary that `from_hf_dict` reads back to this config (the K2.5 wrapper,
        `text_config` inside, when the weights carry the `language_model.` prefix)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("rope_scaling", "weight_block_size", "name", "int4", "weights_prefix", "vocab_padding")}
        d.update(architectures=["DeepseekV3ForCausalLM"], model_type="kimi_k2", hidden_act="silu",
                 num_key_value_heads=self.num_attention_heads, attention_bias=False,
                 moe_layer_freq=1, scoring_func="sigmoid", topk_method="noaux_tc",
                 tie_word_embeddings=False, num_nextn_predict_layers=0, torch_dtype="bfloat16")
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(type="yarn", **dataclasses.asdict(self.rope_scaling))
        if self.weight_block_size is not None:
            d["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                        "quant_method": "fp8", "weight_block_size": list(self.weight_block_size)}
        if self.int4 is not None:
            d["quantization_config"] = self.int4.to_hf_dict()
        if self.weights_prefix == K25_PREFIX:
            quant = d.pop("quantization_config", None)
            d = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
                 "text_config": {**d, "model_type": "deepseek_v3"}, "vision_config": {}}
            if quant is not None:
                d["quantization_config"] = quant  # where the K2.5/K2.6 releases (and vLLM) put it
        elif self.weights_prefix:
            raise ConfigError(f"weights_prefix {self.weights_prefix!r} has no config.json form; "
                              f"the engine knows {K25_PREFIX!r} (Kimi-K2.5/K2.6)")
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


# Every numeric and boolean field: (type, lower bound: ≥ for integers, > for floats). A boolean is not
# an integer (`num_experts_per_tok: true` is refused, not read as 1), a string is not a number.
_FIELD_TYPES: dict[str, tuple[type, float | None]] = {
    **{f: (int, 1) for f in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                             "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                             "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
                             "num_experts_per_tok", "n_shared_experts", "n_group", "topk_group",
                             "max_position_embeddings")},
    "first_k_dense_replace": (int, 0), "bos_token_id": (int, 0), "eos_token_id": (int, 0),
    "norm_topk_prob": (bool, None), "routed_scaling_factor": (float, 0), "rms_norm_eps": (float, 0),
    "rope_theta": (float, 0),
}
_OPTIONAL = ("bos_token_id", "eos_token_id")

K25_PREFIX = "language_model."  # Kimi-K2.5/K2.6 text-model weights: language_model.model.layers...

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
    outer, prefix = d, ""
    if d.get("model_type") == "kimi_k25" or "text_config" in d:
        # Kimi-K2.5/K2.6: a vision-language wrapper; its text model is a DeepseekV3 under text_config.
        d = d.get("text_config")
        if not isinstance(d, dict):
            raise ConfigError("config field 'text_config' must hold the text model's DeepseekV3 values "
                              "(a Kimi-K2.5/K2.6 config.json has one)")
        prefix = K25_PREFIX
    model_type = d.get("model_type")
    if model_type not in ("kimi_k2", "deepseek_v3", None):
        raise ConfigError(f"config field 'model_type'={model_type!r} is not supported: "
                          "expected 'kimi_k2' or 'deepseek_v3'")
    for field, want in _REQUIRED.items():
        if field in d and d[field] != want:
            raise ConfigError(f"config field '{field}'={d[field]!r} is not supported (the engine implements {want!r})")
    if d.get("q_lora_rank") is None and "q_lora_rank" in d:
        raise ConfigError("config field 'q_lora_rank' is null: the engine implements MLA with a query LoRA "
                          "(q_a_proj/q_b_proj) as Kimi-K2 and DeepSeek-V3 use")
    for field, (kind, lo) in _FIELD_TYPES.items():  # before any comparison, so that the culprit is named
        if d.get(field) is not None:
            _check_value(field, d[field], kind, lo)
    heads = d.get("num_attention_heads")
    if d.get("num_key_value_heads") is not None:
        _check_value("num_key_value_heads", d["num_key_value_heads"], int, 1)
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
        norm_topk_prob=d.get("norm_topk_prob", True),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),  # types checked above
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(d.get("rope_theta", 10000.0)),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        rope_scaling=_parse_rope(d.get("rope_scaling") or d.get("rope_parameters")),
        weights_prefix=prefix,
    )
    for key in ("bos_token_id", "eos_token_id"):
        if out[key] is None and outer is not d:
            out[key] = outer.get(key)
    # vLLM reads quantization_config from the top level; some exports put it in text_config.
    quant = outer.get("quantization_config") or d.get("quantization_config")
    if quant is not None and not isinstance(quant, dict):
        raise ConfigError(f"config field 'quantization_config' must be an object, got {quant!r}")
    if quant is not None and quant.get("quant_method") == "compressed-tensors":
        out.update(weight_block_size=None, int4=_parse_compressed_tensors(quant))
    else:
        out.update(weight_block_size=_parse_quant(quant))
    return out


def _parse_rope(r: dict[str, Any] | None) -> YarnRope | None:
    if r is None:
        return None
    if not isinstance(r, dict):
        raise ConfigError(f"config field 'rope_scaling' must be an object, got {r!r}")
    for field, (kind, lo) in _ROPE_TYPES.items():  # HF's falsy-means-default below must not hide a string
        if r.get(field) is not None:
            _check_value(f"rope_scaling.{field}", r[field], kind, lo if r[field] else None)
    kind = r.get("type", r.get("rope_type"))
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise ConfigError(f"config field 'rope_scaling.type'={kind!r} is not supported: the engine implements 'yarn'")
    defaults = YarnRope()
    return YarnRope(
        factor=float(r.get("factor", defaults.factor)),
        original_max_position_embeddings=r.get("original_max_position_embeddings",
                                               defaults.original_max_position_embeddings),
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
                          "(quant_method 'fp8', fmt 'e4m3'), compressed-tensors INT4 (pack-quantized) or "
                          "unquantized checkpoints")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"config field 'quantization_config.weight_block_size'={block!r} must be [rows, cols]")
    return tuple(block)


# What the INT4 weights of a compressed-tensors group must be: Kimi-K2-Thinking's W4A16 scheme.
_INT4_WEIGHTS = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "dynamic": False}


def _parse_compressed_tensors(q: dict[str, Any]) -> Int4Quant:
    """compressed-tensors `pack-quantized` W4A16 -> Int4Quant; any other scheme is refused by field."""
    at = "quantization_config"
    if q.get("format") != "pack-quantized":
        raise ConfigError(f"config field '{at}.format'={q.get('format')!r} is not supported: the engine reads "
                          "compressed-tensors 'pack-quantized' (INT4 packed 8 per int32)")
    if q.get("quantization_status", "compressed") != "compressed":
        raise ConfigError(f"config field '{at}.quantization_status'={q.get('quantization_status')!r}: the "
                          "weights must be stored compressed (weight_packed / weight_scale)")
    if q.get("kv_cache_scheme") is not None:
        raise ConfigError(f"config field '{at}.kv_cache_scheme' is not supported (the KV cache is bf16)")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ConfigError(f"config field '{at}.config_groups' must hold exactly one scheme, got "
                          f"{list(groups) if isinstance(groups, dict) else groups!r}")
    (name, group), = groups.items()
    at = f"{at}.config_groups.{name}"
    if "Linear" not in (group.get("targets") or []):
        raise ConfigError(f"config field '{at}.targets'={group.get('targets')!r} is not supported: the engine "
                          "reads schemes that target 'Linear' (with exceptions in 'ignore')")
    for side in ("input_activations", "output_activations"):
        if group.get(side) is not None:
            raise ConfigError(f"config field '{at}.{side}' is not supported: the engine runs W4A16 "
                              "(activations unquantized)")
    weights = group.get("weights") or {}
    for field, want in _INT4_WEIGHTS.items():
        if weights.get(field) != want:
            raise ConfigError(f"config field '{at}.weights.{field}'={weights.get(field)!r} is not supported "
                              f"(the engine implements {want!r})")
    if weights.get("actorder") is not None:
        raise ConfigError(f"config field '{at}.weights.actorder'={weights['actorder']!r} is not supported "
                          "(activation-ordered groups need g_idx tensors)")
    size = weights.get("group_size")
    if not isinstance(size, int) or size <= 0 or size % 8:
        raise ConfigError(f"config field '{at}.weights.group_size'={size!r} must be a positive multiple of 8")
    ignore = q.get("ignore") or []
    if not all(isinstance(e, str) for e in ignore):
        raise ConfigError(f"config field 'quantization_config.ignore' must be a list of strings, got {ignore!r}")
    for entry in ignore:
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as e:
                raise ConfigError(f"config field 'quantization_config.ignore' entry {entry!r}: {e}") from None
    return Int4Quant(group_size=size, ignore=tuple(ignore))


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

# Kimi-K2-Instruct-0905: the same weights' shapes, 256K context (its config.json: YaRN factor 64).
KIMI_K2_0905 = dataclasses.replace(
    KIMI_K2, max_position_embeddings=262144, name="kimi-k2-0905",
    rope_scaling=dataclasses.replace(KIMI_K2.rope_scaling, factor=64.0),
)

# Kimi-K2-Thinking: Kimi-K2's architecture at 256K with INT4 routed experts. Its config.json is not in
# a stored source; the quantization_config is the release's (../shared/reference/kimi-k2-thinking),
# the context its model card's, the rope 0905's. Load a real checkpoint from its own config.json.
THINKING_IGNORE = ("lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*")
KIMI_K2_THINKING = dataclasses.replace(
    KIMI_K2_0905, weight_block_size=None, int4=Int4Quant(group_size=32, ignore=THINKING_IGNORE),
    name="kimi-k2-thinking",
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

# INT4 needs input dims that are whole words (8 values) and, for compressed-tensors, whole groups of 32;
# the expert dim (96 = 3 groups, 12 words) splits over tensor=2 and 4 into shards that are not whole groups.
TINY_KIMI_INT4 = dataclasses.replace(
    TINY_KIMI, hidden_size=160, moe_intermediate_size=96, weight_block_size=None,
    int4=Int4Quant(group_size=32, ignore=THINKING_IGNORE), name="tiny-kimi-int4",
)

PRESETS: dict[str, Config] = {c.name: c for c in (KIMI_K2, KIMI_K2_0905, KIMI_K2_THINKING, DEEPSEEK_V3, TINY_KIMI,
                                                  TINY_KIMI_INT4, TINY_DEEPSEEK)}


def get_config(name_or_path: str | Path) -> Config:
    """A preset by name, or a config.json (file or checkpoint directory) by path."""
    if str(name_or_path) in PRESETS:
        return PRESETS[str(name_or_path)]
    path = Path(name_or_path)
    if path.exists():
        return Config.from_json(path)
    raise ConfigError(f"'{name_or_path}' is neither a preset ({', '.join(PRESETS)}) nor an existing config path")
