"""A killed single-file write leaves no hidden temporary for ever (issue 21, round 4 item 1).

Replay of the finding: an attention-map PNG or an eval summary killed mid-write (SIGKILL: no clean-up runs)
left ``.NAME.<random>.tmp`` beside the output, and no later run removed it (mkstemp names carry no pid, so
nothing could tell a dead writer's file from a live one's). Now every atomic file write goes through
r4b_weights/atomic_file.py: temporaries are named ``.NAME.r4b-<pid>-<random>.tmp`` and the next write of the
same destination removes those whose process is gone; a live writer's temporary, r4b's temporary for
another destination and any other name are kept.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from r4b_core.eval.output import EvalOutput
from r4b_core.interp.attention_map import save_png
from r4b_core.training.step_log import open_step_log


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=30)
    return process.pid


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def _leftovers(directory: Path, name: str) -> dict[str, Path]:
    """A stale temporary of a dead writer (must go) and three files that must stay: a live writer's (this
    process), r4b's temporary for another destination, and a name of another pattern (mkstemp's old one)."""
    dead = _dead_pid()
    files = {
        "stale": directory / f".{name}.r4b-{dead}-k1ll3d.tmp",
        "live": directory / f".{name}.r4b-{os.getpid()}-runn1ng.tmp",
        "other destination": directory / f".other-{name}.r4b-{dead}-k1ll3d.tmp",
        "foreign": directory / f".{name}.q8z1x0.tmp",
    }
    for path in files.values():
        path.write_bytes(b"half a file")
    return files


def _assert_only_the_stale_one_went(files: dict[str, Path]) -> None:
    assert not files["stale"].exists(), "the dead writer's temporary was not removed"
    for kept in ("live", "other destination", "foreign"):
        assert files[kept].read_bytes() == b"half a file", f"the {kept} file was touched"


def test_an_attention_map_png_removes_a_killed_write_s_temporary(tmp_path):
    files = _leftovers(tmp_path, "map.png")
    save_png(Image.new("RGBA", (4, 4)), tmp_path / "map.png")
    _assert_only_the_stale_one_went(files)
    assert Image.open(tmp_path / "map.png").size == (4, 4)


def test_an_eval_output_removes_a_killed_write_s_temporary(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    output = EvalOutput(out, {"model": "m"})  # a fresh r4b output: the leftovers below come after it
    files = _leftovers(out, "summary.json")
    output.write_summary({"accuracy": 1.0})
    output.close()
    _assert_only_the_stale_one_went(files)
    assert EvalOutput(out, {"model": "m"}).records == []  # the temporaries left do not block a rerun


def test_a_resumed_step_log_removes_a_killed_rewrite_s_temporary(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n')
    files = _leftovers(tmp_path, "log.jsonl")
    open_step_log(log, resumed_step=1).close()
    _assert_only_the_stale_one_went(files)
    assert log.read_text() == '{"step": 1}\n'


def test_an_interrupted_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    from r4b_weights.atomic_file import replacing

    path = tmp_path / "summary.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with replacing(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert _temps(tmp_path) == []


def test_a_real_sigkill_mid_write_is_cleaned_by_the_next_write(tmp_path):
    """The replay itself: a writer SIGKILLed inside ``replacing`` (after its temporary exists), then one write."""
    from r4b_weights.atomic_file import write_file_atomic

    path = tmp_path / "summary.json"
    path.write_text("old")
    writer = ("import sys, time\nfrom r4b_weights.atomic_file import replacing\n"
              "with replacing(sys.argv[1]) as tmp:\n    tmp.write_text('half'); print('writing', flush=True); "
              "time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        left = _temps(tmp_path)
        assert left == [p for p in left if f".r4b-{process.pid}-" in p] and len(left) == 1  # named for its writer
        process.kill()
    finally:
        process.wait(timeout=30)
    assert path.read_text() == "old"
    deadline = time.monotonic() + 5
    while _temps(tmp_path) and time.monotonic() < deadline:
        write_file_atomic(path, b"new")  # the first write after the kill removes it (once the pid is gone)
    assert path.read_text() == "new"
    assert _temps(tmp_path) == []
