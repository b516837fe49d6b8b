"""``--out DIR``: the predictions file (appended one line at a time), the summary, the plot, the run settings.

    DIR/predictions.jsonl   one JSON object per (item, mode), appended with one write() each and fsync'd
    DIR/run.json            the settings the predictions were made with (a rerun must match them)
    DIR/summary.json        the report (report.summarize), rewritten atomically at the end
    DIR/accuracy_vs_tokens.png
    DIR/.r4b-manifest.json  the files r4b wrote here (r4b_weights/output_dir.py's convention)

A directory holding files r4b did not write is refused unless ``force`` (and even then r4b writes only its
own file names, never over a file it did not write). A rerun into the same directory reads the
predictions back and skips every (item, mode) already there; a killed run can leave at most a partial
last line (no newline), which is cut off on reopening, so the file is always valid JSON Lines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from r4b_weights.atomic_file import write_file_atomic
from r4b_weights.output_dir import MANIFEST_NAME, read_manifest, check_output_path

PREDICTIONS = "predictions.jsonl"
RUN = "run.json"
SUMMARY = "summary.json"
PLOT = "accuracy_vs_tokens.png"
OWN_FILES = (PREDICTIONS, RUN, SUMMARY, PLOT)


class EvalOutput:
    """An eval output directory, opened for appending; see the module docstring."""

    def __init__(self, directory: str | Path, settings: dict[str, Any], *, force: bool = False) -> None:
        self.directory = Path(directory).expanduser()
        check_output_path(self.directory, "--out")
        if self.directory.exists() and not self.directory.is_dir():
            raise FileExistsError(f"--out {self.directory}: is a file; give a directory for the eval output.")
        self.directory.mkdir(parents=True, exist_ok=True)
        ours = read_manifest(self.directory)
        foreign = sorted(p.name for p in self.directory.iterdir() if p.name not in ours and p.name != MANIFEST_NAME
                         and not (p.name.startswith(".") and p.name.endswith(".tmp")))  # ours, mid-write
        clashing = [name for name in foreign if name in OWN_FILES]
        if clashing:
            raise FileExistsError(f"--out {self.directory}: holds {', '.join(clashing)}, which r4b did not write; r4b "
                                  "never writes over it (not even with --force). Choose another directory.")
        if foreign and not force:
            raise FileExistsError(f"--out {self.directory}: holds files r4b did not write ({', '.join(foreign[:6])}"
                                  f"{' ...' if len(foreign) > 6 else ''}); choose a new or empty directory, or pass "
                                  "--force to write r4b's files beside them (they are never touched).")
        self._check_settings(settings)
        self._record_own(RUN)
        write_file_atomic(self.directory / RUN, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())
        self._record_own(PREDICTIONS)
        self.records = self._read_predictions()
        self.done = {(r["id"], r["mode"]) for r in self.records}
        self._fd = os.open(self.directory / PREDICTIONS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def _check_settings(self, settings: dict[str, Any]) -> None:
        path = self.directory / RUN
        if RUN not in read_manifest(self.directory) or not path.is_file():
            return
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return
        changed = sorted(k for k in set(earlier) | set(settings) if earlier.get(k) != settings.get(k))
        if changed:
            shown = "; ".join(f"{k}: {earlier.get(k)!r} -> {settings.get(k)!r}" for k in changed[:4])
            raise ValueError(f"--out {self.directory}: its predictions were made with other settings ({shown}); "
                             "resuming would mix them. Use another --out directory (or the same settings).")

    def _record_own(self, name: str) -> None:
        """Add ``name`` to the manifest before the file is created (so a crash never leaves an unlisted file)."""
        ours = read_manifest(self.directory)
        if name in ours:
            return
        manifest = {"written_by": "r4b", "what": "an r4b eval output", "files": sorted(ours | {name})}
        write_file_atomic(self.directory / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())

    def _read_predictions(self) -> list[dict[str, Any]]:
        path = self.directory / PREDICTIONS
        if not path.is_file():
            return []
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]  # a killed write leaves at most a partial last line
        if len(complete) != len(data):
            with path.open("r+b") as f:
                f.truncate(len(complete))
        records = []
        for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    raise ValueError(f"{path}: line {number} is not valid JSON; the file was edited by hand? "
                                     "Fix or remove that line, or use another --out directory.") from None
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Append one prediction: one write() of one line, then fsync (a kill never leaves half a record)."""
        line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        os.write(self._fd, line)
        os.fsync(self._fd)
        self.records.append(record)
        self.done.add((record["id"], record["mode"]))

    def write_summary(self, summary: dict[str, Any]) -> Path:
        self._record_own(SUMMARY)
        path = self.directory / SUMMARY
        write_file_atomic(path, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
        return path

    def write_plot(self, png: bytes) -> Path:
        self._record_own(PLOT)
        path = self.directory / PLOT
        write_file_atomic(path, png)
        return path

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
