"""r4b: a hackable PyTorch implementation of the R-4B vision-language model.

The names below are re-exported lazily (PEP 562): ``import r4b_core.config`` (which r4b_weights does)
runs this file first, and importing the model here would drag the model math into every layer below it.
``from r4b_core import R4BForConditionalGeneration`` imports the model on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": "r4b_core.config",
    "R4BConfig": "r4b_core.config",
    "TextConfig": "r4b_core.config",
    "VisionConfig": "r4b_core.config",
    "preset": "r4b_core.config",
    "CacheOverflowError": "r4b_core.models.kv_cache",
    "KVCache": "r4b_core.models.kv_cache",
    "ImageTokenMismatchError": "r4b_core.models.r4b",
    "R4BForConditionalGeneration": "r4b_core.models.r4b",
    "Qwen3ForCausalLM": "r4b_core.models.qwen3",
    "Qwen3Model": "r4b_core.models.qwen3",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'r4b_core' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
