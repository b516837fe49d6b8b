"""Progress of an eval run on stderr: a redrawn bar on a terminal, plain lines elsewhere (logs, CI)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``update()`` once per finished job; ``close()`` ends the line. Shows done/total, items/s and ETA."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, every_s: float = 10.0) -> None:
        self.total, self.label, self.done = total, label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = self.last_line = time.monotonic()
        self.every_s = every_s

    def _text(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        eta_text = "-" if eta is None else f"{eta:.0f}s"
        return f"{self.label}: {self.done}/{self.total} items  {rate:.2f} items/s  ETA {eta_text}"

    def update(self, count: int = 1) -> None:
        self.done += count
        if self.tty:
            width = 24
            filled = int(width * self.done / self.total) if self.total else width
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self._text()}   ")
            self.stream.flush()
        elif time.monotonic() - self.last_line >= self.every_s or self.done == self.total:
            self.last_line = time.monotonic()
            print(self._text(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
