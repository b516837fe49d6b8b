"""Training-state checkpoints that survive a crash: save, find the newest complete one, load it.

    path = save_training_state(out_dir, model, optimizer, step=100, scheduler=scheduler,
                               data_position={"next_example": 800}, extra={"run": "shapes"}, keep=2)
    path = latest_state(out_dir)                    # newest COMPLETE state, or None
    state = load_training_state(path, model, optimizer, scheduler=scheduler)
    state.step, state.data_position, state.extra    # where the loop continues

A state is a directory ``out_dir/state-00000100`` holding

    .r4b-training-state       owner marker, written first (says r4b wrote the directory)
    model.safetensors         weights: the trainable parameters (``weights="trainable"``, the default:
                              the LoRA adapters only with LoRA, everything that trains otherwise) or all
    optimizer.safetensors     optimizer (and scheduler) tensors, by parameter name
    sharded/                  instead of the two files above under FSDP2: torch.distributed.checkpoint shards
    state.json                the rest of the optimizer and scheduler state (param groups, scheduler
                              counters) as JSON; tensors are referenced by their key in the files above
    rng-rank00000.json        RNG states of each rank: torch CPU (and CUDA when initialised), Python
                              ``random``, numpy's global generator
    manifest.json             written LAST: step, data position, extra metadata, every file and its size

Writes are atomic: everything goes into ``out_dir/.r4b-partial-state-00000100``, each file is fsynced,
the manifest last, the directory is renamed into place and ``out_dir`` fsynced. A crash at any point
leaves the earlier states intact and at most a partial directory, which ``latest_state`` ignores and the
next save removes (``remove_partial_states``; only directories carrying r4b's marker, or empty ones, are
ever deleted). After a save only the newest ``keep`` complete states are kept.

Parameters and optimizer state go through ``torch.distributed.checkpoint.state_dict``'s
``get_state_dict`` / ``set_state_dict`` (names without wrapper parts; optimizer state keyed by parameter
name, not position), so a state saved by one process loads in one process, and one saved under FSDP2
(DTensor parameters) goes through ``dcp.save`` / ``dcp.load``: each rank writes and reads its own shards,
and the world size may change between save and load. A single-process state also loads into an FSDP2
model (each rank reads the full tensors and keeps its shard). Only tensors are handed to dcp (the rest is
JSON), but dcp's own ``.metadata`` file is a pickle: load sharded states only from directories you trust.
Nothing else here unpickles: tensors are safetensors, everything else JSON. Under torch.distributed
every rank calls ``save_training_state`` / ``load_training_state`` (they are collective) with the same
``out_dir`` on a shared file system; rank 0 does the directory work.

The frozen parameters of a ``weights="trainable"`` state come from wherever the model was built from
(its base checkpoint): rebuild the model the same way before loading (``apply_lora`` etc.); a state
whose parameter names differ from the model's is refused with the names.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from r4b_core.training.state_io import (
    TrainingStateError,
    decode,
    encode,
    for_safetensors,
    fsync_dir,
    fsync_file,
    read_json,
    rng_state,
    set_rng_state,
    tensor_keys,
    write_json,
)

STATE_FORMAT = "r4b-training-state-1"
STATE_PREFIX = "state-"
PARTIAL_PREFIX = ".r4b-partial-"
OWNER_MARK = ".r4b-training-state"
MANIFEST = "manifest.json"
TREE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
SHARDED_DIR = "sharded"
WEIGHT_CHOICES = ("trainable", "all")

__all__ = ["TrainingState", "TrainingStateError", "latest_state", "list_states", "load_training_state",
           "read_manifest", "remove_partial_states", "save_training_state"]


@dataclass
class TrainingState:
    """What ``load_training_state`` restored besides the tensors: where the loop continues."""

    path: Path
    step: int
    data_position: Any = None
    extra: dict = field(default_factory=dict)
    sharded: bool = False
    world_size: int = 1


# ---------------------------------------------------------------------------------------------
# ranks


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# finding states


def _is_ours(directory: Path) -> bool:
    marker = directory / OWNER_MARK
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("format") == STATE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_manifest(path: str | Path) -> dict:
    """The manifest of a COMPLETE state directory, checked: our format, every listed file present with its
    size. Raises ``FileNotFoundError`` (no manifest) or ``TrainingStateError`` (anything else wrong)."""
    path = Path(path)
    manifest = read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != STATE_FORMAT:
        raise TrainingStateError(f"{path / MANIFEST}: not an r4b training-state manifest "
                                 f"(format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                                 f"expected {STATE_FORMAT!r}).")
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(manifest.get("step"), int):
        raise TrainingStateError(f"{path / MANIFEST}: missing 'files' or 'step'; the state is corrupt.")
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise TrainingStateError(f"{path}: {name} is listed in the manifest but missing; the state is incomplete.")
        if f.stat().st_size != size:
            raise TrainingStateError(f"{path}: {name} has {f.stat().st_size} bytes, the manifest says {size}; "
                                     "the state is corrupt.")
    return manifest


def list_states(out_dir: str | Path) -> list[Path]:
    """The complete states in ``out_dir``, oldest first (partial or corrupt directories are skipped)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for d in out_dir.iterdir():
        if not (d.name.startswith(STATE_PREFIX) and d.is_dir()):
            continue
        try:
            found.append((read_manifest(d)["step"], d.name, d))
        except (OSError, ValueError):
            continue
    return [d for _, _, d in sorted(found)]


