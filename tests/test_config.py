"""config.json parsing: the real Kimi-K2 file, DeepSeek-V3 style files, and refused values."""

import dataclasses
import json

import jax
import pytest
from conftest import reference_file

from kimi_jax.config import DEEPSEEK_V3, KIMI_K2, TINY_DEEPSEEK, TINY_KIMI, Config, ConfigError, get_config
from kimi_jax.model.weights import abstract_params, count_params, param_bytes

pytestmark = pytest.mark.unit


def real_config() -> dict:
    return json.loads(reference_file("config.json", "kimi_k2_config.json").read_text())


def test_real_kimi_config_loads_unchanged():
    cfg = Config.from_hf_dict(real_config(), name=KIMI_K2.name)
    assert cfg == KIMI_K2
    assert cfg.weight_block_size == (128, 128) and cfg.kv_cache_width == 576


@pytest.mark.parametrize("cfg", [KIMI_K2, DEEPSEEK_V3, TINY_KIMI, TINY_DEEPSEEK], ids=lambda c: c.name)
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
