"""Writing a directory of files for the user (a synthetic checkpoint, an export) without ever destroying theirs.

Used by ``r4b_core.reference.synthetic`` (make-synthetic) and ``r4b_weights.export`` (save_hf_checkpoint); it imports
nothing from r4b, so that the weights layer can use it.

    write_directory(target, fill, force=False, keeps_out=..., reuse_own=False)
      1. checks first, before any expensive work:
         - ``target`` (or its nearest existing folder) is a symlink to nothing, or a folder on the way is a
           file                                                   -> FileExistsError naming it (a symlink to
           a directory is followed: the output goes into that directory)
         - ``target`` is a file                                   -> FileExistsError naming it
         - ``target`` holds anything and not ``force``            -> FileExistsError naming what it holds
           (with ``reuse_own``, a directory holding only files its manifest lists, i.e. an earlier r4b
           output, is accepted as if ``force`` were given)
         - ``force``, and ``target`` holds files r4b did not write (not in its manifest) that ``keeps_out``
           names (files a reader would take together with the new ones, e.g. a stale chat_template.jinja or
           a weight shard)                                         -> FileExistsError naming them
      2. ``fill(staging)`` writes every file into a fresh temporary directory beside ``target`` (same file
         system), plus the manifest ``.r4b-manifest.json`` listing them. A crash, Ctrl-C or a full disk here
         leaves ``target`` untouched and the temporary directory removed; one a killed process left
         (SIGKILL: no clean-up ran) is removed by the next write of ``target`` (``remove_stale_staging``).
      3. commit: a new or empty ``target`` is replaced by the finished directory in one rename (readers see
         the old state or the whole new one). With ``force`` over an earlier output the files are renamed in
         one at a time (a stale shard index removed first), then r4b's own earlier files that the new output
         does not contain are deleted; files r4b did not write are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

MANIFEST_NAME = ".r4b-manifest.json"


def _names(entries: list[str], limit: int = 6) -> str:
    shown = ", ".join(sorted(entries)[:limit])
    return shown + (f" ... and {len(entries) - limit} more" if len(entries) > limit else "")


def read_manifest(directory: Path) -> set[str]:
    """The files r4b wrote into ``directory`` (empty when it has no readable manifest)."""
    try:
        data = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = data.get("files", []) if isinstance(data, dict) else []
        return {f for f in files if isinstance(f, str) and "/" not in f and f not in ("", ".", "..")}
    except (OSError, ValueError):
        return set()


def check_output_path(path: Path, name: str | None = None) -> None:
    """``FileExistsError`` before any work when nothing can be written at ``path``: it, or the nearest of its
    folders that exists, is a symlink to nothing (r4b neither writes through it, where would the output go?,
    nor replaces the user's link), or a folder on the way is a file. ``name`` (e.g. "--out") starts the message."""
    label = f"{name} {path}" if name else str(path)
    for where in (path, *path.parents):
        if where.is_symlink() and not where.exists():
            it = "it" if where == path else f"its folder {where}"
            raise FileExistsError(f"{label}: {it} is a symlink to {os.readlink(where)}, which does not exist; r4b "
                                  "does not write through it or replace it. Create what it points to (a directory), "
                                  "or choose another path.")
        if where.exists():
            if where != path and not where.is_dir():
                raise FileExistsError(f"{label}: {where} is a file, so nothing can be written under it; choose "
                                      "another path.")
            return


def check_target(target: Path, force: bool, keeps_out: Callable[[str], bool], what: str, *,
                 reuse_own: bool = False) -> None:
    """Step 1 of ``write_directory`` alone (see the module docstring); ``what`` names the output in messages."""
    check_output_path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is a file, not a directory; {what} is a directory of files. "
                              "Choose a new path (or move the file away).")
    if not target.is_dir():
        return
    entries = [p.name for p in target.iterdir()]
    if not entries:
        return
    ours = read_manifest(target)
    if reuse_own and MANIFEST_NAME in entries and all(name in ours or name == MANIFEST_NAME for name in entries):
        force = True  # an earlier r4b output and nothing else: replacing it is what the caller asked for
    if not force and ours:
        raise FileExistsError(
            f"{target} holds an earlier r4b output ({_names(entries)}); r4b does not replace it unless told: pass "
            "--force (force=True) to replace the files r4b wrote there (files it did not write are kept, never "
            "deleted), or choose another directory."
        )
    if not force:
        raise FileExistsError(
            f"{target} is not empty (it holds {_names(entries)}); r4b writes {what} only into a new or empty "
            "directory. Choose another, or pass --force (force=True) to replace the files r4b wrote there "
            "(files it did not write are kept, never deleted)."
        )
    blocking = [name for name in entries if name not in ours and name != MANIFEST_NAME and keeps_out(name)]
    if blocking:
        raise FileExistsError(
            f"{target} holds {_names(blocking)}, which r4b did not write and which would be read together with "
            f"{what} (e.g. a chat template or weight file winning over the new ones). r4b never deletes files it "
            "did not write: move them away, or choose another directory."
        )


