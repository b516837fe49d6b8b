"""``save_hf_checkpoint`` writes as safely as make-synthetic (r4b_weights/output_dir.py): never into a directory
holding files r4b did not write unless ``force=True``, never deleting those, refusing (even with force) a
user's file that would be read with the export, and through a temporary directory, so a full disk half-way
leaves the previous export as it was.

The old export wrote config.json in place, deleted every ``model-*-of-*`` shard and index it found (its own
or not) and kept everything else; a failure half-way left a mix of old and new files. Each test here fails
on it. An earlier export is replaced only with ``force=True`` too (issue 21). (Re-exporting into the same
directory is also tested in test_weights_round_trip.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import fail_on_second_write
import torch

from r4b_core import Qwen3ForCausalLM
from r4b_core.config import TextConfig
from r4b_weights import save_hf_checkpoint
from r4b_weights.output_dir import MANIFEST_NAME

SHARD_BYTES = 40_000  # the small model below then writes several shards + an index


def small_model(seed: int) -> Qwen3ForCausalLM:
    config = TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                        rope_theta=10000.0)
    model = Qwen3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.r4b-tmp-"))


def manifest(directory: Path) -> list[str]:
    return json.loads((directory / MANIFEST_NAME).read_text())["files"]


def same_weights(directory: Path, model: torch.nn.Module) -> bool:
    loaded = Qwen3ForCausalLM.from_pretrained(directory).state_dict()
    return all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_a_directory_of_user_files_is_refused_and_left_as_it_was(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "model-00001-of-00002.safetensors").write_bytes(b"their shard")
    (target / "chat_template.jinja").write_text("theirs {{ messages }}")
    before = snapshot(target)
    with pytest.raises(FileExistsError, match=r"out is not empty .*chat_template.jinja.*force=True"):
        save_hf_checkpoint(small_model(0), target)
    assert snapshot(target) == before
    # force never deletes nor shadows them: both would be read with the new checkpoint
    with pytest.raises(FileExistsError, match=r"chat_template.jinja, model-00001-of-00002.safetensors, which r4b "
                                              r"did not write"):
        save_hf_checkpoint(small_model(0), target, force=True)
    assert snapshot(target) == before and leftovers(tmp_path, "out") == []


def test_a_file_in_the_way_is_named(tmp_path):
    path = tmp_path / "out"
    path.write_text("not a directory")
    with pytest.raises(FileExistsError, match="exists and is a file"):
        save_hf_checkpoint(small_model(0), path)
    assert path.read_text() == "not a directory"


def test_force_keeps_user_files_and_replaces_only_r4b_s_own(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "state-00000010").mkdir()  # e.g. a training run's states
    (target / "state-00000010" / "model.safetensors").write_bytes(b"a training state")
    first = small_model(1)
    written = save_hf_checkpoint(first, target, max_shard_bytes=SHARD_BYTES, force=True)
    assert len(written) >= 3 and all(p.parent == target and p.is_file() for p in written)
    assert "model.safetensors.index.json" in manifest(target) and "notes.txt" not in manifest(target)
    assert same_weights(target, first)
    second = small_model(2)
    save_hf_checkpoint(second, target, force=True)  # one file now: r4b's own stale shards and index go
    assert sorted(p.name for p in target.iterdir()) == [MANIFEST_NAME, "config.json", "model.safetensors",
                                                         "notes.txt", "state-00000010"]
    assert (target / "notes.txt").read_text() == "mine"
    assert (target / "state-00000010" / "model.safetensors").read_bytes() == b"a training state"
    assert same_weights(target, second) and leftovers(tmp_path, "out") == []
    with pytest.raises(FileExistsError, match="notes.txt"):  # not only r4b's files there: force is needed again
        save_hf_checkpoint(second, target)


def test_re_export_over_an_earlier_export_needs_force(tmp_path):
    # issue 21: a second training run replaced the first run's export without a word
    save_hf_checkpoint(small_model(1), tmp_path / "out", max_shard_bytes=SHARD_BYTES)
    before = snapshot(tmp_path / "out")
    newer = small_model(2)
    with pytest.raises(FileExistsError, match="holds an earlier r4b output .*force"):
        save_hf_checkpoint(newer, tmp_path / "out")
    assert snapshot(tmp_path / "out") == before
    save_hf_checkpoint(newer, tmp_path / "out", force=True)
    assert sorted(manifest(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert not list((tmp_path / "out").glob("model-*")) and same_weights(tmp_path / "out", newer)


def test_a_full_disk_half_way_leaves_the_previous_export_intact(tmp_path, monkeypatch):
    target = tmp_path / "out"
    first = small_model(1)
    save_hf_checkpoint(first, target, max_shard_bytes=SHARD_BYTES)
    before = snapshot(target)
    calls = fail_on_second_write(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        save_hf_checkpoint(small_model(2), target, max_shard_bytes=SHARD_BYTES, force=True)
    assert len(calls) == 2  # it did fail on the second shard
    assert snapshot(target) == before and leftovers(tmp_path, "out") == []
    monkeypatch.undo()
    assert same_weights(target, first)


def test_a_full_disk_half_way_leaves_a_new_target_absent(tmp_path, monkeypatch):
    fail_on_second_write(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        save_hf_checkpoint(small_model(1), tmp_path / "new", max_shard_bytes=SHARD_BYTES)
    assert not (tmp_path / "new").exists() and leftovers(tmp_path, "new") == []


def test_source_files_are_copied_and_a_user_template_is_not_shadowed(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "tokenizer.json").write_text('{"the": "tokenizer"}')
    (source / "chat_template.jinja").write_text("source {{ messages }}")
    (source / "modeling_r.py").write_text("# remote code\n")
    out = tmp_path / "out"
    save_hf_checkpoint(small_model(1), out, source_dir=source)
    for name in ("tokenizer.json", "chat_template.jinja", "modeling_r.py"):
        assert (out / name).read_bytes() == (source / name).read_bytes() and name in manifest(out)
    # over itself: an r4b export as its own source (the files are copied before the old ones are replaced)
    newer = small_model(2)
    save_hf_checkpoint(newer, out, source_dir=out, force=True)
    assert (out / "chat_template.jinja").read_text() == "source {{ messages }}" and same_weights(out, newer)
    # without source_dir, a user's template next to the export would win over the built-in one: refused
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "chat_template.jinja").write_text("stale {{ messages }}")
    with pytest.raises(FileExistsError, match="chat_template.jinja, which r4b did not write"):
        save_hf_checkpoint(newer, mine, force=True)
    assert sorted(p.name for p in mine.iterdir()) == ["chat_template.jinja"]
    with pytest.raises(FileNotFoundError, match="source_dir"):
        save_hf_checkpoint(newer, tmp_path / "other", source_dir=tmp_path / "missing")
    assert not (tmp_path / "other").exists()
