"""Training-state checkpoints that survive a crash: save, find the newest complete one, load it.

    path = save_training_state(out_dir, model, optimizer, step=100, scheduler=scheduler,
                               data_position={"next_example": 800}, extra={"run": "shapes"}, keep=2)
    path = latest_state(out_dir)                    # newest COMPLETE state, or None
    state = load_training_state(path, model, optimizer, scheduler=scheduler)     # checksums verified first
    state = load_training_state(out_dir, model, optimizer, scheduler=scheduler)  # newest INTACT state
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
    manifest.json             written LAST (to a temporary name, then renamed): step, data position, extra
                              metadata, every file with its size and SHA-256

Writes are atomic: everything goes into ``out_dir/.r4b-partial-state-00000100``, each file is fsynced,
the manifest last, the directory is renamed into place and ``out_dir`` fsynced. Files get the usual
permissions (the umask's), as every file r4b writes.

Integrity: ``load_training_state`` checks every file against its recorded SHA-256 before using any of
it and refuses a damaged state, naming the file and the newest intact state beside it. Given the run's
directory instead of one state it loads the newest intact state, warning once per newer damaged one it
skips (``TrainingState.skipped`` lists them). ``newest_intact_state(out_dir)`` makes that choice alone
(scripts/train.py ``--resume`` prints it). ``latest_state`` / ``list_states`` only check sizes (cheap).
The directory protocol (names, marker, manifest, finding / verifying / removing states) is in
``state_dir.py``; this file writes and reads the tensors and JSON through it. A crash at any point
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
    read_json,
    rng_state,
    set_rng_state,
    tensor_keys,
    write_json,
)
from r4b_core.training.state_dir import (
    MANIFEST,
    MODEL_FILE,
    OPTIMIZER_FILE,
    OWNER_MARK,
    PARTIAL_PREFIX,
    SHARDED_DIR,
    STATE_FORMAT,
    STATE_PREFIX,
    TREE_FILE,
    discard_state,
    is_ours,
    sha256_of,
    discard_states,
    latest_state,
    list_states,
    newest_intact_state,
    read_manifest,
    remove_partial_states,
    verify_state,
)
from r4b_weights.atomic_file import fsync_file, replacing
from r4b_weights.output_dir import give_usual_mode

WEIGHT_CHOICES = ("trainable", "all")

__all__ = ["TrainingState", "TrainingStateError", "discard_states", "latest_state", "list_states", "load_training_state",
           "newest_intact_state", "read_manifest", "remove_partial_states", "save_training_state", "verify_state"]


@dataclass
class TrainingState:
    """What ``load_training_state`` restored besides the tensors: where the loop continues."""

    path: Path
    step: int
    data_position: Any = None
    extra: dict = field(default_factory=dict)
    sharded: bool = False
    world_size: int = 1
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # newer damaged states passed over (path, why)


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
    give_usual_mode(path)  # safetensors creates its files 0600
    fsync_file(path)


def _file_records(directory: Path) -> tuple[dict[str, int], dict[str, str]]:
    """({file: size}, {file: sha256}) of every file in a finished partial state but the manifest and marker."""
    files = [f for f in sorted(directory.rglob("*")) if f.is_file() and f.name not in (MANIFEST, OWNER_MARK)]
    names = [f.relative_to(directory).as_posix() for f in files]
    return ({n: f.stat().st_size for n, f in zip(names, files)}, {n: sha256_of(f) for n, f in zip(names, files)})


def _check_save_arguments(step: Any, keep: Any, data_position: Any, extra: dict | None) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"save_training_state: step must be an int >= 0; got {step!r}.")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"save_training_state: keep must be an int >= 1; got {keep!r}.")
    try:
        json.dumps({"data_position": data_position, "extra": extra or {}}, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_training_state: data_position and extra must be JSON data ({e}).") from None


def _encode_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, weights: str
                  ) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the JSON tree, the model's tensors, the optimizer's and scheduler's tensors) of the current state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

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
    return tree, model_tensors, optim_tensors


def _make_partial(out_dir: Path, partial: Path, final: Path, step: int) -> None:
    """Rank 0: a fresh partial directory carrying r4b's marker (leftovers of an interrupted save removed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_states(out_dir)  # leftovers of an interrupted save (ours only)
    for taken in (partial, final):  # a directory r4b did not write under our names: refuse, never delete
        if taken.exists() and not is_ours(taken):
            raise TrainingStateError(f"{taken} exists and was not written by r4b; move it away, or save to "
                                     "another directory.")
    partial.mkdir()
    write_json(partial / OWNER_MARK, {"format": STATE_FORMAT, "step": step})


