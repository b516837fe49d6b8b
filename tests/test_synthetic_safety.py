"""``make-synthetic`` and the cached synthetic checkpoint never destroy what r4b did not write and never
leave a half-written checkpoint (issue 11, point 1; r4b_weights/output_dir.py).

The old writer replaced config.json and the tokenizer in place, deleted every ``model-*-of-*`` shard and
index it found (its own or not) and kept everything else, so a stale ``chat_template.jinja`` then won over
the built-in template; a failure half-way left a mix of old and new files. Each test here fails on it.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from conftest import fail_on_second_write

import r4b_weights.safetensors_io as safetensors_io
from r4b_core.cli import main
from r4b_weights.output_dir import MANIFEST_NAME
from r4b_core.reference.synthetic import cached_synthetic_checkpoint, make_synthetic_checkpoint

SHARD_BYTES = 20 * 1024**2  # the tiny preset (78 MB in fp32) then writes 4 shards + an index


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary directories a write into ``parent / name`` left beside it."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.r4b-tmp-"))


def user_files(directory: Path) -> dict[str, bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "chat_template.jinja").write_text("keep me {{ messages }}")
    (directory / "model-00001-of-00002.safetensors").write_bytes(b"X")
    return snapshot(directory)


def test_a_non_empty_directory_is_refused_and_left_as_it_was(tmp_path):
    target = tmp_path / "d"
    before = user_files(target)
    with pytest.raises(FileExistsError, match=r"d is not empty .*chat_template.jinja.*--force"):
        make_synthetic_checkpoint(target)
    assert snapshot(target) == before
    # --force still never deletes or shadows files r4b did not write: these two would be read with the new checkpoint
    with pytest.raises(FileExistsError, match=r"chat_template.jinja, model-00001-of-00002.safetensors, which r4b "
                                              r"did not write"):
        make_synthetic_checkpoint(target, force=True)
    assert snapshot(target) == before and leftovers(tmp_path, "d") == []


def test_the_command_refuses_before_writing_anything(tmp_path, capsys):
    target = tmp_path / "d"
    before = user_files(target)
    assert main(["make-synthetic", str(target)]) == 1
    captured = capsys.readouterr()
    assert "writing" not in captured.out  # refused before the weights were drawn
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"r4b: error: {target} is not empty") and "--force" in lines[0]
    assert main(["make-synthetic", str(target), "--force"]) == 1
    assert "which r4b did not write" in capsys.readouterr().err
    assert snapshot(target) == before


def test_a_file_in_the_way_is_named(tmp_path, capsys):
    path = tmp_path / "ckpt"
    path.write_text("not a directory")
    assert main(["make-synthetic", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path} exists and is a file, not a directory" in err and "Errno" not in err
    assert path.read_text() == "not a directory"


def test_force_replaces_only_what_r4b_wrote(tmp_path):
    target = tmp_path / "d"
    make_synthetic_checkpoint(target, seed=1, max_shard_bytes=SHARD_BYTES)  # sharded: 4 shards + index
    first = json.loads((target / MANIFEST_NAME).read_text())["files"]
    assert "model.safetensors.index.json" in first and len([f for f in first if f.startswith("model-")]) >= 3
    (target / "notes.txt").write_text("mine")
    (target / "runs").mkdir()
    (target / "runs" / "log.txt").write_text("mine too")
    make_synthetic_checkpoint(target, seed=1, force=True)  # now one file: r4b's own stale shards and index go
    names = sorted(p.name for p in target.iterdir())
    assert names == sorted([MANIFEST_NAME, "config.json", "generation_config.json", "model.safetensors", "notes.txt",
                            "preprocessor_config.json", "runs", "special_tokens_map.json", "tokenizer.json",
                            "tokenizer_config.json"])
    assert (target / "notes.txt").read_text() == "mine" and (target / "runs" / "log.txt").read_text() == "mine too"
    assert "notes.txt" not in json.loads((target / MANIFEST_NAME).read_text())["files"]
    assert leftovers(tmp_path, "d") == []


def test_a_full_disk_half_way_leaves_a_new_target_absent(tmp_path, monkeypatch):
    calls = fail_on_second_write(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        make_synthetic_checkpoint(tmp_path / "new", max_shard_bytes=SHARD_BYTES)
    assert len(calls) == 2  # it did fail half-way through the shards
    assert not (tmp_path / "new").exists() and leftovers(tmp_path, "new") == []


def test_a_full_disk_half_way_leaves_an_earlier_checkpoint_intact(tmp_path, monkeypatch):
    target = tmp_path / "d"
    make_synthetic_checkpoint(target, seed=2)
    before = snapshot(target)
    fail_on_second_write(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        make_synthetic_checkpoint(target, seed=3, max_shard_bytes=SHARD_BYTES, force=True)
    assert snapshot(target) == before and leftovers(tmp_path, "d") == []


def test_the_cached_checkpoint_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    monkeypatch.setenv("R4B_CACHE", str(tmp_path / "cache"))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_io, "save_file", no_space)
    with pytest.raises(OSError, match="No space left"):
        cached_synthetic_checkpoint("tiny", seed=5)
    cache = tmp_path / "cache"
    assert [p.name for p in cache.iterdir()] == []  # neither the checkpoint nor a temporary directory
    monkeypatch.undo()
    monkeypatch.setenv("R4B_CACHE", str(cache))
    path = cached_synthetic_checkpoint("tiny", seed=5)
    assert (path / MANIFEST_NAME).is_file() and (path / "model.safetensors").is_file()
    assert cached_synthetic_checkpoint("tiny", seed=5) == path  # found, not written again
    assert [p.name for p in cache.iterdir()] == [path.name]
