"""Files r4b writes get the usual permissions, and a killed write leaves nothing behind for long (issue 21
item 6). Replays of the trial's findings: attention-map PNGs (and LoRA adapters) were written 0600 whatever
the umask (mkstemp / safetensors create files private); a killed `make-synthetic` left a hidden staging
folder. Each writer runs under umask 022 and 077 and every file and folder it made must have exactly the
mode that umask gives a new file (0666 & ~umask) or folder (0777 & ~umask). Training states: see
tests/test_hardening_training.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from r4b_core.eval.output import EvalOutput
from r4b_core.interp.attention_map import save_png
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.reference.synthetic import make_synthetic_checkpoint
from r4b_core.training.lora import apply_lora, save_lora
from r4b_weights.export import save_hf_checkpoint
from r4b_weights.output_dir import STAGING_MARK


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def wrong_modes(root: Path, umask: int) -> list[str]:
    """Every path under ``root`` (itself excluded) whose mode is not the one ``umask`` gives a new one."""
    wrong = []
    for path in sorted(root.rglob("*")):
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != want:
            wrong.append(f"{path.relative_to(root)}: {oct(mode)}, not {oct(want)}")
    return wrong


def test_an_attention_map_png(tmp_path, umask):
    save_png(Image.new("RGBA", (8, 8), (255, 0, 0, 128)), tmp_path / "map.png")
    assert wrong_modes(tmp_path, umask) == []  # was 0600


def test_eval_outputs(tmp_path, umask):
    output = EvalOutput(tmp_path / "eval", {"model": "m", "modes": ["short"]})
    output.append({"id": "1", "mode": "short", "prediction": "x"})
    output.write_summary({"accuracy": 0.0})
    output.write_plot(b"\x89PNG\r\n\x1a\n")
    output.close()
    assert len(list((tmp_path / "eval").iterdir())) >= 4  # run.json, predictions, summary, plot (+ manifest)
    assert wrong_modes(tmp_path, umask) == []


def test_an_export_and_a_lora_adapter(tiny_checkpoint, tmp_path, umask):
    model = R4BForConditionalGeneration.from_pretrained(tiny_checkpoint)  # its own copy: LoRA changes it
    save_hf_checkpoint(model, tmp_path / "export", source_dir=tiny_checkpoint)
    apply_lora(model, rank=2, alpha=4.0)
    save_lora(model, tmp_path / "lora" / "adapter.safetensors")  # was 0600
    assert wrong_modes(tmp_path, umask) == []


def test_a_synthetic_checkpoint(tmp_path, umask):
    make_synthetic_checkpoint(tmp_path / "synthetic", "tiny")
    assert wrong_modes(tmp_path, umask) == []


# ---------------------------------------------------------------------------------------------------
# what a killed write left


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _killed_write(target: Path) -> Path:
    """What a write of ``target`` SIGKILLed half way leaves: its staging folder (named for its dead process)
    with a partial file in it."""
    staging = target.parent / f".{target.name}{STAGING_MARK}{_dead_pid()}-abc123"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"\0" * 64)
    return staging


def _staging_left(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}{STAGING_MARK}"))


def test_make_synthetic_removes_what_a_killed_make_synthetic_left(tmp_path, capsys):
    from r4b_core.cli import main

    target = tmp_path / "synthetic"
    _killed_write(target)
    live = target.parent / f".{target.name}{STAGING_MARK}{os.getpid()}-running"  # a write still running: kept
    live.mkdir()
    assert main(["make-synthetic", "--preset", "tiny", "--model", str(target)]) == 0
    assert _staging_left(tmp_path, "synthetic") == [live.name]
    assert json.loads((target / "config.json").read_text())  # and the checkpoint is whole


def test_an_export_removes_what_a_killed_export_left(tiny_model, tmp_path):
    target = tmp_path / "export"
    _killed_write(target)
    save_hf_checkpoint(tiny_model, target)
    assert _staging_left(tmp_path, "export") == []


@pytest.mark.slow  # a fresh process (seconds); the folder it leaves is what _killed_write makes above
def test_a_real_sigkill_of_make_synthetic_is_cleaned_on_the_next_run(tmp_path):
    """The replay itself: SIGKILL `r4b make-synthetic` once its staging folder exists, then run it again."""
    target = tmp_path / "synthetic"
    process = subprocess.Popen([sys.executable, "-m", "r4b_core.cli", "make-synthetic", "--preset", "small",
                                "--model", str(target)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        end = time.monotonic() + 60
        while not _staging_left(tmp_path, "synthetic") and process.poll() is None:
            assert time.monotonic() < end, "no staging folder appeared"
            time.sleep(0.005)
        process.kill()
    finally:
        process.wait(timeout=30)
    if not _staging_left(tmp_path, "synthetic"):
        pytest.skip("the write finished before the kill landed")
    assert not target.exists()  # nothing half-written in the user's view
    make_synthetic_checkpoint(target, "tiny")
    assert _staging_left(tmp_path, "synthetic") == []
