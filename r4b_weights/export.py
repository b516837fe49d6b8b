"""Write a model back as an HF checkpoint: config.json plus (sharded) safetensors in the HF layout.

Reloading what ``save_hf_checkpoint`` wrote gives bit-identical tensors. A tied lm_head is not
written (transformers does not store tied weights either).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from r4b_core.model import R4BForConditionalGeneration
from r4b_core.qwen3 import Qwen3ForCausalLM
from r4b_weights.names import QWEN3, R4B, ours_to_hf, text_to_full
from r4b_weights.safetensors_io import write_safetensors

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names whose tensor was already seen under an earlier name (shared parameters)."""
    seen: set[int] = set()
    tied = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            tied.add(name)
        seen.add(id(t))
    return tied


def save_hf_checkpoint(
    model: nn.Module, directory: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[Path]:
    """Save ``model`` to ``directory`` in its HF layout; returns the safetensors files written.

    ``R4BForConditionalGeneration`` is written in R-4B's layout (``model.language_model.*``,
    ``model.vision_tower.vision_model.*``, ``model.multi_modal_projector.*``, ``model.image_newline``,
    ``lm_head.*``); ``Qwen3ForCausalLM`` as a plain Qwen3 checkpoint (``model.*``, ``lm_head.*``).
    Shards (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``) are used when
    the tensors exceed ``max_shard_bytes``; weight files of an earlier save in ``directory`` are removed.
    """
    if isinstance(model, R4BForConditionalGeneration):
        def hf_name(name: str) -> str:
            return ours_to_hf(name, R4B)
    elif isinstance(model, Qwen3ForCausalLM):
        def hf_name(name: str) -> str:
            return ours_to_hf(text_to_full(name), QWEN3)
    else:
        raise TypeError(f"save_hf_checkpoint: unsupported model type {type(model).__name__}.")
    directory = Path(directory)
    tied = _tied_names(model)
    tensors = {hf_name(name): t for name, t in model.state_dict().items() if name not in tied}
    config = model.config.to_hf_dict()
    if isinstance(model, Qwen3ForCausalLM):
        config.setdefault("architectures", ["Qwen3ForCausalLM"])
    dtype = next(iter(tensors.values())).dtype
    dtype_keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for key in dtype_keys:
        config[key] = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return write_safetensors(tensors, directory, max_shard_bytes)
