"""scripts/train.py end to end, and the export after training.

- one process vs ``python -m torch.distributed.run --nproc_per_node 2 scripts/train.py --fsdp`` (FSDP2,
  gloo, CPU) on the same global batch: loss curves within 1e-4, exported weights within 1e-5;
- a fine-tuned model saved with ``save_hf_checkpoint(..., source_dir=...)`` is a complete checkpoint:
  transformers' reference loads it with logits identical to ours, the processor loads it, the source's
  remote-code file and ``auto_map`` come along.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r4b_core.training.lora import apply_lora, merge_lora
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.reference.parity import build_reference_model
from r4b_core.processing.processor import R4BProcessor
from r4b_core.training.model_setup import apply_activation_checkpointing, causal_lm_loss_sum, count_target_tokens, param_groups
from r4b_core.training.data import build_training_example, collate
from r4b_weights.export import save_hf_checkpoint
from shapes_data import shape_conversation, shape_example  # scripts/shapes_data.py, on the path via conftest.py

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
COMMON = ["--preset", "tiny", "--steps", "2", "--batch-size", "2", "--eval-examples", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], cache: Path) -> subprocess.Popen:
    env = {**os.environ, "R4B_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # its own process group: a kill takes torchrun's workers too
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def finish(proc: subprocess.Popen, timeout: int = 300) -> None:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{stdout[-3000:]}\n{stderr[-5000:]}"


def run(args: list[str], cache: Path, timeout: int = 300) -> None:
    finish(start(args, cache), timeout)


def losses(log: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint):
    """(single-process output dir, FSDP output dir), each with loss.jsonl and the exported checkpoint."""
    root = tmp_path_factory.mktemp("train")
    cache = root / "cache"
    single, fsdp = root / "single", root / "fsdp"
    # both runs at once (the single process overlaps torchrun's start-up), both from the session's tiny
    # checkpoint (read-only; the script's own synthetic checkpoint in the cache: tests/test_fault_injection.py)
    source = ["--checkpoint", str(tiny_checkpoint)]
    procs = [start([str(TRAIN), *COMMON, *source, "--out", str(single), "--log-file", str(root / "single.jsonl")],
                   cache),
             start(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                    "--master_port", str(free_port()), str(TRAIN), "--fsdp", *COMMON, *source, "--out", str(fsdp),
                    "--log-file", str(root / "fsdp.jsonl")], cache)]
    try:
        for proc in procs:
            finish(proc)
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill(proc)
    return root


@pytest.mark.slow  # 17 s (torchrun + a second run); in the default suite: tests/test_training.py's in-process FSDP2
def test_two_process_fsdp2_matches_one_process(runs):
    one, two = losses(runs / "single.jsonl"), losses(runs / "fsdp.jsonl")
    assert len(one) == len(two) == 2
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-4
    assert one[-1] < one[0] - 1.0  # and it learns
    # gradient norms before clipping: AdamW and clipping would hide a wrong gradient scale from the losses
    norms_one, norms_two = losses(runs / "single.jsonl", "grad_norm"), losses(runs / "fsdp.jsonl", "grad_norm")
    assert max(abs(a - b) / a for a, b in zip(norms_one, norms_two)) <= 1e-4
    a = R4BForConditionalGeneration.from_pretrained(runs / "single").state_dict()
    b = R4BForConditionalGeneration.from_pretrained(runs / "fsdp").state_dict()
    assert a.keys() == b.keys()
    diff = {k: (a[k] - b[k]).abs().max().item() for k in a}
    # SigLIP's k_proj bias has a gradient that is zero in exact arithmetic (test_grad_parity.py): Adam turns
    # its rounding noise into steps of up to lr (1e-3) in either run, so it only gets a loose bound
    noise_only = {k for k in a if k.endswith("self_attn.k_proj.bias") and k.startswith("vision_tower.")}
    assert len(noise_only) == 2 and max(diff[k] for k in noise_only) <= 1e-3
    assert max(v for k, v in diff.items() if k not in noise_only) <= 1e-5


@pytest.mark.slow  # shares the runs above; the default suite's scripts/train.py runs: test_fault_injection.py, test_hardening*
def test_the_scripts_checkpoint_is_complete(runs):
    out = runs / "single"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    R4BProcessor.from_pretrained(out)


def test_loss_normalisation_does_not_depend_on_how_the_step_is_split(tiny_checkpoint):
    """The script's loss: summed token CE / target tokens of the whole step. Two micro-batches of one give
    the gradient of one batch of two (the property that makes 1 process == 2 processes)."""
    ckpt = tiny_checkpoint  # the session's (conftest.py), read-only: the model below is this test's own
    processor = R4BProcessor.from_pretrained(ckpt)
    examples = [build_training_example(processor, shape_conversation(a), [img])
                for img, a in (shape_example(i, seed=3) for i in range(2))]
    examples[1]["labels"][-3:] = -100  # different target counts per example
    model = R4BForConditionalGeneration.from_pretrained(ckpt)

    def gradient(micro_batches):
        model.zero_grad()
        n = sum(count_target_tokens(b["labels"]) for b in micro_batches)
        for b in micro_batches:
            labels = b.pop("labels")
            (causal_lm_loss_sum(model(**b).logits, labels) / n).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    pad = processor.pad_token_id
    whole = gradient([collate(examples, pad)])
    split = gradient([collate(examples[:1], pad), collate(examples[1:], pad)])
    assert (whole - split).norm() <= 1e-5 * whole.norm()


def test_export_after_training_loads_in_transformers_with_identical_logits(tmp_path, tiny_checkpoint_copy):
    source = tiny_checkpoint_copy  # a private copy of the session's tiny checkpoint: this test edits its files
    (source / "modeling_r.py").write_text("# the checkpoint's remote code\n")
    config = json.loads((source / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "modeling_r.RForConditionalGeneration"}
    (source / "config.json").write_text(json.dumps(config))

    processor = R4BProcessor.from_pretrained(source)
    model = R4BForConditionalGeneration.from_pretrained(source).train()
    apply_activation_checkpointing(model)
    apply_lora(model, rank=4)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=5e-2)
    image, answer = shape_example(0, seed=4, size=120)
    batch = collate([build_training_example(processor, shape_conversation(answer), [image])], processor.pad_token_id)
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merge_lora(model)
    model.eval()

    out = tmp_path / "finetuned"
    save_hf_checkpoint(model, out, source_dir=source)
    assert (out / "modeling_r.py").read_text() == "# the checkpoint's remote code\n"
    assert json.loads((out / "config.json").read_text())["auto_map"] == config["auto_map"]
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()

    inputs = R4BProcessor.from_pretrained(out)(messages=shape_conversation(), images=[image])
    reference = build_reference_model(out)
    with torch.no_grad():
        ours = model(**inputs).logits
        theirs = reference(**inputs).logits
        before = build_reference_model(source)(**inputs).logits
    assert (ours - theirs).abs().max() <= 1e-5
    assert (theirs - before).abs().max() > 1e-2  # the export carries the fine-tuned weights, not the source's


@pytest.mark.slow
def test_fsdp2_with_lora_activation_checkpointing_and_frozen_vision(tmp_path):
    """The same comparison with everything on (LoRA adapters inside FSDP units, AC wrappers, frozen ViT);
    the adapters written by both runs agree too."""
    flags = [*COMMON, "--steps", "3", "--lora", "--activation-checkpointing", "--freeze-vision"]
    cache = tmp_path / "cache"
    run([str(TRAIN), *flags, "--out", str(tmp_path / "single"), "--log-file", str(tmp_path / "single.jsonl")], cache)
    run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
         str(free_port()), str(TRAIN), "--fsdp", *flags, "--out", str(tmp_path / "fsdp"),
         "--log-file", str(tmp_path / "fsdp.jsonl")], cache)
    one, two = losses(tmp_path / "single.jsonl"), losses(tmp_path / "fsdp.jsonl")
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-4 and one[-1] < one[0]
    norms_one, norms_two = losses(tmp_path / "single.jsonl", "grad_norm"), losses(tmp_path / "fsdp.jsonl", "grad_norm")
    assert max(abs(a - b) / a for a, b in zip(norms_one, norms_two)) <= 1e-4
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "lora" / "adapter.safetensors")) for d in ("single", "fsdp"))
    assert a.keys() == b.keys() and len(a) == 16 and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
