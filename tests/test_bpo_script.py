"""scripts/bpo.py end to end (a few steps, tiny preset), its annealing batches, and SIGKILL + --resume.

- a smoke run: annealing, the held-out eval in three modes, BPO steps with every logged metric, training
  states, summary and the PNG of the curves;
- the annealing rows (prompt in its mode + response) are token for token what
  training.data.build_training_example makes of the same conversation (ids and labelled positions);
- killed with SIGKILL after its first saved state and resumed: the same per-step losses as an
  uninterrupted run (slow: three processes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bpo  # scripts/bpo.py (conftest puts scripts/ on the path)
from bimode_shapes import annealing_conversation, task_item
from r4b_core.processing.processor import R4BProcessor
from r4b_core.training.data import IGNORE_INDEX, build_training_example

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bpo.py"
SMALL = ["--anneal-steps", "2", "--anneal-batch", "4", "--eval-prompts", "2", "--prompts-per-step", "1",
         "--group-size", "2", "--max-new-tokens", "6", "--updates", "2", "--no-plot"]


def test_smoke_run(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    args = bpo.parse_args(["--checkpoint", str(tiny_checkpoint), "--out", str(out), *SMALL[:-1], "--bpo-steps", "2",
                           "--save-every", "1"])
    summary = bpo.main(args)
    log = [json.loads(line) for line in (out / "bpo_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2]
    for key in ("loss", "reward/long", "reward/short", "length/long", "length/short", "kl", "clip_fraction",
                "auto_think/colour", "auto_think/count", "correct/long", "format/short", "grad_norm"):
        assert all(key in entry for entry in log), key
    assert all(len(entry["losses"]) == 2 for entry in log)  # --updates 2
    before = json.loads((out / "eval_before.json").read_text())
    cells = {k: v for k, v in before.items() if isinstance(v, dict)}
    assert {k.split("/")[0] for k in cells} == {"auto", "long", "short"} and "auto_reward" in before
    assert all(set(v) == {"accuracy", "format", "thinking_rate", "reward"} for v in cells.values())
    assert summary["losses"] == [entry["loss"] for entry in log]
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "annealed" / "config.json").is_file()
    assert sorted(p.name for p in (out / "states").iterdir()) == ["state-00000001", "state-00000002"]


def test_annealing_rows_are_the_training_examples_tokens(tiny_checkpoint):
    processor = R4BProcessor.from_pretrained(tiny_checkpoint)
    args = bpo.parse_args(["--anneal-batch", "7"])  # examples 0-6 hold all three modes
    rows = bpo.annealing_batch(processor, args, first=0)
    modes = set()
    for i in range(7):
        item = task_item(i, args.seed, args.image_size)
        mode, messages = annealing_conversation(item)
        modes.add(mode)
        example = build_training_example(processor, messages, [item["image"]], thinking_mode=mode)
        prompt = rows["prompt_ids"][i][rows["prompt_mask"][i].bool()]
        response = rows["response_ids"][i][rows["response_mask"][i].bool()]
        ids, labels = example["input_ids"], example["labels"]
        n = len(prompt) + len(response)
        assert torch.equal(torch.cat([prompt, response]), ids[:n])  # the rest: the newline after <|im_end|>
        assert torch.equal(labels[len(prompt):n], response)
        assert bool((labels[:len(prompt)] == IGNORE_INDEX).all()) and bool((labels[n:] == IGNORE_INDEX).all())
    assert modes == {"auto", "long", "short"}


def _env(cache: Path) -> dict:
    return {**os.environ, "R4B_CACHE": str(cache), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_losses(tiny_checkpoint, tmp_path):
    common = [sys.executable, str(SCRIPT), "--checkpoint", str(tiny_checkpoint), *SMALL, "--bpo-steps", "3",
              "--save-every", "1"]
    env = _env(tmp_path / "cache")
    whole = subprocess.run([*common, "--out", str(tmp_path / "whole")], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=900)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed_out = tmp_path / "killed"
    proc = subprocess.Popen([*common, "--out", str(killed_out)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while not (killed_out / "states" / "state-00000001").is_dir():  # a complete state: renamed into place last
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first state"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # during step 2
    proc.wait()
    assert not (killed_out / "summary.json").exists()
    resumed = subprocess.run([*common, "--out", str(killed_out), "--resume"], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed BPO from" in resumed.stdout

    def losses(out: Path) -> list[list[float]]:
        return [json.loads(line)["losses"] for line in (out / "bpo_log.jsonl").read_text().splitlines()]

    assert len(losses(tmp_path / "whole")) == 3
    assert losses(killed_out) == losses(tmp_path / "whole")