def current_umask() -> int:
    """This process's umask, read without changing it where the kernel shows it (/proc/self/status);
    elsewhere by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def give_usual_mode(path: str | Path) -> None:
    """Give a file (0666) or directory (0777) the mode the umask allows: for what ``mkstemp`` / ``mkdtemp``
    or safetensors created private (0600 / 0700) and is then renamed into the user's view."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())


STAGING_MARK = ".r4b-tmp-"  # staging directories are named ``.<target>.r4b-tmp-<pid>-<random>``


def _staging_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_MARK}{os.getpid()}-", dir=target.parent))
    give_usual_mode(staging)  # mkdtemp makes 0700; the output gets a directory's usual mode
    return staging


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be running (it exists, or we may not ask): the owner of a temporary name."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or a pid we cannot ask about): assume it is alive
    return True


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove the staging directories an earlier write of ``target`` left when it was killed (SIGKILL, power
    loss: no ``finally`` ran). Only directories named ``.<target>.r4b-tmp-<pid>-*`` whose process is gone
    and that hold nothing but plain files (r4b's staging is flat) are removed; one of a live process (a
    write still running) is kept. Returns what was removed."""
    removed = []
    if not target.parent.is_dir():
        return removed
    prefix = f".{target.name}{STAGING_MARK}"
    for d in target.parent.iterdir():
        pid_text = d.name[len(prefix):].split("-", 1)[0] if d.name.startswith(prefix) else ""
        if not pid_text.isdigit() or process_alive(int(pid_text)):
            continue
        try:
            if d.is_symlink() or not d.is_dir() or not all(f.is_file() and not f.is_symlink() for f in d.iterdir()):
                continue
            shutil.rmtree(d)
            removed.append(d)
        except OSError:
            continue
    return removed
def write_directory(target: str | Path, fill: Callable[[Path], None], *, force: bool = False,
                    keeps_out: Callable[[str], bool] = lambda name: False, what: str = "the output",
                    reuse_own: bool = False) -> Path:
    """Write a directory with ``fill(staging_dir)``, safely (see the module docstring); returns ``target``."""
    target = Path(target).expanduser()
    check_target(target, force, keeps_out, what, reuse_own=reuse_own)
    if target.is_symlink():  # a link to a directory: write into that directory (staged beside it, same file system)
        target = target.resolve()
    staging = _staging_dir(target)
    try:
        fill(staging)
        # a flat directory of files; a manifest that ``fill`` left (a nested r4b write) is replaced by this one
        written = sorted(p.name for p in staging.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
        manifest = {"written_by": "r4b", "what": what, "files": written}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _commit(staging, target, set(written))
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after a successful directory rename; else the leftovers
    return target


def _commit(staging: Path, target: Path, written: set[str]) -> None:
    if not target.is_dir() or not any(target.iterdir()):
        if target.is_dir():
            os.chmod(staging, target.stat().st_mode & 0o7777)
        try:
            os.replace(staging, target)  # a new name, or over an empty directory: one atomic rename
        except OSError as e:
            if target.is_dir() and any(target.iterdir()):
                raise FileExistsError(f"{target} was filled by someone else while r4b wrote {staging.name}; "
                                      "nothing of theirs was changed.") from None
            raise OSError(e.errno, f"cannot move the finished output into place ({e.strerror})", str(target)) from None
        return
    # force over an earlier output: file by file, r4b's own stale files removed, the user's kept
    stale = read_manifest(target) - written
    order = sorted(written, key=lambda name: (name == "config.json", name))  # config.json last: readers start there
    for name in sorted(stale):
        if name.endswith(".index.json"):  # a stale shard index would win over a new single weight file
            (target / name).unlink(missing_ok=True)
    for name in order:
        os.replace(staging / name, target / name)
    for name in sorted(stale):
        path = target / name
        if path.is_file():
            path.unlink()
    os.replace(staging / MANIFEST_NAME, target / MANIFEST_NAME)
