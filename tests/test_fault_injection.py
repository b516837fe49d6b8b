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
  equal the uninterrupted run's;
- slow: more kill points (after each file of a save), and resuming in another world size.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r4b_core.training.state import PARTIAL_PREFIX, latest_state, list_states, read_manifest

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


def files_saved(out: Path, step: int) -> int:
    """How many files (besides r4b's marker) the partial directory of the save at ``step`` holds so far."""
    try:
        return sum(f.name != ".r4b-training-state" for f in (out / f"{PARTIAL_PREFIX}state-{step:08d}").iterdir())
    except FileNotFoundError:
        return 0


def log_lines(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def kill_inside_last_save(args: list[str], out: Path, cache: Path, stdout: Path, last: int, files: int = 1,
                          pause: float = 60.0) -> None:
    """Run, and SIGKILL inside the save of step ``last`` once ``files`` of its files have appeared (the
    script sleeps ``pause`` s after each file it writes there)."""
    proc = start(args, cache, stdout, pause=f"{last}:{pause}")
    wait_for(lambda: files_saved(out, last) >= files, proc, stdout, f"file {files} of the save of step {last}")
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


def single_process_case(tmp_path: Path, seed: int, steps: int = 6, save_every: int = 2, files: int = 1,
                        pause: float = 60.0) -> None:
    cache, out, log = tmp_path / "cache", tmp_path / "out", tmp_path / "loss.jsonl"
    args = [str(TRAIN), *BASE, "--steps", str(steps), "--batch-size", "1", "--save-every", str(save_every),
            "--out", str(out), "--log-file", str(log)]
    rng = random.Random(seed)

    kill_inside_last_save(args, out, cache, tmp_path / "run1.txt", steps, files, pause)
    uninterrupted = log_lines(log)
    assert [e["step"] for e in uninterrupted] == list(range(1, steps + 1))
    newest = latest_state(out)  # the kill inside the last save left the one before it as the newest
    assert newest is not None and read_manifest(newest)["step"] == steps - save_every
    assert files_saved(out, steps) >= files, "the kill should have left a partial directory"

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
    # the newest two are kept (an older third may survive a kill between a save's rename and its pruning)
    assert [read_manifest(p)["step"] for p in list_states(out)][-2:] == [steps - save_every, steps]


def test_single_process_kill_during_save_and_at_random_then_resume(tmp_path):
    # 4 steps, states at 2 and 4 (killed inside the one at 4): the least that has a state to fall back to
    # and a step to repeat after it; the slow cases below run 6 steps and other save intervals
    single_process_case(tmp_path, seed=0, steps=4)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 9))
def test_single_process_kill_at_more_random_points(tmp_path, seed):
    """Kills after each of the 4 files of a save (model, optimizer, state.json, rng), resumes from 3 or 4
    steps back, random second kills."""
    single_process_case(tmp_path, seed=seed, steps=6, save_every=2 + seed % 2, files=1 + seed % 4, pause=2.0)


@pytest.mark.slow  # 28 s of torchrun; the default suite keeps the single-process kill-and-resume case
def test_fsdp2_two_processes_kill_during_sharded_save_then_resume(tmp_path):
    cache, out, log = tmp_path / "cache", tmp_path / "out", tmp_path / "loss.jsonl"
    steps, save_every = 4, 2

    def args() -> list[str]:
        return ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), str(TRAIN), "--fsdp", *BASE, "--steps", str(steps),
                "--batch-size", "2", "--save-every", str(save_every), "--out", str(out), "--log-file", str(log)]

    kill_inside_last_save(args(), out, cache, tmp_path / "run1.txt", steps, files=1)
    uninterrupted = log_lines(log)
    assert [e["step"] for e in uninterrupted] == list(range(1, steps + 1))
    newest = latest_state(out)
    assert newest is not None and read_manifest(newest)["step"] == steps - save_every
    manifest = read_manifest(newest)
    assert manifest["sharded"] and manifest["world_size"] == 2

    # the previous state loads, here into one process (dcp reads both ranks' shards)
    from r4b_core.models.r4b import R4BForConditionalGeneration
    from r4b_core.training.model_setup import param_groups
    from r4b_core.training.state import load_training_state

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


@pytest.mark.slow
def test_states_resume_across_world_sizes(tmp_path):
    """A one-process state resumes under FSDP2 on two processes and a two-process (sharded) state in one
    process; the reduction order differs, so the losses agree to rounding."""
    cache, steps = tmp_path / "cache", 4

    def args(out: Path, log: Path, fsdp: bool) -> list[str]:
        common = [str(TRAIN), *BASE, "--steps", str(steps), "--batch-size", "2", "--save-every", "2",
                  "--out", str(out), "--log-file", str(log)]
        if not fsdp:
            return common
        return ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), *common, "--fsdp"]

    for saved_by_fsdp in (False, True):
        out, log = tmp_path / f"out{int(saved_by_fsdp)}", tmp_path / f"loss{int(saved_by_fsdp)}.jsonl"
        finish(start(args(out, log, saved_by_fsdp), cache, tmp_path / "a.txt"), tmp_path / "a.txt")
        reference = log_lines(log)
        shutil.rmtree(latest_state(out))  # resume from step 2, in the other world size
        finish(start([*args(out, log, not saved_by_fsdp), "--resume"], cache, tmp_path / "b.txt"), tmp_path / "b.txt")
        check_resume(tmp_path / "b.txt", 2)
        resumed = log_lines(log)
        assert [e["step"] for e in resumed] == list(range(1, steps + 1))
        for a, b in zip(reference, resumed):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"]