def latest_state(out_dir: str | Path) -> Path | None:
    """The newest complete state in ``out_dir`` (highest step), or None when there is none."""
    states = list_states(out_dir)
    return states[-1] if states else None


def remove_partial_states(out_dir: str | Path) -> list[Path]:
    """Delete the partial directories an interrupted save or prune left in ``out_dir``: only those whose
    name starts with ``.r4b-partial-`` AND that carry r4b's marker or are empty. Returns what was removed."""
    out_dir = Path(out_dir)
    removed = []
    if not out_dir.is_dir():
        return removed
    for d in sorted(out_dir.iterdir()):
        if not (d.name.startswith(PARTIAL_PREFIX) and d.is_dir() and not d.is_symlink()):
            continue
        if _is_ours(d):
            shutil.rmtree(d)
        elif not any(d.iterdir()):
            d.rmdir()
        else:
            continue
        removed.append(d)
    return removed


def _discard(state_dir: Path) -> None:
    """Remove a complete state: rename it to a partial name first, so a crash mid-delete never leaves a
    directory that looks like a state."""
    trash = state_dir.with_name(f"{PARTIAL_PREFIX}deleting-{state_dir.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(state_dir, trash)
    shutil.rmtree(trash)


# ---------------------------------------------------------------------------------------------
# saving


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _options(weights: str, **kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights={weights!r}: choose one of {WEIGHT_CHOICES}.")
    return StateDictOptions(ignore_frozen_params=weights == "trainable", **kwargs)


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(for_safetensors(tensors), str(path), metadata={"format": STATE_FORMAT})
    fsync_file(path)


def _files_with_sizes(directory: Path) -> dict[str, int]:
    return {str(f.relative_to(directory).as_posix()): f.stat().st_size
            for f in sorted(directory.rglob("*")) if f.is_file() and f.name not in (MANIFEST, OWNER_MARK)}


def save_training_state(
    out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, step: int,
    scheduler: Any = None, data_position: Any = None, extra: dict | None = None, keep: int = 2,
    weights: str = "trainable", on_file_written: Callable[[Path], None] | None = None,
) -> Path:
    """Save the full training state as ``out_dir/state-{step:08d}`` atomically (module docstring); keep
    the newest ``keep`` complete states. ``data_position`` and ``extra`` must be JSON data (the loop's
    cursor into its data, its configuration). ``on_file_written(path)`` is called after each file (on
    every rank, for its own files): for progress reports and crash tests. Returns the state's path.
    Collective under torch.distributed: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"save_training_state: step must be an int >= 0; got {step!r}.")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"save_training_state: keep must be an int >= 1; got {keep!r}.")
    try:
        json.dumps({"data_position": data_position, "extra": extra or {}}, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_training_state: data_position and extra must be JSON data ({e}).") from None
    out_dir = Path(out_dir)
    rank, world = _rank_world()
    sharded = _is_sharded(model)
    had_state = bool(optimizer.state)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(weights))
    if not had_state:  # get_state_dict filled it by a zero-lr step; a fresh optimizer must stay fresh
        optimizer.state.clear()
        optim_sd = {**optim_sd, "state": {}}
    model_tensors, optim_tensors = {}, {}
    seen: dict[tuple, str] = {}
    tree = {"model": encode(model_sd, "model", model_tensors, seen),
            "optimizer": encode(optim_sd, "optimizer", optim_tensors, seen),
            "scheduler": encode(scheduler.state_dict() if scheduler is not None else None, "scheduler",
                                 optim_tensors, seen)}
    final = out_dir / f"{STATE_PREFIX}{step:08d}"
    partial = out_dir / f"{PARTIAL_PREFIX}{final.name}"
    written = on_file_written or (lambda path: None)

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_states(out_dir)  # leftovers of an interrupted save (ours only)
        for taken in (partial, final):  # a directory r4b did not write under our names: refuse, never delete
            if taken.exists() and not _is_ours(taken):
                raise TrainingStateError(f"{taken} exists and was not written by r4b; move it away, or save to "
                                         "another directory.")
        partial.mkdir()
        write_json(partial / OWNER_MARK, {"format": STATE_FORMAT, "step": step})
    _barrier()
    if sharded:
        import torch.distributed.checkpoint as dcp

        dcp.save({**model_tensors, **optim_tensors}, checkpoint_id=str(partial / SHARDED_DIR))
        written(partial / SHARDED_DIR)
    elif rank == 0:
        _write_safetensors(model_tensors, partial / MODEL_FILE)
        written(partial / MODEL_FILE)
        _write_safetensors(optim_tensors, partial / OPTIMIZER_FILE)
        written(partial / OPTIMIZER_FILE)
    if rank == 0:
        write_json(partial / TREE_FILE, tree)
        written(partial / TREE_FILE)
    write_json(partial / f"rng-rank{rank:05d}.json", rng_state())
    written(partial / f"rng-rank{rank:05d}.json")
    _barrier()
    if rank == 0:
        if sharded:
            fsync_dir(partial / SHARDED_DIR)  # dcp fsyncs its shard files; their directory entries too
        manifest = {"format": STATE_FORMAT, "step": step, "data_position": data_position, "extra": extra or {},
                    "sharded": sharded, "world_size": world, "weights": weights, "torch": torch.__version__,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": _files_with_sizes(partial)}
        write_json(partial / MANIFEST, manifest)
        fsync_dir(partial)
        if final.exists():  # the same step saved again (a resumed run): replace it
            _discard(final)
        os.replace(partial, final)
        fsync_dir(out_dir)
        for old in list_states(out_dir)[:-keep]:
            _discard(old)
        fsync_dir(out_dir)
    _barrier()
    return final


# ---------------------------------------------------------------------------------------------
# loading


def _check_same_keys(what: str, saved: set[str], expected: set[str], path: Path, subset: bool = False) -> None:
    """``saved`` must equal ``expected`` (``subset``: lie within it; an optimizer has no state yet for a
    parameter that has not had a gradient)."""
    missing, unexpected = ([] if subset else sorted(expected - saved)), sorted(saved - expected)
    if missing or unexpected:
        def show(keys):
            return ", ".join(k.split("/", 1)[-1] for k in keys[:4]) + (" ..." if len(keys) > 4 else "")
        raise TrainingStateError(
            f"{path}: the saved {what} does not fit this model/optimizer: missing from the state "
            f"[{show(missing)}], in the state but not here [{show(unexpected)}]. Rebuild the model as the run "
            "that saved it did (same checkpoint, LoRA, frozen parts) before loading.")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise TrainingStateError(f"{path}: cannot read the tensors ({e}); the state is corrupt.") from None


def load_training_state(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, scheduler: Any = None,
    restore_rng: bool = True,
) -> TrainingState:
    """Load a complete state (``latest_state(out_dir)``) into ``model`` / ``optimizer`` / ``scheduler``
    (built as the saving run built them) and, with ``restore_rng``, this rank's RNG states. Returns the
    step, data position and extra metadata. Collective under torch.distributed."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    manifest = read_manifest(path)
    tree = read_json(path / TREE_FILE)
    if not isinstance(tree, dict) or not {"model", "optimizer", "scheduler"} <= tree.keys():
        raise TrainingStateError(f"{path / TREE_FILE}: expected the keys model, optimizer, scheduler.")
    weights = manifest.get("weights", "trainable")
    rank, _ = _rank_world()
    target_sharded = _is_sharded(model)
    saved_sharded = bool(manifest.get("sharded", False))
    full_into_sharded = target_sharded and not saved_sharded
    template_model, template_optim = get_state_dict(model, optimizer, options=_options(weights))
    template: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    encode(template_model, "model", template, seen)
    model_keys = set(template)
    encode(template_optim, "optimizer", template, seen)
    _check_same_keys("weights", tensor_keys(tree["model"]), model_keys, path)
    _check_same_keys("optimizer state", tensor_keys(tree["optimizer"]), set(template) - model_keys, path,
                     subset=True)
    if scheduler is not None and tree["scheduler"] is None:
        raise TrainingStateError(f"{path}: the state holds no LR scheduler state, but a scheduler was given.")
    if saved_sharded:
        import torch.distributed.checkpoint as dcp

        encode(tree["scheduler"], "scheduler", template, seen)  # (schedulers hold no tensors in practice)
        tensors = {k: template[k] for k in tensor_keys(tree)}
        try:
            with warnings.catch_warnings():  # one process reading a sharded state is intended here
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(tensors, checkpoint_id=str(path / SHARDED_DIR),  # in place, each rank its own shards
                         no_dist=not (dist.is_available() and dist.is_initialized()))
        except Exception as e:  # dcp raises CheckpointException and friends; name the state
            raise TrainingStateError(f"{path / SHARDED_DIR}: torch.distributed.checkpoint could not load it "
                                     f"({type(e).__name__}: {str(e)[:300]}).") from None
    else:
        tensors = {**_load_safetensors(path / MODEL_FILE), **_load_safetensors(path / OPTIMIZER_FILE)}
        for key, t in tensors.items():
            want = template.get(key)
            shape = tuple(want.shape) if want is not None else None
            if shape is not None and tuple(t.shape) != shape:
                raise TrainingStateError(f"{path}: {key.split('/', 1)[-1]} has shape {list(t.shape)} in the state, "
                                         f"{list(shape)} here; the state was saved for another model.")
    model_sd = decode(tree["model"], tensors, path)
    optim_sd = decode(tree["optimizer"], tensors, path)
    saved_groups = [g.get("params") for g in optim_sd.get("param_groups", [])]
    here_groups = [g.get("params") for g in template_optim.get("param_groups", [])]
    if saved_groups != here_groups:
        raise TrainingStateError(f"{path}: the optimizer's parameter groups differ from the saved ones "
                                 f"({len(saved_groups)} saved, {len(here_groups)} here, or other members); build the "
                                 "optimizer as the saving run did.")
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=_options(weights, strict=False, full_state_dict=full_into_sharded))
    if scheduler is not None:
        scheduler.load_state_dict(decode(tree["scheduler"], tensors, path))
    rng_file = path / f"rng-rank{rank:05d}.json"
    if restore_rng and rng_file.is_file():
        set_rng_state(read_json(rng_file), rng_file)
    _barrier()
    return TrainingState(path=path, step=manifest["step"], data_position=manifest.get("data_position"),
                         extra=manifest.get("extra") or {}, sharded=saved_sharded,
                         world_size=int(manifest.get("world_size", 1)))
