"""The per-step log of a training run (one JSON object a line, each with its ``step``), resumable.

A fresh run (``resumed_step`` 0, or no log yet) starts the file anew. A resumed run keeps the lines up to
the step it resumed from and drops the rest: they are the lost part of the interrupted run (a line cut
short by the crash included); the kept part is rewritten atomically, then new lines are appended.
Shared by scripts/train.py and scripts/bpo.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from r4b_weights.atomic_file import write_file_atomic


def open_step_log(path: str | Path, resumed_step: int) -> TextIO:
    """``path`` opened for this run's lines (see the module docstring); the caller closes it."""
    path = Path(path)
    if resumed_step == 0 or not path.exists():
        return open(path, "w")
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # a line cut short by the crash
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= resumed_step:
            kept.append(line + "\n")
    write_file_atomic(path, "".join(kept).encode())
    return open(path, "a")
