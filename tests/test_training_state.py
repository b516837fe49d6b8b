"""r4b_core.training.state: save / find / load the full training state, atomically, in one process.

A small network with a tied weight, a frozen part and dropout (so the torch RNG matters), AdamW and a
LambdaLR schedule; its "data" draws from Python's ``random`` and numpy's global generator, so a resume
that forgot any RNG would diverge. Crashes inside a save are simulated with ``on_file_written`` raising
(tests/test_fault_injection.py kills real processes). The LoRA case uses the tiny R-4B checkpoint; the
last tests call scripts/train.py's resume helpers in-process.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from r4b_core.training.state import (
    PARTIAL_PREFIX,
    TrainingStateError,
    latest_state,
    list_states,
    load_training_state,
    read_manifest,
    remove_partial_states,
    save_training_state,
)
from r4b_core.training.state_io import decode, encode

PICKLE_MAGIC = b"\x80"  # the first byte of every pickle protocol >= 2 stream


class Net(nn.Module):
    def __init__(self, extra: bool = False, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(16, width)
        self.body = nn.Linear(width, width)
        self.frozen = nn.Linear(width, width)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(width, 16, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.drop = nn.Dropout(0.5)
        if extra:
            self.more = nn.Linear(width, width)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.drop(torch.tanh(self.body(h) + self.frozen(h))))


def build(seed: int = 0, scramble: bool = False, **kwargs):
    """Net, AdamW, LambdaLR. ``scramble``: other values for the trainable weights (the frozen ones are the
    "base checkpoint": a state of trainable weights only is loaded onto the same ones)."""
    torch.manual_seed(seed)
    net = Net(**kwargs)
    if scramble:
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return net, opt, sched


def train_step(net, opt, sched) -> float:
    """One step whose batch comes from Python's and numpy's global RNGs and whose dropout uses torch's."""
    x = torch.tensor([[random.randrange(16) for _ in range(6)]]) + int(np.random.randint(0, 1))
    loss = nn.functional.cross_entropy(net(x)[0, :-1], x[0, 1:])
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return loss.item()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.fixture
def trained(tmp_path):
    """A net trained 2 steps and saved as state 2, then 3 more steps: (out dir, losses of steps 3..5, final
    parameters)."""
    seed_everything(1)
    net, opt, sched = build()
    for _ in range(2):
        train_step(net, opt, sched)
    save_training_state(tmp_path / "out", net, opt, step=2, scheduler=sched, data_position={"next": 2})
    later = [train_step(net, opt, sched) for _ in range(3)]
    return tmp_path / "out", later, {k: v.clone() for k, v in net.state_dict().items()}


def test_resume_continues_exactly_like_the_uninterrupted_run(trained):
    out, later, final = trained
    seed_everything(12345)  # a fresh process would have other RNG states
    net, opt, sched = build(scramble=True)  # and other weights
    state = load_training_state(latest_state(out), net, opt, scheduler=sched)
    assert (state.step, state.data_position) == (2, {"next": 2})
    assert [train_step(net, opt, sched) for _ in range(3)] == later
    assert all(torch.equal(v, final[k]) for k, v in net.state_dict().items())
    assert sched.last_epoch == 5 and opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_without_the_rng_states_the_run_diverges(trained):
    """The control for the test above: the RNG part is what keeps dropout and the data in step."""
    out, later, _ = trained
    seed_everything(12345)
    net, opt, sched = build(scramble=True)
    load_training_state(latest_state(out), net, opt, scheduler=sched, restore_rng=False)
    assert [train_step(net, opt, sched) for _ in range(3)] != later


def test_files_are_safetensors_and_json_and_hold_the_trainable_weights_once(trained):
    from safetensors import safe_open

    path = latest_state(trained[0])
    names = sorted(f.name for f in path.iterdir())
    assert names == [".r4b-training-state", "manifest.json", "model.safetensors", "optimizer.safetensors",
                     "rng-rank00000.json", "state.json"]
    for f in path.iterdir():
        assert not f.read_bytes().startswith(PICKLE_MAGIC), f
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
    # frozen.* is not trainable; head.weight is embed.weight (tied): stored once
    assert keys == ["model/body.bias", "model/body.weight", "model/embed.weight"]
    manifest = read_manifest(path)
    assert manifest["step"] == 2 and set(manifest["files"]) == {n for n in names if not n.startswith(".")} - {
        "manifest.json"}


def test_weights_all_stores_frozen_parameters_too(tmp_path):
    from safetensors import safe_open

    net, opt, sched = build()
    train_step(net, opt, sched)
    path = save_training_state(tmp_path, net, opt, step=1, weights="all")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert {"model/frozen.weight", "model/frozen.bias"} <= set(f.keys())
    other, other_opt, _ = build(seed=3)
    load_training_state(path, other, other_opt)
    assert torch.equal(other.frozen.weight, net.frozen.weight)


