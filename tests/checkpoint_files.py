"""Helpers of the checkpoint tests (test_weights_*.py): small random Qwen3 models, saving them, and editing
the files they are saved in. Not a test module."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from r4b_core import Qwen3ForCausalLM
from r4b_core.config import TextConfig
from r4b_weights.export import save_hf_checkpoint

from conftest import randomize_

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def small_text_config(**overrides) -> TextConfig:
    kwargs = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                  rope_theta=10000.0)
    kwargs.update(overrides)
    return TextConfig(**kwargs)


def random_model(seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(small_text_config(**overrides)).eval()
    randomize_(model, seed)
    return model


def saved(directory: Path, seed: int = 0, max_shard_bytes: int | None = None, force: bool = False, **overrides):
    """(directory, model): a random small model written with save_hf_checkpoint."""
    model = random_model(seed, **overrides)
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    save_hf_checkpoint(model, directory, force=force, **kwargs)
    return directory, model


def file_tensor_names(directory: Path) -> set[str]:
    names: set[str] = set()
    for f in directory.glob("*.safetensors"):
        names |= set(load_file(str(f)).keys())
    return names


def assert_same_state(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    got, want = loaded.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def rewrite_tensors(path: Path, edit) -> None:
    """Load a safetensors file, let ``edit(dict)`` change it in place, write it back."""
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d, indent=2))
