"""Strict loading errors: missing, unexpected, mis-shaped tensors, truncated or garbage files, missing
shards, pickle-only checkpoints (refused, never unpickled), config/tensor mismatches, bad indexes; each
names the HF tensor, its file and what to do."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

import r4b_weights
from r4b_core import Qwen3ForCausalLM
from r4b_weights.errors import (
    CheckpointError, ConfigMismatchError, CorruptCheckpointError, MissingShardError, MissingTensorError,
    PickleCheckpointError, ShapeMismatchError, UnexpectedTensorError,
)

from checkpoint_files import INDEX, SINGLE, small_text_config, saved, rewrite_tensors, edit_json  # tests/checkpoint_files.py


def test_error_hierarchy():
    for cls in (CheckpointError, MissingTensorError, UnexpectedTensorError, ShapeMismatchError,
                ConfigMismatchError, CorruptCheckpointError, PickleCheckpointError, MissingShardError):
        assert issubclass(cls, ValueError), cls
        assert issubclass(cls, CheckpointError), cls
    assert issubclass(MissingShardError, FileNotFoundError)
    assert r4b_weights.MissingShardError is MissingShardError


def test_missing_tensor(tmp_path):
    d, _ = saved(tmp_path)
    rewrite_tensors(d / SINGLE, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MissingTensorError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'") as e:
        Qwen3ForCausalLM.from_pretrained(d)
    assert SINGLE in str(e.value)


def test_missing_lm_head_when_untied(tmp_path):
    d, _ = saved(tmp_path)
    rewrite_tensors(d / SINGLE, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(MissingTensorError, match=r"'lm_head\.weight'"):
        Qwen3ForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("extra", ["model.layers.0.mlp.extra.weight", "foo.weight"])
def test_unexpected_tensor(tmp_path, extra):
    d, _ = saved(tmp_path)
    rewrite_tensors(d / SINGLE, lambda t: t.__setitem__(extra, torch.zeros(4, 4)))
    with pytest.raises(UnexpectedTensorError) as e:
        Qwen3ForCausalLM.from_pretrained(d)
    assert f"'{extra}' (in {SINGLE})" in str(e.value)


def test_unexpected_tensor_names_its_shard(tmp_path):
    d, _ = saved(tmp_path, max_shard_bytes=40_000)
    shard = sorted(d.glob("model-*-of-*.safetensors"))[1]
    extra = "model.layers.0.mlp.extra.weight"
    rewrite_tensors(shard, lambda t: t.__setitem__(extra, torch.zeros(2)))
    edit_json(d / INDEX, lambda i: i["weight_map"].__setitem__(extra, shard.name))
    with pytest.raises(UnexpectedTensorError, match=rf"'{extra}' \(in {shard.name}\)"):
        Qwen3ForCausalLM.from_pretrained(d)


def test_extra_layer_beyond_config_is_refused(tmp_path):
    d, _ = saved(tmp_path)
    rewrite_tensors(d / SINGLE, lambda t: t.__setitem__("model.layers.3.mlp.up_proj.weight", t["model.layers.2.mlp.up_proj.weight"].clone()))
    with pytest.raises((ConfigMismatchError, UnexpectedTensorError), match=r"num_hidden_layers|model\.layers\.3"):
        Qwen3ForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("name, bad_shape", [
    ("model.layers.1.mlp.up_proj.weight", (64, 31)),
    ("model.norm.weight", (33,)),
    ("model.layers.2.self_attn.o_proj.weight", (32, 32, 1)),
    ("lm_head.weight", (300, 16)),
])
def test_shape_mismatch(tmp_path, name, bad_shape):
    d, model = saved(tmp_path)
    want = list(model.state_dict()[name].shape)
    rewrite_tensors(d / SINGLE, lambda t: t.__setitem__(name, torch.zeros(bad_shape)))
    with pytest.raises(ShapeMismatchError) as e:
        Qwen3ForCausalLM.from_pretrained(d)
    msg = str(e.value)
    assert f"'{name}' in {SINGLE} has shape {list(bad_shape)}, expected {want}" in msg


def test_truncated_file(tmp_path):
    d, _ = saved(tmp_path)
    data = (d / SINGLE).read_bytes()
    (d / SINGLE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors") as e:
        Qwen3ForCausalLM.from_pretrained(d)
    assert str(d / SINGLE) in str(e.value)


def test_truncated_shard(tmp_path):
    d, _ = saved(tmp_path, max_shard_bytes=40_000)
    shard = sorted(d.glob("model-*-of-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        Qwen3ForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("garbage", [b"this is not a safetensors file at all\n" * 50, bytes(range(256)) * 8, b"",
                                     (20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 64],
                         ids=["text", "bytes", "empty", "bad-header-json"])
def test_garbage_file(tmp_path, garbage):
    d, _ = saved(tmp_path)
    (d / SINGLE).write_bytes(garbage)
    with pytest.raises(CorruptCheckpointError) as e:
        Qwen3ForCausalLM.from_pretrained(d)
    assert str(d / SINGLE) in str(e.value)


def test_missing_shard(tmp_path):
    d, _ = saved(tmp_path, max_shard_bytes=40_000)
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    shards[1].unlink()
    with pytest.raises(MissingShardError) as e:
        Qwen3ForCausalLM.from_pretrained(d)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    msg = str(e.value)
    assert shards[1].name in msg and INDEX in msg
    assert shards[0].name not in msg
    # also catchable as a plain FileNotFoundError
    with pytest.raises(FileNotFoundError):
        Qwen3ForCausalLM.from_pretrained(d)


class _MakesMarker:
    """Unpickling this creates (opens for writing) the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_armed_bin(path: Path, marker: Path) -> None:
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": _MakesMarker(marker)}, path)


