"""A config.json whose layer counts disagree with the tensors is refused from the headers, before the model
of that depth is built (a fuzzed num_hidden_layers of 100000 once took a minute and gigabytes to build)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from r4b_core import Qwen3ForCausalLM, R4BForConditionalGeneration
from r4b_weights import ConfigMismatchError


def _with_layer_count(tiny_checkpoint, tmp_path, section: str, count: int):
    """A copy of the tiny checkpoint whose config.json gives ``section.num_hidden_layers = count``."""
    directory = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, directory)
    config = json.loads((directory / "config.json").read_text())
    config[section]["num_hidden_layers"] = count
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("cls, section", [(R4BForConditionalGeneration, "text_config"),
                                          (R4BForConditionalGeneration, "vision_config"),
                                          (Qwen3ForCausalLM, "text_config")])
def test_absurd_layer_count_is_refused_before_the_model_is_built(tiny_checkpoint, tmp_path, monkeypatch, cls,
                                                                 section):
    directory = _with_layer_count(tiny_checkpoint, tmp_path, section, 100_000)
    built = []
    monkeypatch.setattr(cls, "__init__", lambda self, *a, **k: built.append(1) or torch.nn.Module.__init__(self))
    with pytest.raises(ConfigMismatchError, match=rf"{section}\.num_hidden_layers = 100000.*2 layers"):
        cls.from_pretrained(directory)
    assert not built, "the model was built before the layer counts were checked"


def test_the_text_model_ignores_the_vision_layer_count(tiny_checkpoint, tiny_model, tmp_path):
    """Qwen3ForCausalLM reads only the text side of an R-4B checkpoint: a vision_config layer count that
    disagrees with the vision tensors does not stop it, and it loads the same decoder weights."""
    directory = _with_layer_count(tiny_checkpoint, tmp_path, "vision_config", 100_000)
    text_model = Qwen3ForCausalLM.from_pretrained(directory)
    assert text_model.config.num_hidden_layers == tiny_model.config.text_config.num_hidden_layers
    ours = tiny_model.language_model.state_dict()
    assert text_model.state_dict().keys() == ours.keys()
    assert all(torch.equal(t, ours[k]) for k, t in text_model.state_dict().items())
