"""Replacing one file atomically, with a temporary name a later run can recognise and clean up.

Every single-file write r4b makes where an interruption must not leave half a file (an attention-map PNG,
an eval summary / plot / run settings / manifest, a LoRA adapter, a training state's manifest, a resumed
step log) goes through ``replacing(path)``:

    with replacing(path) as tmp:      # tmp = path.parent / ".<name>.r4b-<pid>-<random>.tmp", created empty
        write the whole file at tmp   # by name (safetensors, PIL) or by opening it
    # on success: fsync'd, given the umask's mode (mkstemp made it 0600), renamed over ``path``
    # on any exception (Ctrl-C included): tmp removed, ``path`` untouched

``write_file_atomic(path, data)`` is the same for bytes in memory.

A process killed with SIGKILL (or a power loss) runs no clean-up and leaves its temporary file behind. Its
name carries the writer's pid, so the next write of the same destination removes the temporaries whose
process is gone (``remove_stale_temps``). Only names of r4b's own pattern for that destination are
considered, only plain files (never a symlink or a directory), and never one whose pid is alive (a write
still running, or a pid we cannot ask about). This module imports nothing from r4b but its sibling.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from r4b_weights.output_dir import give_usual_mode, process_alive

TEMP_MARK = ".r4b-"  # temporaries are named ``.<name>.r4b-<pid>-<random>.tmp``
TEMP_SUFFIX = ".tmp"


def _temp_pid(name: str, destination: str) -> int | None:
    """The writer's pid when ``name`` is r4b's temporary for ``destination`` (a file name), else None."""
    match = re.fullmatch(re.escape(f".{destination}{TEMP_MARK}") + r"(\d+)-[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX),
                         name)
    return int(match.group(1)) if match else None


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temporaries that killed writes of ``path`` left (see the module docstring); returns them."""
    path = Path(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        pid = _temp_pid(entry.name, path.name)
        if pid is None or process_alive(pid):
            continue
        try:
            if entry.is_symlink() or not entry.is_file():
                continue
            entry.unlink()
            removed.append(entry)
        except OSError:
            continue
    return removed


def fsync_file(path: Path) -> None:
    """Persist a file's contents (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write whole; renamed over ``path`` when the block ends without an
    exception, removed otherwise (module docstring). The parent directory must exist."""
    path = Path(path)
    remove_stale_temps(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}{os.getpid()}-", suffix=TEMP_SUFFIX,
                                dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        give_usual_mode(tmp)  # mkstemp (and safetensors) create 0600: the file gets the umask's usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; else what the interrupted write left


def write_file_atomic(path: str | Path, data: bytes) -> Path:
    """``data`` as the whole content of ``path``, atomically (``replacing``); returns ``path``."""
    path = Path(path)
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return path
