"""How the pieces of a training state become files (``state.py`` saves and loads; ``state_dir.py`` owns the
directory protocol).

- Nested state (an optimizer's or scheduler's ``state_dict``, a model's) splits into JSON data plus a flat
  ``{key: tensor}`` dict for safetensors or torch.distributed.checkpoint: ``encode`` / ``decode``.
  A tensor becomes ``{"__tensor__": key}`` (its path in the tree, e.g. ``optimizer/state/<param>/exp_avg``;
  a tensor reached twice, such as a tied weight, is stored once), a tuple ``{"__tuple__": [...]}``, a dict
  whose keys are not all plain strings ``{"__dict__": [[key, value], ...]}`` (so int keys stay ints). No
  pickle anywhere.
- RNG states of this process as JSON data: ``rng_state`` / ``set_rng_state`` (torch CPU, CUDA when
  initialised, Python ``random``, numpy's global generator).
- Durable writes: ``write_json`` fsyncs the file; ``fsync_dir`` (and r4b_weights.atomic_file's ``fsync_file``) for the rest.
"""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


class TrainingStateError(ValueError):
    """A training state that cannot be used: incomplete, corrupt, or saved for another model / optimizer."""


# ---------------------------------------------------------------------------------------------
# durable files


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (files created in it, a rename into it); a no-op where directories
    cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, value: Any) -> None:
    """``value`` as JSON in ``path``, flushed and fsynced before returning."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path) -> Any:
    """The JSON in ``path``: ``FileNotFoundError`` when missing, ``TrainingStateError`` when not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (part of a training state).") from None
    except IsADirectoryError:
        raise TrainingStateError(f"{path}: a directory where a JSON file of a training state belongs.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainingStateError(f"{path}: not valid JSON ({e}); the training state is corrupt.") from None


# ---------------------------------------------------------------------------------------------
# nested state <-> (JSON data, flat tensors)


def _identity(t: torch.Tensor) -> tuple:
    """Equal for two tensor objects that are the same view of the same memory (a tied weight)."""
    if type(t) not in (torch.Tensor, nn.Parameter) or t.numel() == 0:
        return ("object", id(t))  # DTensor (also as a Parameter) and other subclasses: by object
    return (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def encode(obj: Any, path: str, tensors: dict[str, torch.Tensor], seen: dict[tuple, str]) -> Any:
    """``obj`` as JSON data; its tensors go into ``tensors`` under their tree path below ``path``.
    ``seen`` is shared by the calls of one state so a tensor reached twice (a tied weight) is stored once."""
    if isinstance(obj, torch.Tensor):
        key = seen.get(_identity(obj))
        if key is None:
            key = seen[_identity(obj)] = path
            tensors[key] = obj
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, f"{path}/{k}", tensors, seen) for k, v in obj.items()}
        return {_DICT: [[encode(k, f"{path}/key{i}", tensors, seen), encode(v, f"{path}/{k!r}", tensors, seen)]
                        for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {_TUPLE: [encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"training state: {path} is a {type(obj).__name__}, neither a tensor nor JSON data; "
                    "only tensors, numbers, strings, None, lists, tuples and dicts can be saved.")


def decode(obj: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    """The inverse of ``encode``; ``where`` (the state) is named when a referenced tensor is missing."""
    if isinstance(obj, list):
        return [decode(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1 and _TENSOR in obj:
            if obj[_TENSOR] not in tensors:
                raise TrainingStateError(f"{where}: tensor {obj[_TENSOR]!r} is referenced but not stored.")
            return tensors[obj[_TENSOR]]
        if len(obj) == 1 and _TUPLE in obj:
            return tuple(decode(v, tensors, where) for v in obj[_TUPLE])
        if len(obj) == 1 and _DICT in obj:
            return {decode(k, tensors, where): decode(v, tensors, where) for k, v in obj[_DICT]}
        return {k: decode(v, tensors, where) for k, v in obj.items()}
    return obj


def tensor_keys(tree: Any) -> set[str]:
    """The tensor keys an encoded tree references."""
    if isinstance(tree, list):
        return set().union(*(tensor_keys(v) for v in tree))
    if isinstance(tree, dict):
        if len(tree) == 1 and _TENSOR in tree:
            return {tree[_TENSOR]}
        return set().union(*(tensor_keys(v) for v in tree.values()))
    return set()


def for_safetensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two entries sharing memory (safetensors refuses shared storage)."""
    out, storages = {}, set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in storages and t.numel():
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


# ---------------------------------------------------------------------------------------------
# RNG states


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _from_b64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict:
    """This process's RNG states as JSON data: torch CPU, CUDA (when initialised), Python, numpy."""
    version, internal, gauss = random.getstate()
    state = {"torch": _b64(torch.get_rng_state()), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np
    except ImportError:  # numpy is a runtime dependency, but the RNG part is optional
        return state
    np_state = np.random.get_state(legacy=False)
    state["numpy"] = {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                      "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                      "gauss": float(np_state["gauss"])}
    return state


def set_rng_state(state: dict, where: Path | None = None) -> None:
    """Restore what ``rng_state`` returned (CUDA states for the devices present)."""
    try:
        torch.set_rng_state(_from_b64(state["torch"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            for device, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(_from_b64(s), device)
        if "numpy" in state:
            import numpy as np

            n = state["numpy"]
            np.random.set_state({"bit_generator": n["bit_generator"],
                                 "state": {"key": np.array(n["key"], dtype=np.uint32), "pos": n["pos"]},
                                 "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise TrainingStateError(f"{where}: not a valid RNG state ({type(e).__name__}: {e}).") from None
