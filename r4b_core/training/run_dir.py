"""Where a training run writes: the checks on its output directory, made before anything loads.

    latest = check_run_dir(out, resume=False, force=False)   # None: a fresh run may write into ``out``
    latest = check_run_dir(out, resume=True)                  # the newest intact training state to resume
    check_export(out, source)                                 # the final export will be accepted there

A fresh run writes only into a new or empty directory, unless told (``force``: start over there; r4b's own
earlier checkpoint and training states are replaced, files it did not write are kept). A directory that
holds an earlier run's checkpoint, training states, or anyone else's files is refused with what it holds;
a path that is a file is refused at once. ``resume`` picks the newest state whose files match their
checksums (``newest_intact_state``) and says, through ``say``, which newer ones are damaged and which it
falls back to; with none intact it refuses and says why. Errors are ``SystemExit`` with one line (these
checks serve command-line scripts: scripts/train.py, scripts/bpo.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from r4b_core.training.state import STATE_PREFIX, newest_intact_state
from r4b_weights.output_dir import MANIFEST_NAME, read_manifest as read_export_manifest, check_output_path


def describe_run_dir(out: Path) -> str:
    """What a run directory holds, in words: an earlier run's checkpoint, training states, other files."""
    entries = sorted(p.name for p in out.iterdir())
    exported = read_export_manifest(out)
    states = [e for e in entries if e.startswith(STATE_PREFIX)]
    others = [e for e in entries if e not in exported and e not in states and e not in (MANIFEST_NAME, "lora")
              and not e.startswith(".r4b-partial-")]
    parts = []
    if MANIFEST_NAME in entries:
        parts.append(f"an earlier run's checkpoint ({', '.join(sorted(exported)[:3])})")
    if states:
        parts.append(f"training states ({', '.join(states[-2:])})")
    if others:
        parts.append(f"files r4b did not write ({', '.join(others[:4])}{' ...' if len(others) > 4 else ''})")
    return " and ".join(parts) or ", ".join(entries[:4])


def check_run_dir(out: str | Path, *, resume: bool = False, force: bool = False,
                  say: Callable[[str], None] = print) -> Path | None:
    """Check ``--out`` (see the module docstring); returns the state to resume from, or None for a fresh run."""
    out = Path(out)
    if resume and force:
        raise SystemExit("--resume continues the run in --out and --force starts over there; pass one of them.")
    try:
        check_output_path(out, "--out")
    except FileExistsError as e:
        raise SystemExit(str(e)) from None
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file; a training run writes a directory there (the fine-tuned "
                         "checkpoint and training states). Choose another --out.")
    if not resume:
        if out.is_dir() and any(out.iterdir()) and not force:
            raise SystemExit(f"--out {out} already holds {describe_run_dir(out)}; pass --resume to continue that "
                             "run, --force to start over there (r4b's earlier checkpoint and training states are "
                             "replaced, files it did not write are kept), or choose another --out.")
        return None
    latest, damaged = newest_intact_state(out)
    for path, why in damaged:
        say(f"--resume: {path.name} is damaged ({why.removeprefix(str(path) + ': ')}); "
            f"{'falling back to ' + latest.name if latest else 'no older state is intact'}")
    if latest is None and damaged:
        raise SystemExit(f"--resume: no intact training state in {out}: every one is damaged "
                         f"({', '.join(p.name for p, _ in damaged)}, reasons above). Start again with --force "
                         "(or another --out).")
    if latest is None:
        raise SystemExit(f"--resume: no complete training state in {out} (a run writes them with --save-every N).")
    return latest


def check_export(out: str | Path, source: str) -> None:
    """Before the first step: the export at the end will be accepted by ``out``, which by then holds this
    run's training states (so it is written with force): a file r4b did not write that would be read with
    the checkpoint, such as a foreign weight file or chat template, is refused now rather than after training."""
    from r4b_weights.export import check_export_target
    from r4b_weights.hub import resolve_checkpoint

    try:
        check_export_target(out, source_dir=resolve_checkpoint(source), force=True)
    except FileExistsError as e:
        raise SystemExit(f"--out: {e}") from None