def test_only_the_newest_k_states_are_kept_and_nothing_else_is_touched(tmp_path):
    net, opt, sched = build()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "state-by-hand").mkdir()  # a directory r4b did not write, named like a state
    (tmp_path / "state-by-hand" / "x").write_text("mine too")
    for step in range(1, 6):
        train_step(net, opt, sched)
        save_training_state(tmp_path, net, opt, step=step, keep=2)
    assert [read_manifest(p)["step"] for p in list_states(tmp_path)] == [4, 5]
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "state-by-hand" / "x").is_file()
    save_training_state(tmp_path, net, opt, step=6, keep=3)
    assert [read_manifest(p)["step"] for p in list_states(tmp_path)] == [4, 5, 6]


def test_saving_a_step_again_replaces_it(tmp_path):
    net, opt, sched = build()
    save_training_state(tmp_path, net, opt, step=3, data_position="first")
    save_training_state(tmp_path, net, opt, step=3, data_position="second")
    assert [p.name for p in list_states(tmp_path)] == ["state-00000003"]
    assert read_manifest(latest_state(tmp_path))["data_position"] == "second"


def test_saving_before_the_first_step_leaves_the_optimizer_fresh(tmp_path):
    seed_everything(2)
    net, opt, sched = build()
    expected = [train_step(net, opt, sched) for _ in range(2)]
    seed_everything(2)
    net, opt, sched = build()
    save_training_state(tmp_path, net, opt, step=0, scheduler=sched)
    assert not opt.state  # (torch's get_state_dict initialises an empty optimizer by a zero-lr step)
    assert [train_step(net, opt, sched) for _ in range(2)] == expected
    seed_everything(2)
    net, opt, sched = build(scramble=True)
    load_training_state(latest_state(tmp_path), net, opt, scheduler=sched)
    assert not opt.state and [train_step(net, opt, sched) for _ in range(2)] == expected