def test_pickle_only_checkpoint_is_refused_and_never_unpickled(tmp_path):
    # the payload is armed: a real unpickle of an identical file creates its marker
    control_marker = tmp_path / "control-marker"
    _write_armed_bin(tmp_path / "control.bin", control_marker)
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert control_marker.exists()

    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(small_text_config().to_hf_dict()))
    marker = tmp_path / "marker"
    _write_armed_bin(d / "pytorch_model.bin", marker)
    with pytest.raises(PickleCheckpointError, match=r"pytorch_model\.bin") as e:
        Qwen3ForCausalLM.from_pretrained(d)
    assert str(d) in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_other_pickle_suffixes_are_refused(tmp_path, suffix):
    (tmp_path / "config.json").write_text(json.dumps(small_text_config().to_hf_dict()))
    marker = tmp_path / "marker"
    with open(tmp_path / f"weights{suffix}", "wb") as f:
        pickle.dump(_MakesMarker(marker), f)
    with pytest.raises(PickleCheckpointError, match=f"weights{suffix}"):
        Qwen3ForCausalLM.from_pretrained(tmp_path)
    assert not marker.exists()


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(small_text_config().to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="no weights found"):
        Qwen3ForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("key, value, says, tensor", [
    ("hidden_size", 48, "hidden_size = 48", "model.embed_tokens.weight"),
    ("intermediate_size", 96, "intermediate_size = 96", "model.layers.0.mlp.gate_proj.weight"),
    ("vocab_size", 301, "vocab_size = 301", "model.embed_tokens.weight"),
    ("head_dim", 16, "head_dim = 16", "model.layers.0.self_attn.q_norm.weight"),
    ("num_key_value_heads", 4, "num_key_value_heads * head_dim = 32", "model.layers.0.self_attn.k_proj.weight"),
])
def test_config_mismatch_names_key_and_tensor(tmp_path, key, value, says, tensor):
    d, _ = saved(tmp_path)
    edit_json(d / "config.json", lambda c: c.__setitem__(key, value))
    with pytest.raises(ConfigMismatchError) as e:
        Qwen3ForCausalLM.from_pretrained(d)
    msg = str(e.value)
    assert says in msg
    assert f"'{tensor}'" in msg and SINGLE in msg
    assert "config.json" in msg


@pytest.mark.parametrize("layers", [2, 4])
def test_config_mismatch_layer_count(tmp_path, layers):
    d, _ = saved(tmp_path)
    edit_json(d / "config.json", lambda c: c.__setitem__("num_hidden_layers", layers))
    with pytest.raises(ConfigMismatchError, match=rf"num_hidden_layers = {layers}, but the checkpoint has layers 0\.\.2"):
        Qwen3ForCausalLM.from_pretrained(d)


def test_index_lists_a_tensor_absent_from_its_shard(tmp_path):
    d, _ = saved(tmp_path, max_shard_bytes=40_000)
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    edit_json(d / INDEX, lambda i: i["weight_map"].__setitem__("model.layers.0.mlp.ghost.weight", shards[0].name))
    with pytest.raises(CorruptCheckpointError, match=r"model\.layers\.0\.mlp\.ghost\.weight") as e:
        Qwen3ForCausalLM.from_pretrained(d)
    assert INDEX in str(e.value)


def test_index_points_a_tensor_at_the_wrong_shard(tmp_path):
    d, _ = saved(tmp_path, max_shard_bytes=40_000)
    index = json.loads((d / INDEX).read_text())
    name = "model.norm.weight"
    actual = index["weight_map"][name]
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != actual)
    edit_json(d / INDEX, lambda i: i["weight_map"].__setitem__(name, other))
    with pytest.raises(CorruptCheckpointError, match=r"model\.norm\.weight"):
        Qwen3ForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("content", ["{not json", '{"metadata": {}}', '{"weight_map": {"a": 3}}', "[1, 2]"])
def test_malformed_index(tmp_path, content):
    d, _ = saved(tmp_path, max_shard_bytes=40_000)
    (d / INDEX).write_text(content)
    with pytest.raises(CorruptCheckpointError, match=INDEX):
        Qwen3ForCausalLM.from_pretrained(d)
