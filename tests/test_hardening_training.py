"""Issue 21, training outputs: scripts/train.py's --out checks, training-state checksums, file modes.

Replays of the trial's findings (each failed before the fix):
- a second ``scripts/train.py`` run into an earlier run's ``--out`` replaced its exported checkpoint without
  a word (now refused before anything loads unless ``--force`` / ``--resume``; ``save_hf_checkpoint`` too);
- ``--out FILE`` trained every step, then ended in a ``FileExistsError`` traceback (now one line first);
- 16 bytes flipped inside the newest state's weights (size unchanged) were resumed from silently (now the
  checksum names the state and the run falls back to the older one, saying so);
- with every state truncated the message said no state exists (now: every one is damaged, and why);
- training-state files were written 0600 whatever the umask.
"""

from __future__ import annotations

import json
import os
import stat
import warnings

import pytest
import torch
import torch.nn as nn

from r4b_core.training.run_dir import check_run_dir
from r4b_core.training.state import (
    TrainingStateError,
    load_training_state,
    newest_intact_state,
    save_training_state,
    verify_state,
)


def tiny_net_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    return net, torch.optim.AdamW(net.parameters(), lr=1e-2)


def step(net, optimizer) -> None:
    net(torch.randn(3, 4)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def two_states(out):
    """States 1 and 2 of a tiny run in ``out``; returns (state 1, state 2, the net's weights at step 1)."""
    net, optimizer = tiny_net_and_optimizer()
    step(net, optimizer)
    first = save_training_state(out, net, optimizer, step=1, keep=5)
    at_first = {k: v.clone() for k, v in net.state_dict().items()}
    step(net, optimizer)
    second = save_training_state(out, net, optimizer, step=2, keep=5)
    return first, second, at_first


def flip_bytes(path, count: int = 16) -> None:
    """Flip ``count`` bytes in the middle of ``path`` (its size unchanged): the trial's damage."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# checksums


def test_the_manifest_records_a_checksum_for_every_file(tmp_path):
    _, second, _ = two_states(tmp_path)
    manifest = json.loads((second / "manifest.json").read_text())
    assert set(manifest["sha256"]) == set(manifest["files"]) >= {"model.safetensors", "optimizer.safetensors",
                                                                 "state.json", "rng-rank00000.json"}
    assert not list(second.glob(".manifest.json.tmp"))  # written to a temporary name, then renamed
    assert verify_state(second)["step"] == 2


def test_flipped_bytes_in_the_newest_state_are_named_and_never_loaded(tmp_path):
    first, second, at_first = two_states(tmp_path)
    flip_bytes(second / "model.safetensors")
    net, optimizer = tiny_net_and_optimizer(seed=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(TrainingStateError, match=r"state-00000002: model\.safetensors does not match its recorded "
                                                 r"checksum.*newest intact state .* is state-00000001"):
        load_training_state(second, net, optimizer)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # nothing of it was loaded
    # given the run's directory: the older intact state, with one warning naming the damaged one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = load_training_state(tmp_path, net, optimizer)
    assert state.path == first and [p.name for p, _ in state.skipped] == ["state-00000002"]
    assert any("state-00000002 is damaged" in str(w.message) and "falling back to state-00000001" in str(w.message)
               for w in caught)
    assert all(torch.equal(v, at_first[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("damage", ["flip optimizer", "flip json", "truncate"])
def test_newest_intact_state_says_which_is_damaged(tmp_path, damage):
    first, second, _ = two_states(tmp_path)
    if damage == "flip optimizer":
        flip_bytes(second / "optimizer.safetensors", count=4)
    elif damage == "flip json":
        text = (second / "state.json").read_text()
        (second / "state.json").write_text(text.replace('"lr"', '"lR"', 1))  # same size, other content
    else:
        (second / "model.safetensors").write_bytes((second / "model.safetensors").read_bytes()[:100])
    chosen, damaged = newest_intact_state(tmp_path)
    assert chosen == first and [p for p, _ in damaged] == [second]


def test_resume_falls_back_saying_so_and_refuses_when_none_is_intact(tmp_path):
    first, second, _ = two_states(tmp_path)
    flip_bytes(second / "model.safetensors")
    said = []
    assert check_run_dir(tmp_path, resume=True, say=said.append) == first
    assert len(said) == 1 and "state-00000002 is damaged" in said[0] and "falling back to state-00000001" in said[0]
    for state in (first, second):  # every state truncated: not "no state exists", but why each is unusable
        (state / "optimizer.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="no intact training state .* every one is damaged "
                                         r"\(state-00000002, state-00000001"):
        check_run_dir(tmp_path, resume=True, say=said.append)
    net, optimizer = tiny_net_and_optimizer()
    with pytest.raises(TrainingStateError, match="no intact training state to load .*2 damaged"):
        load_training_state(tmp_path, net, optimizer)


def test_a_state_without_checksums_is_not_used(tmp_path):
    _, second, _ = two_states(tmp_path)
    manifest = json.loads((second / "manifest.json").read_text())
    del manifest["sha256"]
    (second / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainingStateError, match="records no checksums"):
        verify_state(second)


# ---------------------------------------------------------------------------------------------
# file modes


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_training_state_files_get_the_umask_s_modes(tmp_path, umask):
    old = os.umask(umask)
    try:
        _, second, _ = two_states(tmp_path)
    finally:
        os.umask(old)
    for f in second.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name  # safetensors wrote 0600 here


# ---------------------------------------------------------------------------------------------
# scripts/train.py --out


@pytest.fixture
def train_script():
    import train  # scripts/train.py, on the path via conftest.py

    return train


def exported(directory):
    from r4b_core.config import TextConfig
    from r4b_core.models.qwen3 import Qwen3ForCausalLM
    from r4b_weights.export import save_hf_checkpoint

    config = TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32)
    save_hf_checkpoint(Qwen3ForCausalLM(config), directory)
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_a_second_run_into_an_earlier_run_s_out_is_refused_before_anything_loads(tmp_path, train_script, capsys):
    out = tmp_path / "run"
    before = exported(out)
    args = train_script.parse_args(["--out", str(out), "--steps", "1", "--batch-size", "1", "--eval-examples", "0"])
    with pytest.raises(SystemExit, match="already holds an earlier run's checkpoint .*--resume .*--force"):
        train_script.train(args)
    assert "step" not in capsys.readouterr().out  # refused before the first step (the trial trained them all)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_out_checks_name_what_is_there(tmp_path, train_script):
    def check(*flags):
        return train_script.check_out_dir(train_script.parse_args(["--out", str(tmp_path / "out"), *flags]))

    (tmp_path / "out").write_text("a file")
    with pytest.raises(SystemExit, match=r"--out .*out is a file"):
        check()
    (tmp_path / "out").unlink()
    (tmp_path / "out").mkdir()
    assert check() is None  # empty: fine
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"files r4b did not write \(notes\.txt\)"):
        check()
    assert check("--force") is None
    with pytest.raises(SystemExit, match="pass one of them"):
        check("--force", "--resume")
    two_states(tmp_path / "out")
    with pytest.raises(SystemExit, match=r"training states \(state-00000001, state-00000002\)"):
        check("--save-every", "0")  # also without --save-every (the trial's run had none)


def test_force_still_refuses_a_foreign_file_the_export_would_be_read_with(tmp_path, train_script):
    from r4b_core.reference.synthetic import cached_synthetic_checkpoint

    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"someone else's shard")
    with pytest.raises(SystemExit, match=r"--out: .*model-00001-of-00002\.safetensors, which r4b did not write"):
        train_script.check_export(out, str(cached_synthetic_checkpoint("tiny")))