def test_a_foreign_directory_under_a_state_name_is_refused_and_kept(tmp_path):
    net, opt, _ = build()
    (tmp_path / "state-00000007").mkdir()
    (tmp_path / "state-00000007" / "mine.txt").write_text("not r4b's")
    with pytest.raises(TrainingStateError, match="was not written by r4b"):
        save_training_state(tmp_path, net, opt, step=7)
    assert (tmp_path / "state-00000007" / "mine.txt").read_text() == "not r4b's"


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_after", range(4))  # model, optimizer, state.json, rng file
def test_a_crash_inside_a_save_leaves_the_previous_state(tmp_path, crash_after):
    net, opt, sched = build()
    train_step(net, opt, sched)
    save_training_state(tmp_path, net, opt, step=1, scheduler=sched, data_position=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_step(net, opt, sched)
    written = []

    def crash(path):
        written.append(path.name)
        if len(written) > crash_after:
            raise Crash(path)

    with pytest.raises(Crash):
        save_training_state(tmp_path, net, opt, step=2, scheduler=sched, on_file_written=crash)
    partial = tmp_path / f"{PARTIAL_PREFIX}state-00000002"
    assert partial.is_dir() and latest_state(tmp_path).name == "state-00000001"
    fresh, fresh_opt, fresh_sched = build(scramble=True)
    assert load_training_state(latest_state(tmp_path), fresh, fresh_opt, scheduler=fresh_sched).data_position == 1
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    save_training_state(tmp_path, net, opt, step=2, scheduler=sched)  # the next save cleans up
    assert not partial.exists() and latest_state(tmp_path).name == "state-00000002"


def test_partial_directories_are_removed_only_when_r4b_wrote_them(tmp_path):
    ours, empty, foreign = (tmp_path / f"{PARTIAL_PREFIX}{n}" for n in ("a", "b", "c"))
    ours.mkdir()
    (ours / ".r4b-training-state").write_text(json.dumps({"format": "r4b-training-state-1"}))
    (ours / "model.safetensors").write_bytes(b"half")
    empty.mkdir()
    foreign.mkdir()
    (foreign / "data").write_text("not r4b's")
    assert sorted(p.name for p in remove_partial_states(tmp_path)) == [ours.name, empty.name]
    assert (foreign / "data").read_text() == "not r4b's"


@pytest.mark.parametrize("damage", ["no manifest", "truncated tensors", "manifest not json", "other format"])
def test_incomplete_or_damaged_states_are_skipped(tmp_path, damage):
    net, opt, _ = build()
    train_step(net, opt, _)
    save_training_state(tmp_path, net, opt, step=1, keep=5)
    newest = save_training_state(tmp_path, net, opt, step=2, keep=5)
    manifest = newest / "manifest.json"
    if damage == "no manifest":
        manifest.unlink()
    elif damage == "truncated tensors":
        data = (newest / "optimizer.safetensors").read_bytes()
        (newest / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "manifest not json":
        manifest.write_text('{"format": "r4b-tr')
    else:
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": "something-else"}))
    assert latest_state(tmp_path).name == "state-00000001"
    error = FileNotFoundError if damage == "no manifest" else TrainingStateError
    with pytest.raises(error, match="state-00000002"):
        read_manifest(newest)


def test_a_state_for_another_model_or_optimizer_is_refused_with_names(trained):
    out = trained[0]
    net, opt, sched = build(extra=True)
    with pytest.raises(TrainingStateError, match=r"missing from the state \[more\.bias, more\.weight"):
        load_training_state(latest_state(out), net, opt, scheduler=sched)
    net, opt, sched = build(width=4)
    with pytest.raises(TrainingStateError, match=r"body\.bias has shape \[8\] in the state, \[4\] here"):
        load_training_state(latest_state(out), net, opt, scheduler=sched)
    net, _, _ = build()
    one_group = torch.optim.AdamW([{"params": [net.body.weight]}, {"params": [net.body.bias, net.embed.weight]}])
    with pytest.raises(TrainingStateError, match="parameter groups differ"):
        load_training_state(latest_state(out), net, one_group)


def test_bad_arguments_are_value_errors(tmp_path):
    net, opt, _ = build()
    for kwargs, message in [({"step": -1}, "step must be"), ({"step": 1, "keep": 0}, "keep must be"),
                            ({"step": 1, "data_position": {1, 2}}, "JSON data"),
                            ({"step": 1, "extra": {"x": float("nan")}}, "JSON data"),
                            ({"step": 1, "weights": "some"}, "choose one of")]:
        with pytest.raises(ValueError, match=message):
            save_training_state(tmp_path, net, opt, **kwargs)
    assert latest_state(tmp_path) is None and latest_state(tmp_path / "nowhere") is None


def test_the_codec_keeps_types_and_stores_a_shared_tensor_once():
    shared = torch.arange(3.0)
    tree = {"state": {0: {"step": torch.tensor(4.0), "m": shared}, 1: {"m": shared}},
            "groups": [{"betas": (0.9, 0.95), "__odd": None, "flag": True, "lr": 1e-3}], "name": "x"}
    tensors = {}
    encoded = encode(tree, "opt", tensors, {})
    assert len(tensors) == 2
    back = decode(json.loads(json.dumps(encoded)), tensors, where="here")
    assert back["state"][1]["m"] is back["state"][0]["m"] and list(back["state"]) == [0, 1]
    assert back["groups"] == tree["groups"] and isinstance(back["groups"][0]["betas"], tuple)
    with pytest.raises(TypeError, match="opt/bad is a set"):
        encode({"bad": {1}}, "opt", {}, {})


def test_lora_state_holds_the_adapters_only(tmp_path, tiny_checkpoint):
    from safetensors import safe_open

    from r4b_core.training.lora import apply_lora, lora_state_dict
    from r4b_core.models.r4b import R4BForConditionalGeneration
    from r4b_core.training.model_setup import param_groups

    def lora_model():
        model = R4BForConditionalGeneration.from_pretrained(tiny_checkpoint)
        apply_lora(model, rank=2)
        return model, torch.optim.AdamW(param_groups(model, 0.0), lr=1e-2)

    model, opt = lora_model()
    ids = torch.randint(0, 64, (1, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    path = save_training_state(tmp_path, model, opt, step=1)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.endswith((".lora_A", ".lora_B")) for k in keys)
    assert len(keys) == len(lora_state_dict(model))
    other, other_opt = lora_model()
    load_training_state(path, other, other_opt)
    mine, theirs = lora_state_dict(model), lora_state_dict(other)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    plain = R4BForConditionalGeneration.from_pretrained(tiny_checkpoint)  # no adapters: refused, with names
    with pytest.raises(TrainingStateError, match="lora_"):
        load_training_state(path, plain, torch.optim.AdamW(plain.parameters()))


# ---------------------------------------------------------------------------------------------
# scripts/train.py's resume helpers (in-process; the end-to-end runs are in test_fault_injection.py)


def test_train_script_resume_checks_and_log_trimming(tmp_path):
    import train  # scripts/train.py, on the path via conftest.py

    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="no complete training state"):
        train.check_out_dir(train.parse_args(["--out", str(out), "--resume"]))
    net, opt, _ = build()
    config = train.run_config(train.parse_args(["--out", str(out), "--batch-size", "2"]))
    save_training_state(out, net, opt, step=3, data_position={"next_example": 6}, extra={"config": config})
    with pytest.raises(SystemExit, match="already holds training states"):
        train.check_out_dir(train.parse_args(["--out", str(out), "--batch-size", "2", "--save-every", "1"]))
    with pytest.raises(SystemExit, match=r"--batch-size 2 \(now 4\)"):
        train.check_out_dir(train.parse_args(["--out", str(out), "--batch-size", "4", "--resume"]))
    args = train.parse_args(["--out", str(out), "--batch-size", "2", "--resume", "--log-file", str(tmp_path / "l")])
    assert train.check_out_dir(args) == latest_state(out)

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    (tmp_path / "l").write_text("\n".join(lines) + '\n{"step": 6, "lo')  # the crash cut the last line short
    log = train.open_log(args, start=3, rank=0)
    log.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    log.close()
    assert (tmp_path / "l").read_text().splitlines() == [*lines[:3], json.dumps({"step": 4, "loss": 0.0})]
