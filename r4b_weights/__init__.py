"""Checkpoint I/O: the HF-name table, strict safetensors loading (sharded, mmap), hub download, export."""

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
from r4b_weights.loader import load_r4b_model, load_text_model, resolve_dtype
from r4b_weights.names import hf_to_ours, ours_to_hf

__all__ = [
    "CheckpointError", "ConfigMismatchError", "CorruptCheckpointError", "MissingShardError", "MissingTensorError",
    "PickleCheckpointError", "ShapeMismatchError", "UnexpectedTensorError", "save_hf_checkpoint",
    "resolve_checkpoint", "load_r4b_model", "load_text_model", "resolve_dtype", "hf_to_ours", "ours_to_hf",
]
