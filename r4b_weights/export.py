"""Write a model back as an HF checkpoint: config.json plus (sharded) safetensors in the HF layout.

Reloading what ``save_hf_checkpoint`` wrote gives bit-identical tensors. A tied lm_head is not
written (transformers does not store tied weights either).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from r4b_core.qwen3 import Qwen3ForCausalLM
from r4b_weights.names import QWEN3, ours_to_hf, text_to_full
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

    A ``Qwen3ForCausalLM`` is written as a plain Qwen3 checkpoint (``model.*``, ``lm_head.*``).
    Shards (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``) are used when
    the tensors exceed ``max_shard_bytes``.
    """
    if not isinstance(model, Qwen3ForCausalLM):
        raise TypeError(f"save_hf_checkpoint: unsupported model type {type(model).__name__}.")
    directory = Path(directory)
    tied = _tied_names(model)
    tensors = {
        ours_to_hf(text_to_full(name), QWEN3): t
        for name, t in model.state_dict().items()
        if name not in tied
    }
    config = model.config.to_hf_dict()
    config.setdefault("architectures", ["Qwen3ForCausalLM"])
    dtype = next(iter(tensors.values())).dtype
    dtype_keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for key in dtype_keys:
        config[key] = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return write_safetensors(tensors, directory, max_shard_bytes)
