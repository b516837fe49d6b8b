"""Errors that name the right thing (issue 21 item 3), replays of the trial's findings still open in this
round: `r4b inspect` on a BERT config complained about `hidden_act`; `--image DIR` said "no such image
file"; a path with a trailing space was printed unquoted (the space invisible); `generate(...,
temperature=...)` failed inside the model's `forward`; empty `input_ids` were reported in terms of
"embeddings". (Also of that list, tested elsewhere: a bad `seed` named as seed in
tests/test_serve_api_openai.py, the 413 naming --max-body-mb in tests/test_serve_api.py, `r4b parity
--json` on a NaN checkpoint in tests/test_hardening_parity.py.)
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from r4b_core.cli import main
from r4b_core.generation.generate import generate

from cli_errors import one_error  # tests/cli_errors.py

BERT = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu", "vocab_size": 30522,
        "max_position_embeddings": 512}


def test_inspect_on_a_bert_config_says_it_is_not_an_r4b_or_qwen3_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(BERT))
    assert main(["inspect", str(tmp_path)]) == 1
    line = one_error(capsys)
    assert "model_type 'bert' (architectures BertModel) is not an R-4B or Qwen3 checkpoint" in line
    assert "hidden_act" not in line


def test_an_image_directory_is_named_as_a_directory(tiny_checkpoint, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_checkpoint), "--image", str(tmp_path), "--prompt", "hi"]) == 1
    assert f"{tmp_path}: is a directory, not an image file" in one_error(capsys)


def test_a_path_with_a_trailing_space_is_quoted(tiny_checkpoint, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "pic.png")
    assert main(["inspect", f"{tmp_path / 'model'} "]) == 1
    assert f"'{tmp_path / 'model'} ': no such checkpoint directory" in one_error(capsys)
    assert main(["generate", "--model", str(tiny_checkpoint), "--image", f"{tmp_path / 'pic.png'} ",
                 "--prompt", "hi"]) == 1
    assert f"'{tmp_path / 'pic.png'} ': no such image file" in one_error(capsys)


def test_a_sampling_keyword_given_to_generate_says_where_it_goes(tiny_model):
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match=r"generate\(\) got temperature=: sampling settings go in "
                                        r"sampling=SamplingParams\(temperature=\.\.\.\)"):
        generate(tiny_model, prompt, max_new_tokens=2, temperature=0.5)


def test_the_keyword_check_runs_before_the_model(tiny_model, monkeypatch):
    from r4b_core.models.r4b import R4BForConditionalGeneration

    monkeypatch.setattr(R4BForConditionalGeneration, "__call__",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("the model ran")))
    with pytest.raises(TypeError, match="top_p="):
        generate(tiny_model, torch.tensor([[1, 2, 3]]), max_new_tokens=2, top_p=0.9)


def test_empty_input_ids_are_named_as_token_ids(tiny_model):
    with pytest.raises(ValueError, match=r"input_ids should be a non-empty \[batch, tokens\] tensor of token ids; "
                                         r"got \(1, 0\)") as error:
        generate(tiny_model, torch.zeros((1, 0), dtype=torch.long), max_new_tokens=2)
    assert "embedding" not in str(error.value)
