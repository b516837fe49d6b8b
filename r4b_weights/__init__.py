"""Checkpoint I/O: the HF-name table, strict safetensors loading (sharded, mmap), hub download, export.

Imports ``r4b_core.config`` and the helpers at its level (``json_io``, ``devices``), nothing else from
r4b: the loader fills a module it is given (``open_checkpoint`` then ``load_weights``, which reads the
layout from the module's config) and export writes any module from its ``state_dict()`` and ``config``. The model
classes' ``from_pretrained`` call into it.
"""

from r4b_weights.errors import (
    CheckpointError,
    ConfigMismatchError,
    CorruptCheckpointError,
    MissingShardError,
    MissingTensorError,
    PickleCheckpointError,
    ShapeMismatchError,
    UnexpectedTensorError,
)
from r4b_weights.export import save_hf_checkpoint
from r4b_weights.hub import resolve_checkpoint
from r4b_weights.loader import load_weights, open_checkpoint, resolve_dtype
from r4b_weights.names import hf_to_ours, ours_to_hf

__all__ = [
    "CheckpointError", "ConfigMismatchError", "CorruptCheckpointError", "MissingShardError", "MissingTensorError",
    "PickleCheckpointError", "ShapeMismatchError", "UnexpectedTensorError", "save_hf_checkpoint",
    "resolve_checkpoint", "open_checkpoint", "load_weights", "resolve_dtype",
    "hf_to_ours", "ours_to_hf",
]
