"""Issue 21: ``r4b parity`` on a broken checkpoint (a NaN weight) still prints its stage table, or its JSON,
with the first failing stage marked and the NaN / Inf counts per stage; exit status 1.

Before: one line about generation ("the model's logits hold NaN or Inf ...") on stderr, no table, and with
``--json`` nothing on stdout.
"""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from r4b_core.cli import main
from r4b_core.reference.parity_report import ParityReport, Stage

NAN_TENSOR = "model.language_model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def nan_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with one NaN in decoder layer 1's down projection."""
    directory = tmp_path_factory.mktemp("nan") / "ckpt"
    shutil.copytree(tiny_checkpoint, directory)
    tensors = load_file(str(directory / "model.safetensors"))
    tensors[NAN_TENSOR][0, 0] = float("nan")
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def test_parity_on_a_nan_checkpoint_prints_the_table_with_the_first_failing_stage(nan_checkpoint, capsys):
    assert main(["parity", "--model", str(nan_checkpoint), "--max-new-tokens", "2"]) == 1
    captured = capsys.readouterr()
    rows = {line.split()[0]: line for line in captured.out.splitlines() if line[:1].isalpha()}
    assert "ok" in rows["decoder_layer_0"] and "FAIL <- first divergence" in rows["decoder_layer_1"]
    assert "non-finite: r4b" in rows["decoder_layer_1"] and "NaN" in rows["decoder_layer_1"]
    assert "FAIL" in rows["logits"] and "<- first" not in rows["logits"]
    assert "not run" in rows["greedy_tokens"]
    assert "FAILED: first divergence at 'decoder_layer_1'" in captured.out and "checkpoint's weights" in captured.out
    assert "r4b: error" not in captured.err


def test_parity_json_on_a_nan_checkpoint_is_strict_json_with_counts(nan_checkpoint, capsys):
    assert main(["parity", "--model", str(nan_checkpoint), "--max-new-tokens", "2", "--json"]) == 1
    report = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert report["passed"] is False and report["first_divergence"] == "decoder_layer_1"
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["decoder_layer_0"]["nonfinite"]["r4b"] == {"nan": 0, "inf": 0}
    assert stages["decoder_layer_1"]["nonfinite"]["r4b"]["nan"] > 0
    assert stages["decoder_layer_1"]["nonfinite"]["reference"]["nan"] > 0
    assert stages["decoder_layer_1"]["max_abs_diff"] is None and not stages["greedy_tokens"]["passed"]


def test_a_stage_with_inf_on_one_side_fails_even_with_a_small_difference():
    import torch

    ours, theirs = torch.zeros(4), torch.zeros(4)
    ours[1] = float("inf")
    theirs[1] = float("inf")  # inf - inf is NaN; and one inf alone is an infinite difference: both fail
    stage = Stage.compared("x", ours, theirs, 1e-4)
    assert not stage.passed and stage.nonfinite["r4b"] == {"nan": 0, "inf": 1}
    report = ParityReport("ckpt", "float32", [Stage("logits", 0.0, 1e-4), stage])
    assert report.first_divergence == "x" and "1 Inf" in report.table()
