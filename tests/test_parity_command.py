"""`r4b parity` and `r4b generate` as a user runs them, and parity runs that must fail: a perturbed
implementation is caught and the first diverging stage is named."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch.nn as nn
import torch.nn.functional as F
import transformers
from torch.nn.modules.module import register_module_forward_hook

from r4b_core.models import projector as projector_module
from r4b_core.cli import build_parser, main
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.reference.parity import run_parity
from r4b_core.models.siglip import SiglipVisionTransformer
from r4b_core.reference.synthetic import cached_synthetic_checkpoint

EXPECTED_STAGES = ["pixel_values", "vision_features", "projected_features", "packed_features", "input_embeddings",
                   "decoder_layer_0", "decoder_layer_1", "logits", "greedy_tokens"]


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("r4b-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("R4B_CACHE", str(cache))
        directory = cached_synthetic_checkpoint("tiny")
    assert directory.parent == cache
    return directory


@pytest.fixture
def cache_env(synthetic_dir, monkeypatch):
    monkeypatch.setenv("R4B_CACHE", str(synthetic_dir.parent))
    return synthetic_dir


def test_parity_json_on_the_builtin_checkpoint(cache_env, capsys):
    assert main(["parity", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True and report["first_divergence"] is None
    assert [s["name"] for s in report["stages"]] == EXPECTED_STAGES
    assert all(set(s) >= {"name", "max_abs_diff", "tolerance", "passed"} for s in report["stages"])
    assert report["logits_max_abs_diff"] <= 1e-4


def test_parity_table(cache_env, capsys):
    assert main(["parity", "--model", str(cache_env), "--device", "cpu", "--dtype", "auto",
                 "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "decoder_layer_1" in out and "greedy_tokens" in out
    assert "float32 on cpu" in out  # auto: the synthetic checkpoint's config.json says float32


def test_parity_runs_each_vision_tower_once(cache_env):
    calls = Counter()
    towers = {SiglipVisionTransformer: "ours", transformers.SiglipVisionModel: "transformers"}

    def count(module, args, output):
        if type(module) in towers:
            calls[towers[type(module)]] += 1

    handle = register_module_forward_hook(count)
    try:
        report = run_parity(cache_env, greedy_tokens=4)
    finally:
        handle.remove()
    assert report.passed
    assert calls == {"ours": 1, "transformers": 1}  # every stage, greedy decoding included, from one run each


def _tanh_gelu_projector(self, features):
    return self.linear_2(F.gelu(self.linear_1(self.pre_norm(features)), approximate="tanh"))


def test_parity_names_the_projector_when_its_gelu_is_wrong(cache_env, monkeypatch, capsys):
    monkeypatch.setattr(projector_module.MultiModalProjector, "forward", _tanh_gelu_projector)
    report = run_parity(cache_env, greedy_tokens=4)
    assert not report.passed and report.first_divergence == "projected_features"
    assert main(["parity", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["first_divergence"] == "projected_features"


def test_parity_names_the_decoder_layer_that_skips_q_norm(cache_env):
    ours = R4BForConditionalGeneration.from_pretrained(cache_env)
    ours.language_model.model.layers[1].self_attn.q_norm = nn.Identity()
    report = run_parity(cache_env, ours=ours, greedy_tokens=4)
    assert report.first_divergence == "decoder_layer_1"
    stages = {s.name: s for s in report.stages}
    assert stages["decoder_layer_0"].passed and not stages["logits"].passed


def test_generate_json(cache_env, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (120, 80), (200, 30, 30)).save(tmp_path / "red.png")
    argv = ["generate", "--image", str(tmp_path / "red.png"), "--prompt", "What colour?", "--max-new-tokens", "12",
            "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["new_tokens"] == len(first["tokens"]) == 12 and first["finish_reason"] == "length"
    assert first["prompt_tokens"] > 16 and first["text"]  # the image tokens are in the prompt; text is visible
    assert {"thinking", "answer", "time_to_first_token_s", "decode_tokens_per_s"} <= set(first)
    assert main(argv[:-1] + ["--image", f"file://{tmp_path / 'red.png'}", "--json"]) == 0  # two images, one a URL
    second = json.loads(capsys.readouterr().out)
    from r4b_core.processing.processor import R4BProcessor

    processor = R4BProcessor.from_pretrained(cache_env)
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What colour?"}]
    image = Image.open(tmp_path / "red.png")
    expected = processor(messages=[{"role": "user", "content": content}], images=[image, image])["input_ids"]
    assert second["prompt_tokens"] == expected.shape[1] != first["prompt_tokens"]  # a multi-image prompt


def test_generate_streams_thinking_apart(cache_env, capsys):
    assert main(["generate", "--prompt", "Why?", "--thinking-mode", "long", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("thinking:\n")  # long mode: the prompt opened <think>
    assert "tokens (" in captured.err and "TTFT" in captured.err and "tokens/s" in captured.err


def test_generate_errors_are_one_line(cache_env, tmp_path, capsys):
    assert main(["generate", "--prompt", "hi", "--image", str(tmp_path / "missing.png")]) == 1
    assert "missing.png" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--max-new-tokens", "100000"]) == 1
    assert "max_position_embeddings" in capsys.readouterr().err


def test_every_option_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"r4b {name} {action.option_strings or action.dest} has no --help text"
