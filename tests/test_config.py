"""config.json parsing: the real Kimi-K2 file, DeepSeek-V3 style files, and refused values."""

import dataclasses
import json
import re

import jax
import pytest
from conftest import reference_file

from kimi_jax.config import (
    DEEPSEEK_V3,
    KIMI_K2,
    KIMI_K2_0905,
    KIMI_K2_THINKING,
    TINY_DEEPSEEK,
    TINY_KIMI,
    TINY_KIMI_INT4,
    Config,
    ConfigError,
    Int4Quant,
    get_config,
)
from kimi_jax.model.weights import abstract_params, count_params, leaves, param_bytes

pytestmark = pytest.mark.unit


def real_config() -> dict:
    return json.loads(reference_file("config.json", "kimi_k2_config.json").read_text())


def test_real_kimi_config_loads_unchanged():
    cfg = Config.from_hf_dict(real_config(), name=KIMI_K2.name)
    assert cfg == KIMI_K2
    assert cfg.weight_block_size == (128, 128) and cfg.kv_cache_width == 576


@pytest.mark.parametrize("cfg", [KIMI_K2, KIMI_K2_0905, KIMI_K2_THINKING, DEEPSEEK_V3, TINY_KIMI, TINY_KIMI_INT4,
                                 TINY_DEEPSEEK, dataclasses.replace(TINY_KIMI_INT4, weights_prefix="language_model.")],
                         ids=lambda c: f"{c.name}{'-k25' if c.weights_prefix else ''}")
def test_hf_dict_round_trip(cfg):
    assert Config.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())), name=cfg.name) == cfg


def test_from_json_reads_a_checkpoint_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(real_config()))
    assert dataclasses.replace(get_config(tmp_path), name="kimi-k2") == KIMI_K2
    assert get_config("kimi-k2") is KIMI_K2


@pytest.mark.parametrize("field,value,needle", [
    ("scoring_func", "softmax", "scoring_func"),
    ("topk_method", "greedy", "topk_method"),
    ("hidden_act", "gelu", "hidden_act"),
    ("q_lora_rank", None, "q_lora_rank"),
    ("num_key_value_heads", 8, "num_key_value_heads"),
    ("model_type", "llama", "model_type"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("n_group", 5, "n_routed_experts"),
    ("qk_rope_head_dim", 63, "qk_rope_head_dim"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling.type"),
    ("quantization_config", {"quant_method": "awq"}, "quantization_config"),
])
def test_unsupported_values_name_the_field(field, value, needle):
    d = real_config()
    d[field] = value
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        Config.from_hf_dict(d)


def test_missing_fields_are_listed():
    d = real_config()
    del d["hidden_size"], d["kv_lora_rank"]
    with pytest.raises(ConfigError, match="hidden_size.*kv_lora_rank"):
        Config.from_hf_dict(d)


def release_tensor_count(c: Config) -> int:
    """Values in the release's tensors, counted from the shapes the README lists (scales included)."""
    def q(out: int, inp: int) -> int:  # fp8 weight plus its [ceil(out/128), ceil(in/128)] scale_inv
        return out * inp + -(-out // 128) * -(-inp // 128)

    h, d = c.num_attention_heads, c.hidden_size
    attn = (q(c.q_lora_rank, d) + c.q_lora_rank + q(h * c.qk_head_dim, c.q_lora_rank)
            + q(c.kv_lora_rank + c.qk_rope_head_dim, d) + c.kv_lora_rank
            + q(h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank) + q(d, h * c.v_head_dim))
    dense = 2 * q(c.intermediate_size, d) + q(d, c.intermediate_size)
    expert = 2 * q(c.moe_intermediate_size, d) + q(d, c.moe_intermediate_size)
    moe = (c.n_routed_experts + c.n_shared_experts) * expert + c.n_routed_experts * d + c.n_routed_experts
    layers = c.first_k_dense_replace * (attn + dense + 2 * d) + c.num_moe_layers * (attn + moe + 2 * d)
    return layers + 2 * c.vocab_size * d + d


def test_full_kimi_k2_parameter_count_from_eval_shape():
    import jax.numpy as jnp

    from kimi_jax import kernels
    from kimi_jax.model.decoder import Transformer

    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    module = Transformer(KIMI_K2, backend=kernels.choose("cpu"))  # the reference would trace 384 experts one by one
    tree = jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t, t), tokens)["params"]
    assert jax.tree.structure(tree) == jax.tree.structure(abstract_params(KIMI_K2))
    total = count_params(tree)
    assert total == release_tensor_count(KIMI_K2)
    assert total == pytest.approx(1.0265e12, rel=1e-3)
    # ~959 GB on disk: fp8 weights, bf16 embeddings/norms/router, fp32 scales and bias.
    assert param_bytes(tree) == pytest.approx(1.03e12, rel=0.02)


# The newer releases ---------------------------------------------------------------------------------
def thinking_quantization_config() -> dict:
    """The release's quantization_config block (../shared/reference/kimi-k2-thinking), or the preset's."""
    path = reference_file("../kimi-k2-thinking/quantization_config.json", "missing")
    return json.loads(path.read_text()) if path.is_file() else KIMI_K2_THINKING.int4.to_hf_dict()


def test_0905_config_loads_at_256k():
    """Kimi-K2-Instruct-0905: max_position_embeddings 262144, YaRN factor 64 (its config.json's values)."""
    d = real_config()
    d.update(max_position_embeddings=262144)
    d["rope_scaling"] = {**d["rope_scaling"], "factor": 64.0}
    assert Config.from_hf_dict(d, name="kimi-k2-0905") == KIMI_K2_0905
    assert KIMI_K2_0905.rope_scaling.original_max_position_embeddings * 64 == KIMI_K2_0905.max_position_embeddings


def test_thinking_quantization_config_is_int4():
    """The release's compressed-tensors block: INT4 groups of 32, only the routed experts (its ignore list)."""
    d = real_config()
    d["quantization_config"] = thinking_quantization_config()
    cfg = Config.from_hf_dict(d)
    assert cfg.weight_block_size is None and cfg.int4.group_size == 32
    specs = {leaf.name: leaf.spec for leaf in leaves(cfg)}
    int4 = sorted(name for name, spec in specs.items() if spec.quantized)
    assert int4 == ["moe_layers/ffn/experts_down", "moe_layers/ffn/experts_gate", "moe_layers/ffn/experts_up"]
    assert all(specs[n].kind == "int4" for n in int4)
    assert cfg.int4.ignore[-1] == r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"  # the JSON's doubled backslash, read


def test_quantization_config_in_text_config_and_the_k25_wrapper():
    """K2.5/K2.6: DeepseekV3 values under text_config, weights under language_model.; the quantization_config
    may sit at the top level (where vLLM reads it) or inside text_config."""
    quant = thinking_quantization_config()
    quant["ignore"] = ["re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*",
                       "re:.*lm_head.*", "re:vision_tower.*", "re:mm_projector.*"]  # K2.6's, as its release states
    text = {**real_config(), "quantization_config": quant}
    top = {"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"],
           "text_config": {k: v for k, v in text.items() if k != "quantization_config"},
           "quantization_config": text["quantization_config"], "vision_config": {"patch_size": 14}}
    inner = {"model_type": "kimi_k25", "text_config": text, "vision_config": {}}
    for d in (top, inner):
        cfg = Config.from_hf_dict(d)
        assert cfg.weights_prefix == "language_model." and cfg.int4 is not None
        assert cfg.bos_token_id == 163584
        assert next(leaves(cfg)).spec.hf == "language_model.model.embed_tokens.weight"
    with pytest.raises(ConfigError, match="text_config"):
        Config.from_hf_dict({"model_type": "kimi_k25"})


