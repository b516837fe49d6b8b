"""r4b: a hackable PyTorch implementation of the R-4B vision-language model."""

from r4b_core.config import ConfigError, R4BConfig, TextConfig, VisionConfig, preset
from r4b_core.kv_cache import CacheOverflowError, KVCache
from r4b_core.model import ImageTokenMismatchError, R4BForConditionalGeneration
from r4b_core.qwen3 import Qwen3ForCausalLM, Qwen3Model

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "R4BConfig", "TextConfig", "VisionConfig", "preset", "CacheOverflowError", "KVCache",
    "ImageTokenMismatchError", "R4BForConditionalGeneration", "Qwen3ForCausalLM", "Qwen3Model", "__version__",
]
