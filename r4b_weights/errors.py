"""Errors raised while reading or checking a checkpoint. All are ``ValueError``s (a missing shard is
also a ``FileNotFoundError``) and their messages name the file, the tensor and the shape."""

from __future__ import annotations


class CheckpointError(ValueError):
    """Base class: the checkpoint cannot be loaded as it is."""


class MissingTensorError(CheckpointError):
    """The model needs a tensor that no checkpoint file holds."""


class UnexpectedTensorError(CheckpointError):
    """A checkpoint file holds a tensor that the model has no place for."""


class ShapeMismatchError(CheckpointError):
    """A tensor's shape differs from the one the model (built from config.json) expects."""


class ConfigMismatchError(CheckpointError):
    """config.json disagrees with the tensors (e.g. hidden_size vs the embedding's width)."""


class CorruptCheckpointError(CheckpointError):
    """A safetensors file is truncated or not a safetensors file, or the shard index is malformed."""


class PickleCheckpointError(CheckpointError):
    """The directory has only pickle weights (.bin/.pt/.pth/.ckpt), which we never unpickle."""


class TensorDtypeError(CheckpointError):
    """A tensor is stored as a dtype the model cannot take (e.g. int32 or bool where a float is expected)."""


class NonFiniteTensorError(CheckpointError):
    """A tensor holds NaN or Inf values (found by ``check_finite=True``)."""


class MissingShardError(CheckpointError, FileNotFoundError):
    """model.safetensors.index.json lists a shard file that is not there."""


def name_list(names, limit: int = 8) -> str:
    """'a', 'b', 'c' ... and N more."""
    names = sorted(names)
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")
