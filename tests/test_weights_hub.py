"""Checkpoint resolution: local directories, hub ids through an offline cache, snapshot_download's
arguments, download failures; no network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from r4b_core import Qwen3ForCausalLM
from r4b_weights.errors import PickleCheckpointError
from r4b_weights.hub import HUB_ALLOW_PATTERNS, resolve_checkpoint

from checkpoint_files import saved, assert_same_state  # tests/checkpoint_files.py


@pytest.fixture
def no_network(monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"snapshot_download must not be called (args={args}, kwargs={kwargs})")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def test_local_directory_is_returned_as_is(tmp_path, no_network):
    assert resolve_checkpoint(tmp_path) == tmp_path
    assert resolve_checkpoint(str(tmp_path)) == tmp_path


def test_local_directory_that_looks_like_a_repo_id(tmp_path, monkeypatch, no_network):
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    got = resolve_checkpoint("owner/name")
    assert got.resolve() == (tmp_path / "owner" / "name").resolve()


def test_local_checkpoint_loads_without_network(tmp_path, no_network):
    d, model = saved(tmp_path)
    assert_same_state(Qwen3ForCausalLM.from_pretrained(str(d)), model)


@pytest.mark.parametrize("path", ["./nope/dir", "nope/a/b", "~/nope-r4b-test-does-not-exist/x"])
def test_nonexistent_path_raises(tmp_path, monkeypatch, no_network, path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        resolve_checkpoint(path)


def test_file_instead_of_directory(tmp_path, no_network):
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(NotADirectoryError):
        resolve_checkpoint(f)


def test_revision_with_local_directory(tmp_path, no_network):
    with pytest.raises(ValueError, match="revision='v1'"):
        resolve_checkpoint(tmp_path, revision="v1")
    with pytest.raises(ValueError, match="revision"):
        Qwen3ForCausalLM.from_pretrained(tmp_path, revision="main")


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A fake HF cache (HF_HUB_CACHE) holding owner/name at COMMIT, with HF_HUB_OFFLINE=1.

    huggingface_hub reads its env vars at import, so its constants are patched too."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    repo = cache / "models--owner--name"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf-home"))
    return cache, snapshot


def test_offline_hub_id_resolves_to_the_cached_snapshot(offline_cache):
    cache, snapshot = offline_cache
    assert resolve_checkpoint("owner/name").resolve() == snapshot.resolve()
    assert resolve_checkpoint("owner/name", revision=COMMIT).resolve() == snapshot.resolve()


def test_offline_hub_id_loads_the_model_from_the_cache(offline_cache):
    _, snapshot = offline_cache
    _, model = saved(snapshot)
    loaded = Qwen3ForCausalLM.from_pretrained("owner/name")
    assert_same_state(loaded, model)


def test_offline_hub_id_not_in_cache(offline_cache):
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE") as e:
        resolve_checkpoint("someone/missing")
    assert "someone/missing" in str(e.value)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_checkpoint("owner/name", revision="v9")  # repo cached, revision not


class _Spy:
    def __init__(self, result: Path):
        self.calls: list[tuple[tuple, dict]] = []
        self.result = result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return str(self.result)


def _repo_id(call) -> str:
    args, kwargs = call
    return args[0] if args else kwargs["repo_id"]


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "online"])
def test_snapshot_download_arguments(tmp_path, monkeypatch, offline):
    import huggingface_hub

    spy = _Spy(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_checkpoint("YannQi/R-4B", revision="abc123") == tmp_path
    assert resolve_checkpoint("YannQi/R-4B") == tmp_path
    assert len(spy.calls) == 2
    for call, revision in zip(spy.calls, ["abc123", None]):
        _, kwargs = call
        assert _repo_id(call) == "YannQi/R-4B"
        assert kwargs.get("revision") == revision
        patterns = kwargs["allow_patterns"]
        for needed in ("*.safetensors", "config.json", "model.safetensors.index.json"):
            assert needed in patterns
        assert not any(p.endswith((".bin", ".pt", ".pth")) or p in ("*", "*.*") for p in patterns)
        assert kwargs["local_files_only"] is offline
    assert patterns == HUB_ALLOW_PATTERNS


def test_hub_download_failure_becomes_file_not_found(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fail(*args, **kwargs):
        raise LocalEntryNotFoundError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError, match="could not be downloaded") as e:
        resolve_checkpoint("owner/name", revision="v2")
    assert "owner/name" in str(e.value) and "v2" in str(e.value)


def test_unknown_home_directory_is_file_not_found():
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        resolve_checkpoint("~no-such-user-r4b/checkpoint")


def test_pickle_only_directory_without_config_is_refused_as_pickle(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(PickleCheckpointError, match="pytorch_model.bin"):
        Qwen3ForCausalLM.from_pretrained(tmp_path)
