"""A real Ctrl-C during the work of `r4b eval`, `r4b bench` and scripts/train.py (issue 21: "Ctrl-C at any time
exits 130 without a traceback"; round 4 item 2).

Each replay starts the real command in a fresh process, waits for a line that proves the work itself is under
way (an eval mode finished, a decode round started, a training step done), sends SIGINT, and checks: exit
status 130, no traceback, the command's one "interrupted" line last, and nothing half-done in the user's view:
an earlier run's output is what it was (eval's summary and plot, train.py's exported checkpoint), the files
kept are whole (eval's predictions are valid JSON Lines; every training state left verifies), and bench
prints no partial table. Slow: each starts torch and loads a model in a new process (several seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "scripts" / "train.py"

pytestmark = pytest.mark.slow


def interrupt_when(command: list[str], started: Callable[[str], bool], *, timeout_s: float = 120.0,
                   env: dict | None = None) -> tuple[int, list[str]]:
    """Run ``python command`` (stdout and stderr together), send SIGINT after the first line ``started``
    accepts; returns (exit status, every line). Fails when the command ends before that line."""
    process = subprocess.Popen([sys.executable, *command], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, **(env or {})})
    lines, sent = [], False
    end = time.monotonic() + timeout_s
    try:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if not sent and started(line):
                process.send_signal(signal.SIGINT)
                sent = True
            assert time.monotonic() < end, "timed out:\n" + "\n".join(lines)
        status = process.wait(timeout=max(1.0, end - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert sent, "the work never started (no line to interrupt at):\n" + "\n".join(lines)
    return status, lines


def assert_interrupted(status: int, lines: list[str], last_line: str) -> None:
    text = "\n".join(lines)
    assert status == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert lines and lines[-1].strip() == last_line, text


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def write_items(path: Path, rows: int) -> Path:
    lines = [json.dumps({"id": str(i), "question": f"What is {i} + {i}?", "answer": str(2 * i)}) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_ctrl_c_in_r4b_eval_keeps_the_earlier_summary_and_whole_predictions(tiny_checkpoint, tmp_path):
    data, out = write_items(tmp_path / "items.jsonl", 6), tmp_path / "out"
    common = ["-m", "r4b_core.cli", "eval", "--model", str(tiny_checkpoint), "--data", str(data), "--out", str(out),
              "--max-new-tokens", "48", "--max-batch-size", "1"]
    earlier = subprocess.run([sys.executable, *common, "--limit", "1", "--thinking-mode", "short"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert earlier.returncode == 0, earlier.stderr
    before = digests(out)
    assert {"summary.json", "accuracy_vs_tokens.png"} <= before.keys()
    # all three modes on six items: the first mode's last progress line comes while the second mode runs
    status, lines = interrupt_when([*common, "--thinking-mode", "all"], lambda line: "6/6 items" in line)
    assert_interrupted(status, lines, "r4b: interrupted")
    assert "r4b eval: interrupted;" in lines[-2], "\n".join(lines)  # how many answers are kept, and how to resume
    after = digests(out)
    for name in ("summary.json", "accuracy_vs_tokens.png", "run.json"):
        assert after[name] == before[name], f"{name} of the earlier run was replaced by the interrupted one"
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]  # whole lines
    assert 1 + 6 <= len(records) < 1 + 3 * 6  # the earlier answer, a finished mode, and not all the rest
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def test_ctrl_c_in_r4b_bench_prints_no_partial_result(tmp_path):
    status, lines = interrupt_when(
        ["-m", "r4b_core.cli", "bench", "--preset", "tiny", "--max-new-tokens", "4", "--repeats", "1", "--no-compile",
         "--no-transformers", "--no-load", "--json"], lambda line: line.startswith("decode round 1"),
        env={"R4B_CACHE": str(tmp_path / "cache")})
    assert_interrupted(status, lines, "r4b: interrupted")
    assert not any(line.lstrip().startswith("{") for line in lines), "a partial JSON result was printed"


def test_ctrl_c_in_train_py_keeps_the_earlier_export_and_intact_states(tiny_checkpoint, tmp_path):
    from r4b_core.training.state import list_states, verify_state

    out = tmp_path / "run"
    common = [str(TRAIN), "--checkpoint", str(tiny_checkpoint), "--batch-size", "2", "--eval-examples", "0",
              "--image-size", "28", "--out", str(out)]
    earlier = subprocess.run([sys.executable, *common, "--steps", "2"], cwd=REPO, capture_output=True, text=True,
                             timeout=180)
    assert earlier.returncode == 0, earlier.stdout + earlier.stderr
    before = digests(out)
    assert "model.safetensors" in before
    # a second run told to replace the first (--force), with states every step: interrupted in its third step
    status, lines = interrupt_when([*common, "--steps", "500", "--save-every", "1", "--force"],
                                   lambda line: line.startswith("step    2/500"))
    assert_interrupted(status, lines, "train.py: interrupted")
    after = digests(out)
    for name, digest in before.items():
        assert after.get(name) == digest, f"{name} of the earlier run was replaced by the interrupted one"
    states = list_states(out)
    assert states, "the interrupted run kept no training state"
    for state in states:
        verify_state(state)  # raises when a state left in view is damaged


def test_ctrl_c_in_bpo_py_during_annealing(tiny_checkpoint, tmp_path):
    """bpo.py had no Ctrl-C handling at all (a KeyboardInterrupt traceback); now scripts/ctrl_c.py's one line."""
    out = tmp_path / "bpo"
    status, lines = interrupt_when([str(REPO / "scripts" / "bpo.py"), "--checkpoint", str(tiny_checkpoint), "--out",
                                    str(out), "--anneal-steps", "500", "--anneal-batch", "2", "--eval-prompts", "2",
                                    "--no-plot"], lambda line: line.startswith("anneal    1/500"))
    assert_interrupted(status, lines, "bpo.py: interrupted")
    assert not (out / "annealed").exists()  # the annealed checkpoint is written only when annealing is done
