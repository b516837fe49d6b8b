"""Crash tests for scripts/train.py: SIGKILL a run during a save and at random points, resume it, and check
that the losses after the resume are exactly those of the uninterrupted run (CPU, fp32, deterministic).

How a kill lands inside a save: ``R4B_TRAIN_PAUSE_IN_SAVE=STEP:SECONDS`` makes the script sleep after each
file it writes in the save at STEP; the test waits until the save's partial directory holds a file, then
kills the whole process group (torchrun and its workers too). The run killed inside its LAST save has
logged every step uninterrupted, so its log is the reference for the steps a resumed run repeats.

- one process: killed inside the last save -> the previous state is the newest complete one and the
  partial directory is ignored; a resumed run killed again at a random time; a third run finishes; the
  final log equals the uninterrupted one line for line, and the partial directories are gone;
- two processes, FSDP2 (gloo): killed inside a save of sharded state (dcp) -> the previous state loads
  (here, into a plain single-process model: dcp reshards) and the resumed run's losses and gradient norms
  equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r4b_core.training_state import PARTIAL_PREFIX, latest_state, list_states, read_manifest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
PAUSE_ENV = "R4B_TRAIN_PAUSE_IN_SAVE"  # scripts/train.py's crash-test hook
BASE = ["--preset", "tiny", "--eval-examples", "0", "--no-save"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], cache: Path, stdout: Path, pause: str | None = None) -> subprocess.Popen:
    """The script in its own process group (so a kill takes torchrun's workers too), output to a file."""
    env = {**os.environ, "R4B_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop(PAUSE_ENV, None)
    if pause:
        env[PAUSE_ENV] = pause
    with open(stdout, "w") as out:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def wait_for(condition, proc: subprocess.Popen, stdout: Path, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before {what}:\n{stdout.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            kill(proc)
            raise AssertionError(f"timed out waiting for {what}:\n{stdout.read_text()[-4000:]}")
        time.sleep(0.02)


def finish(proc: subprocess.Popen, stdout: Path, timeout: float = 300.0) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
    assert proc.returncode == 0, f"the run failed (status {proc.returncode}):\n{stdout.read_text()[-5000:]}"


def save_under_way(out: Path, step: int) -> bool:
    """Whether the partial directory of the save at ``step`` holds a written file besides r4b's marker."""
    try:
        return any(f.name != ".r4b-training-state" for f in (out / f"{PARTIAL_PREFIX}state-{step:08d}").iterdir())
    except FileNotFoundError:
        return False


def log_lines(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def kill_inside_last_save(args: list[str], out: Path, cache: Path, stdout: Path, last: int) -> None:
    proc = start(args, cache, stdout, pause=f"{last}:60")
    wait_for(lambda: save_under_way(out, last), proc, stdout, f"the save of step {last} to begin")
    kill(proc)


def kill_at_a_random_time(args: list[str], cache: Path, stdout: Path, rng: random.Random) -> str:
    """Resume, then SIGKILL at a random moment after the state is loaded (during a step, a save, or after
    the end). Returns where it landed, for messages."""
    proc = start(args, cache, stdout)
    wait_for(lambda: "resumed from" in stdout.read_text(), proc, stdout, "the resume")
    time.sleep(rng.uniform(0.0, 3.0))
    ended = proc.poll() is not None
    kill(proc)
    steps_done = sum(line.startswith("step ") for line in stdout.read_text().splitlines())
    return "after the end" if ended else f"after {steps_done} more step(s)"


def check_resume(stdout: Path, expected_start: int) -> None:
    text = stdout.read_text()
    assert f"(step {expected_start})" in text, text[-3000:]


def single_process_case(tmp_path: Path, seed: int, steps: int = 6, save_every: int = 2) -> None:
    cache, out, log = tmp_path / "cache", tmp_path / "out", tmp_path / "loss.jsonl"
    args = [str(TRAIN), *BASE, "--steps", str(steps), "--batch-size", "1", "--save-every", str(save_every),
            "--out", str(out), "--log-file", str(log)]
    rng = random.Random(seed)

    kill_inside_last_save(args, out, cache, tmp_path / "run1.txt", steps)
    uninterrupted = log_lines(log)
    assert [e["step"] for e in uninterrupted] == list(range(1, steps + 1))
    newest = latest_state(out)  # the kill inside the last save left the one before it as the newest
    assert newest is not None and read_manifest(newest)["step"] == steps - save_every
    assert save_under_way(out, steps), "the kill should have left a partial directory"

    where = kill_at_a_random_time([*args, "--resume"], cache, tmp_path / "run2.txt", rng)
    check_resume(tmp_path / "run2.txt", steps - save_every)
    newest = latest_state(out)
    assert newest is not None, where
    resumed_from = read_manifest(newest)["step"]

    proc = start([*args, "--resume"], cache, tmp_path / "run3.txt")
    finish(proc, tmp_path / "run3.txt")
    check_resume(tmp_path / "run3.txt", resumed_from)
    final = log_lines(log)
    # exactly the uninterrupted run's numbers: same weights, optimizer moments, LR and batches
    assert final == uninterrupted, f"seed {seed}, second kill {where}, resumed from step {resumed_from}"
    assert not list(out.glob(f"{PARTIAL_PREFIX}*")), "partial directories were not cleaned up"
    assert [read_manifest(p)["step"] for p in list_states(out)] == [steps - save_every, steps]  # keep 2


def test_single_process_kill_during_save_and_at_random_then_resume(tmp_path):
    single_process_case(tmp_path, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 6))
def test_single_process_kill_at_more_random_points(tmp_path, seed):
    single_process_case(tmp_path, seed=seed, steps=5, save_every=1)


def test_fsdp2_two_processes_kill_during_sharded_save_then_resume(tmp_path):
    cache, out, log = tmp_path / "cache", tmp_path / "out", tmp_path / "loss.jsonl"
    steps, save_every = 4, 2

    def args() -> list[str]:
        return ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), str(TRAIN), "--fsdp", *BASE, "--steps", str(steps),
                "--batch-size", "2", "--save-every", str(save_every), "--out", str(out), "--log-file", str(log)]

    kill_inside_last_save(args(), out, cache, tmp_path / "run1.txt", steps)
    uninterrupted = log_lines(log)
    assert [e["step"] for e in uninterrupted] == list(range(1, steps + 1))
    newest = latest_state(out)
    assert newest is not None and read_manifest(newest)["step"] == steps - save_every
    manifest = read_manifest(newest)
    assert manifest["sharded"] and manifest["world_size"] == 2

    # the previous state loads, here into one process (dcp reads both ranks' shards)
    from r4b_core.model import R4BForConditionalGeneration
    from r4b_core.training import param_groups
    from r4b_core.training_state import load_training_state

    source = next(cache.glob("synthetic-tiny-seed0-*"))  # what the script trained (written into the cache)
    model = R4BForConditionalGeneration.from_pretrained(source)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3)
    state = load_training_state(newest, model, optimizer, restore_rng=False)
    assert state.step == steps - save_every and state.data_position == {"next_example": 2 * state.step}
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2  # the fine-tuned weights arrived
    del model, optimizer

    proc = start([*args(), "--resume"], cache, tmp_path / "run2.txt")
    finish(proc, tmp_path / "run2.txt")
    check_resume(tmp_path / "run2.txt", steps - save_every)
    final = log_lines(log)
    # same ranks, same reduction order: the losses and gradient norms repeat exactly
    assert final == uninterrupted
    assert not list(out.glob(f"{PARTIAL_PREFIX}*"))
