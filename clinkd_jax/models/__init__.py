"""Qwen2-VL in pure-functional flax.linen: vision tower, patch merger, Qwen2 LLM with M-RoPE."""

from clinkd_jax.models.config import Qwen2VLConfig, TextConfig, VisionConfig
from clinkd_jax.models.llm import KVCache
from clinkd_jax.models.qwen2vl import Qwen2VL

__all__ = ["Qwen2VL", "Qwen2VLConfig", "TextConfig", "VisionConfig", "KVCache"]