def test_ignore_entries_as_the_config_states_them():
    """Exact names, `re:` regexes matched from the start (re.match), and the class name `Linear`."""
    q = Int4Quant(ignore=("lm_head", "re:.*self_attn.*", "model.layers.1.mlp.experts.0.up_proj", "re:mlp"))
    assert not q.quantizes("lm_head") and q.quantizes("language_model.lm_head")
    assert not q.quantizes("model.layers.3.self_attn.o_proj")
    assert not q.quantizes("model.layers.1.mlp.experts.0.up_proj")
    assert q.quantizes("model.layers.1.mlp.experts.1.up_proj")
    assert q.quantizes("model.layers.1.mlp.gate_proj")  # "re:mlp" must match at the start
    assert not Int4Quant(ignore=("Linear",)).quantizes("model.layers.1.mlp.experts.0.up_proj")
    # An ignore list that splits one stacked weight (one expert of one layer) cannot be held.
    cfg = dataclasses.replace(TINY_KIMI_INT4, int4=dataclasses.replace(TINY_KIMI_INT4.int4, ignore=(
        *TINY_KIMI_INT4.int4.ignore, "model.layers.1.mlp.experts.0.up_proj")))
    with pytest.raises(ConfigError, match=r"makes 'model\.layers\.1\.mlp\.experts\.1\.up_proj' INT4 but not "
                                          r"'model\.layers\.1\.mlp\.experts\.0\.up_proj'"):
        abstract_params(cfg)
    lm_head = dataclasses.replace(TINY_KIMI_INT4, int4=Int4Quant(ignore=("re:.*self_attn.*",)))
    with pytest.raises(ConfigError, match="lm_head.*INT4"):
        abstract_params(lm_head)


@pytest.mark.parametrize("path,value,needle", [
    (("format",), "float-quantized", "quantization_config.format"),
    (("config_groups", "group_0", "weights", "num_bits"), 8, "weights.num_bits"),
    (("config_groups", "group_0", "weights", "symmetric"), False, "weights.symmetric"),
    (("config_groups", "group_0", "weights", "strategy"), "channel", "weights.strategy"),
    (("config_groups", "group_0", "weights", "actorder"), "group", "weights.actorder"),
    (("config_groups", "group_0", "weights", "group_size"), 12, "weights.group_size"),
    (("config_groups", "group_0", "input_activations"), {"num_bits": 8}, "input_activations"),
    (("config_groups", "group_0", "targets"), ["Embedding"], "targets"),
    (("quantization_status",), "frozen", "quantization_status"),
    (("ignore",), ["re:(unclosed"], "ignore' entry 're:\\(unclosed'"),
])
def test_unsupported_int4_schemes_name_the_field(path, value, needle):
    d = real_config()
    q = d["quantization_config"] = thinking_quantization_config()
    for key in path[:-1]:
        q = q[key]
    q[path[-1]] = value
    with pytest.raises(ConfigError, match=re.escape(needle) if "\\" not in needle else needle):
        Config.from_hf_dict(d)


def test_int4_needs_whole_words():
    cfg = dataclasses.replace(TINY_KIMI_INT4, moe_intermediate_size=36)  # down_proj's input: 36 is 4.5 words
    with pytest.raises(ConfigError, match="experts.*down_proj: INT4 packs 8 input values per int32 word"):
        abstract_params(cfg)


def test_thinking_preset_is_kimi_k2_with_int4_experts():
    assert KIMI_K2_THINKING.int4.ignore == tuple(thinking_quantization_config()["ignore"])
    assert dataclasses.replace(KIMI_K2_THINKING, int4=None, weight_block_size=(128, 128),
                               name=KIMI_K2_0905.name) == KIMI_K2_0905
