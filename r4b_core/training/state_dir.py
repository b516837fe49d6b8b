"""The directory protocol of training states (``state.py`` saves and loads them): names, the owner marker,
the manifest and its checksums; finding, verifying and removing states. No tensors are read here.

    read_manifest(state)         the manifest, every listed file present with its recorded size (cheap)
    verify_state(state)          the same, plus every file's SHA-256 against the recorded one
    list_states(out) / latest_state(out)    complete states by size, oldest first / the newest
    newest_intact_state(out)     (newest state passing verify_state, [(newer damaged state, why), ...])
    remove_partial_states(out) / discard_states(out)   r4b's own leftovers / every state r4b wrote there
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from r4b_core.training.state_io import TrainingStateError, read_json

STATE_FORMAT = "r4b-training-state-1"
STATE_PREFIX = "state-"
PARTIAL_PREFIX = ".r4b-partial-"
OWNER_MARK = ".r4b-training-state"
MANIFEST = "manifest.json"
TREE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
SHARDED_DIR = "sharded"


# ---------------------------------------------------------------------------------------------
# finding states


def is_ours(directory: Path) -> bool:
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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_state(path: str | Path) -> dict:
    """``read_manifest`` plus every file checked against the SHA-256 its manifest records; returns the
    manifest. ``TrainingStateError`` names the first file that differs (a flipped byte keeps the size)."""
    path = Path(path)
    manifest = read_manifest(path)
    checksums = manifest.get("sha256")
    if not isinstance(checksums, dict) or set(checksums) != set(manifest["files"]):
        raise TrainingStateError(f"{path}: the manifest records no checksums for its files, so the state cannot be "
                                 "verified (saved by an older r4b, or the manifest was edited); it is not used.")
    for name in sorted(manifest["files"]):
        actual = sha256_of(path / name)
        if actual != checksums[name]:
            raise TrainingStateError(f"{path}: {name} does not match its recorded checksum (sha256 {actual[:12]}..., "
                                     f"recorded {str(checksums[name])[:12]}...); the state is damaged.")
    return manifest


def _state_dirs_newest_first(out_dir: Path) -> list[Path]:
    """Every ``state-<step>`` directory in ``out_dir``, complete or not, highest step first."""
    found = []
    for d in out_dir.iterdir() if out_dir.is_dir() else []:
        number = d.name[len(STATE_PREFIX):]
        if d.name.startswith(STATE_PREFIX) and number.isdigit() and d.is_dir():
            found.append((int(number), d))
    return [d for _, d in sorted(found, reverse=True)]


def newest_intact_state(out_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest state in ``out_dir`` whose files all match their checksums or None, the newer states that
    are damaged, each with the reason). Reads every file of each state it checks."""
    damaged = []
    for d in _state_dirs_newest_first(Path(out_dir)):
        try:
            verify_state(d)
        except (OSError, ValueError) as e:
            damaged.append((d, str(e)))
            continue
        return d, damaged
    return None, damaged


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
        if is_ours(d):
            shutil.rmtree(d)
        elif not any(d.iterdir()):
            d.rmdir()
        else:
            continue
        removed.append(d)
    return removed


def discard_states(out_dir: str | Path) -> list[Path]:
    """Delete every training state r4b wrote in ``out_dir`` (directories ``state-*`` carrying its marker) and
    its partial directories: for a run told to start over there. Returns what was removed."""
    out_dir = Path(out_dir)
    removed = remove_partial_states(out_dir)
    for d in _state_dirs_newest_first(out_dir):
        if is_ours(d) and not d.is_symlink():
            discard_state(d)
            removed.append(d)
    return removed


def discard_state(state_dir: Path) -> None:
    """Remove a complete state: rename it to a partial name first, so a crash mid-delete never leaves a
    directory that looks like a state."""
    trash = state_dir.with_name(f"{PARTIAL_PREFIX}deleting-{state_dir.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(state_dir, trash)
    shutil.rmtree(trash)