def _write_parts(partial: Path, tree: dict, model_tensors: dict, optim_tensors: dict, sharded: bool, rank: int,
                 written: Callable[[Path], None]) -> None:
    """Every rank: its tensors (dcp shards, or rank 0's two safetensors files), the JSON tree, its RNG states."""
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


def _commit(out_dir: Path, partial: Path, final: Path, manifest: dict, keep: int) -> None:
    """Rank 0: the manifest (sizes and checksums) written last and atomically, the directory renamed into
    place, the states beyond the newest ``keep`` discarded."""
    if manifest["sharded"]:
        fsync_dir(partial / SHARDED_DIR)  # dcp fsyncs its shard files; their directory entries too
    manifest["files"], manifest["sha256"] = _file_records(partial)
    with replacing(partial / MANIFEST) as tmp:
        write_json(tmp, manifest)
    fsync_dir(partial)
    if final.exists():  # the same step saved again (a resumed run): replace it
        discard_state(final)
    os.replace(partial, final)
    fsync_dir(out_dir)
    for old in list_states(out_dir)[:-keep]:
        discard_state(old)
    fsync_dir(out_dir)


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
    _check_save_arguments(step, keep, data_position, extra)
    out_dir = Path(out_dir)
    rank, world = _rank_world()
    sharded = _is_sharded(model)
    tree, model_tensors, optim_tensors = _encode_state(model, optimizer, scheduler, weights)
    final = out_dir / f"{STATE_PREFIX}{step:08d}"
    partial = out_dir / f"{PARTIAL_PREFIX}{final.name}"
    if rank == 0:
        _make_partial(out_dir, partial, final, step)
    _barrier()
    _write_parts(partial, tree, model_tensors, optim_tensors, sharded, rank, on_file_written or (lambda path: None))
    _barrier()
    if rank == 0:
        _commit(out_dir, partial, final, keep=keep, manifest={
            "format": STATE_FORMAT, "step": step, "data_position": data_position, "extra": extra or {},
            "sharded": sharded, "world_size": world, "weights": weights, "torch": torch.__version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
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
    """Load a state into ``model`` / ``optimizer`` / ``scheduler`` (built as the saving run built them) and,
    with ``restore_rng``, this rank's RNG states. Returns the step, data position and extra metadata.
    Collective under torch.distributed.

    ``path`` is one state directory (``state-XXXXXXXX``) or the run's directory holding them. Every file is
    checked against its recorded checksum before anything is loaded: a damaged state given by name is refused
    (``TrainingStateError`` naming the file, and the newest intact state beside it); from a run's directory
    the newest intact state is loaded, with one warning per newer damaged state passed over."""
    path, manifest, skipped = _choose_state(Path(path))
    state = _load_verified(path, manifest, model, optimizer, scheduler, restore_rng)
    state.skipped = skipped
    return state


def _choose_state(path: Path) -> tuple[Path, dict, list[tuple[Path, str]]]:
    """(the state to load, its verified manifest, the damaged newer states passed over) for ``path``."""
    if not (path / MANIFEST).exists() and not path.name.startswith(STATE_PREFIX) and path.is_dir():
        chosen, damaged = newest_intact_state(path)
        if chosen is None:
            reasons = "; ".join(why for _, why in damaged)
            raise TrainingStateError(f"{path}: no intact training state to load" +
                                     (f" ({len(damaged)} damaged: {reasons})." if damaged else
                                      " (none saved there; a run writes them with save_training_state)."))
        for bad, why in damaged:
            warnings.warn(f"training state {bad.name} is damaged ({why.removeprefix(str(bad) + ': ')}); falling "
                          f"back to {chosen.name}.", stacklevel=3)
        return chosen, verify_state(chosen), damaged
    try:
        return path, verify_state(path), []
    except (OSError, ValueError) as e:
        older, _ = newest_intact_state(path.parent)
        hint = (f" The newest intact state in {path.parent} is {older.name}; load that one (or pass the run's "
                "directory to load the newest intact state)." if older is not None and older != path else
                f" No other intact state is in {path.parent}.")
        raise type(e)(f"{e}{hint}") from None


def _load_verified(path: Path, manifest: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: Any, restore_rng: bool) -> TrainingState:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

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
