"""A config.json whose layer counts disagree with the tensors is refused from the headers, before the model
of that depth is built (a fuzzed num_hidden_layers of 100000 once took a minute and gigabytes to build)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from r4b_core import Qwen3ForCausalLM, R4BForConditionalGeneration
from r4b_weights import ConfigMismatchError


@pytest.mark.parametrize("section, key", [("text_config", "num_hidden_layers"), ("vision_config", "num_hidden_layers")])
@pytest.mark.parametrize("cls", [R4BForConditionalGeneration, Qwen3ForCausalLM])
def test_absurd_layer_count_is_refused_before_the_model_is_built(tiny_checkpoint, tmp_path, monkeypatch, cls,
                                                                 section, key):
    directory = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, directory)
    config = json.loads((directory / "config.json").read_text())
    config[section][key] = 100_000
    (directory / "config.json").write_text(json.dumps(config))
    built = []
    monkeypatch.setattr(cls, "__init__", lambda self, *a, **k: built.append(1) or torch.nn.Module.__init__(self))
    if cls is Qwen3ForCausalLM and section == "vision_config":
        with pytest.raises(Exception):  # the text model ignores the vision side; it must get past the check
            cls.from_pretrained(directory)
        assert built, "the text model's load should not look at vision_config's layer count"
        return
    with pytest.raises(ConfigMismatchError, match=rf"{section}\.{key} = 100000.*2 layers"):
        cls.from_pretrained(directory)
    assert not built, "the model was built before the layer counts were checked"
