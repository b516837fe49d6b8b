"""Ctrl-C in the training scripts (train.py, bpo.py): one line ``NAME: interrupted`` and exit status 130, never
a KeyboardInterrupt traceback, whether it lands during the start-up imports (seconds of torch) or the work.

    import ctrl_c                      # first, before torch: imports nothing heavy
    if __name__ == "__main__":
        ctrl_c.during_imports("bpo.py")
    ...
    if __name__ == "__main__":
        ctrl_c.run("bpo.py", main, parse_args())

A state being written when the Ctrl-C lands is left as a partial one, which the next run removes
(r4b_core/training/state.py); a half-written file is a temporary the next write removes (r4b_weights/atomic_file.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

INTERRUPTED_STATUS = 130  # Ctrl-C: the shell's status for SIGINT


def during_imports(name: str) -> None:
    """A Ctrl-C before ``run`` starts (during the imports) is one line and status 130."""
    def hook(kind, error, trace) -> None:
        if issubclass(kind, KeyboardInterrupt):
            print(f"{name}: interrupted", file=sys.stderr, flush=True)
            os._exit(INTERRUPTED_STATUS)  # nothing is written yet; the interpreter may be half way through an import
        sys.__excepthook__(kind, error, trace)

    sys.excepthook = hook


def run(name: str, main: Callable[..., Any], *args: Any) -> None:
    """``main(*args)``; a Ctrl-C during it is one line and status 130."""
    try:
        main(*args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_STATUS)
