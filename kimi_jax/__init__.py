"""kimi_jax: Kimi-K2 inference in JAX, straight from the released block-fp8 weights."""

from kimi_jax.config import DEEPSEEK_V3, KIMI_K2, PRESETS, Config, ConfigError
from kimi_jax.model.quant import QArray, dequantize, quantize_block_fp8
from kimi_jax.runtime.engine import Model, load
from kimi_jax.text.tokenizer import load_tokenizer

__all__ = ["Config", "ConfigError", "KIMI_K2", "DEEPSEEK_V3", "PRESETS", "Model", "load", "QArray",
           "dequantize", "quantize_block_fp8", "load_tokenizer"]
