#!/usr/bin/env python
"""Fine-tune R-4B on generated pictures of coloured shapes ("a red circle"): a short custom loop.

    python scripts/train.py --preset tiny --steps 30                         # full fine-tune (CPU: fp32)
    python scripts/train.py --preset tiny --steps 30 --lora                  # LoRA on q/k/v/o of the decoder
    python scripts/train.py --preset tiny --steps 30 --activation-checkpointing
    python scripts/train.py --checkpoint YannQi/R-4B --freeze-vision --lora  # the real model (GPU: bf16 autocast)
    torchrun --nproc_per_node 2 scripts/train.py --fsdp --preset tiny        # FSDP2; gloo on the CPU, nccl on GPUs
    python scripts/train.py --out runs/a --save-every 10 --log-file runs/a.jsonl   # training states in runs/a
    python scripts/train.py --out runs/a --save-every 10 --log-file runs/a.jsonl --resume   # after a crash

Without ``--checkpoint`` a random-init checkpoint of ``--preset`` is written to the r4b cache
(``$R4B_CACHE``) and fine-tuned. ``--batch-size`` is the GLOBAL number of examples per micro-step, split
evenly over the ranks; an optimizer step sees ``batch-size x grad-accum`` examples. The loss of a step is
the summed token cross entropy divided by the number of target tokens in the whole step (all
micro-batches, all ranks), so a run's loss curve does not depend on how the step is split over
micro-batches or processes. At the end the model (LoRA merged) is written with ``save_hf_checkpoint``
to ``--out`` together with the source checkpoint's tokenizer / processor files, so transformers and
``R4BProcessor`` load it as they load the original (with ``--lora`` the adapters alone also go to ``lora/adapter.safetensors``).

Crash safety. ``--save-every N`` writes the full training state (trainable weights, optimizer, LR
schedule, the position in the example stream, RNG states; ``r4b_core.training.state``) to
``--out/state-XXXXXXXX`` every N steps and after the last one, atomically, keeping the newest
``--keep-states``. ``--resume`` continues from the newest complete state in ``--out`` with the same
batches in the same order, so the losses continue exactly as an uninterrupted run's; the run's
configuration must be the one the state was saved with. ``--log-file`` then keeps the lines up to the
resumed step and appends to them. Every file of a state is checked against its recorded SHA-256 first: a
damaged state is named and the run falls back to the newest intact one (saying so), or refuses when none
is intact.

Output safety. Before anything loads, a fresh run refuses an ``--out`` that is a file or holds anything
(an earlier run's checkpoint or training states, files r4b did not write): ``--resume`` continues that
run, ``--force`` starts over there (r4b's earlier checkpoint and training states are replaced; files it did
not write are kept, and one that would be read with the new checkpoint, such as a foreign weight file, is
refused).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ctrl_c, shapes_data
import ctrl_c  # noqa: E402  (imports nothing heavy)

if __name__ == "__main__":
    ctrl_c.during_imports("train.py")

import torch  # noqa: E402  (after the Ctrl-C hook above)
import torch.distributed as dist

from r4b_core.training.lora import apply_lora, merge_lora, save_lora
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.processing.processor import R4BProcessor
from r4b_core.training.model_setup import (
    apply_activation_checkpointing,
    apply_fsdp2,
    causal_lm_loss_sum,
    compile_blocks,
    count_parameters,
    count_target_tokens,
    freeze,
    param_groups,
)
from r4b_core.training.data import build_training_example, collate
from r4b_core.training.run_dir import check_export, check_run_dir
from r4b_core.training.step_log import open_step_log
from r4b_core.training.state import (
    discard_states,
    load_training_state,
    read_manifest,
    remove_partial_states,
    save_training_state,
)
from r4b_weights.export import save_hf_checkpoint
from shapes_data import shape_conversation, shape_example  # scripts/shapes_data.py, next to this file

EVAL_OFFSET = 10**9  # held-out examples are drawn from indices the training stream never reaches
# the options a resumed run must share with the run that saved the state (they shape the trajectory)
RESUME_MUST_MATCH = ("checkpoint", "preset", "steps", "batch_size", "grad_accum", "lr", "weight_decay",
                     "warmup_steps", "max_grad_norm", "seed", "image_size", "lora", "lora_rank", "lora_alpha",
                     "freeze_vision")
PAUSE_IN_SAVE_ENV = "R4B_TRAIN_PAUSE_IN_SAVE"  # crash tests: "STEP:SECONDS" sleeps after each file of that save


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint directory or hub id (default: a synthetic --preset checkpoint)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="synthetic checkpoint preset")
    p.add_argument("--out", default="runs/shapes", help="where the fine-tuned checkpoint and training states go")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="examples per micro-step, over all ranks")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3; 2e-2 with --lora)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default: 10%% of --steps)")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=56, help="side of the generated pictures, in pixels")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters on the decoder's q/k/v/o only")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (run under torchrun)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--eval-examples", type=int, default=6, help="held-out pictures to caption at the end (0: none)")
    p.add_argument("--log-file", help="write one JSON line per step (step, loss, grad_norm, lr) here")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="save the training state to --out every N steps and after the last (0: never)")
    p.add_argument("--keep-states", type=int, default=2, metavar="K", help="newest training states kept")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact state in --out")
    p.add_argument("--force", action="store_true",
                   help="start over in an --out that holds an earlier run's output (its checkpoint and training "
                        "states are replaced; files r4b did not write are kept)")
    p.add_argument("--no-save", action="store_true", help="skip writing the checkpoint")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# setup


def setup_distributed(args) -> tuple[int, int, torch.device, object]:
    """(rank, world size, device, mesh or None). FSDP runs under torchrun: gloo on the CPU, nccl on GPUs."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if not args.fsdp:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu"), None
    if "RANK" not in os.environ:
        raise SystemExit("--fsdp needs torchrun: torchrun --nproc_per_node N scripts/train.py --fsdp ...")
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return dist.get_rank(), dist.get_world_size(), device, mesh


def source_checkpoint(args, rank: int) -> str:
    if args.checkpoint:
        return args.checkpoint
    from r4b_core.reference.synthetic import cached_synthetic_checkpoint

    if rank == 0:  # written once (atomically) into the r4b cache; the other ranks wait, then read it
        cached_synthetic_checkpoint(args.preset, seed=0)
    if dist.is_initialized():
        dist.barrier()
    return str(cached_synthetic_checkpoint(args.preset, seed=0))


def prepare_model(args, source: str, device: torch.device, mesh) -> R4BForConditionalGeneration:
    """Load, then (in torchtitan's order) LoRA / freezing, activation checkpointing, compile, FSDP2."""
    model = R4BForConditionalGeneration.from_pretrained(source, dtype=torch.float32, device="cpu")
    if args.lora:
        apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha)  # freezes everything else
    if args.freeze_vision:
        freeze(model, vision=True)
    if args.activation_checkpointing:
        apply_activation_checkpointing(model)
    if args.compile:
        compile_blocks(model)
    if mesh is not None:
        # on GPUs FSDP keeps fp32 master weights and computes in bf16; on the CPU everything is fp32
        apply_fsdp2(model, mesh, mixed_precision=torch.bfloat16 if device.type == "cuda" else None)
    else:
        model.to(device)
    return model.train()


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# data


def micro_batches(processor: R4BProcessor, args, next_example: int, rank: int, world: int) -> list[dict]:
    """This rank's share of each micro-batch of the optimizer step whose first example is number
    ``next_example`` of the stream (the same examples for any world size)."""
    per_rank = args.batch_size // world
    batches = []
    for micro in range(args.grad_accum):
        first = next_example + micro * args.batch_size + rank * per_rank
        examples = []
        for index in range(first, first + per_rank):
            image, description = shape_example(index, args.seed, args.image_size)
            examples.append(build_training_example(processor, shape_conversation(description), [image]))
        batches.append(collate(examples, processor.pad_token_id))
    return batches


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# training states: save, resume


def run_config(args) -> dict:
    return {name: getattr(args, name) for name in RESUME_MUST_MATCH}


def check_out_dir(args, say=print) -> Path | None:
    """Before anything loads: the state ``--resume`` continues from (None for a fresh run); see
    ``r4b_core.training.run_dir`` for what a fresh run accepts in ``--out``."""
    if args.save_every < 0 or args.keep_states < 1:
        raise SystemExit(f"--save-every must be >= 0 and --keep-states >= 1; got {args.save_every} and "
                         f"{args.keep_states}.")
    latest = check_run_dir(args.out, resume=args.resume, force=args.force, say=say)
    if latest is None:
        return None
    saved = read_manifest(latest).get("extra", {}).get("config", {})  # (its checksums were verified just now)
    differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {v!r})" for k, v in run_config(args).items()
              if saved.get(k) != v]
    if differ:
        raise SystemExit(f"--resume: {latest} was saved by a run with other options: {'; '.join(differ)}. "
                         "Resume with the same options.")
    return latest


def resume(args, path: Path, model, optimizer, scheduler, rank: int, say) -> tuple[int, int]:
    """Load the state at ``path``; returns (steps done, position in the example stream to continue from)."""
    try:
        state = load_training_state(path, model, optimizer, scheduler=scheduler)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--resume: {e}") from None
    if rank == 0:
        for partial in remove_partial_states(args.out):
            say(f"removed {partial.name}, left by an interrupted save")
    position = state.data_position.get("next_example") if isinstance(state.data_position, dict) else None
    if not isinstance(position, int) or position < 0:
        raise SystemExit(f"--resume: {path} holds no position in the example stream (not saved by this script).")
    say(f"resumed from {path} (step {state.step})")
    return state.step, position


def open_log(args, start: int, rank: int):
    """The per-step log (rank 0 only). On resume its lines after the resumed step, from the lost part of
    the interrupted run, are dropped (the file is rewritten atomically), then new lines are appended."""
    if not args.log_file or rank != 0:
        return None
    return open_step_log(args.log_file, start)


def pause_in_save(step: int):
    """For crash tests: ``R4B_TRAIN_PAUSE_IN_SAVE=STEP:SECONDS`` sleeps after each file of the save at STEP."""
    spec = os.environ.get(PAUSE_IN_SAVE_ENV, "")
    if not spec:
        return None
    at, seconds = spec.split(":")
    return (lambda path: time.sleep(float(seconds))) if int(at) == step else None


# ---------------------------------------------------------------------------------------------
# the loop


def train(args) -> list[float]:
    rank, world, device, mesh = setup_distributed(args)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the number of processes ({world}).")
    say = print if rank == 0 else (lambda *a, **k: None)
    resume_from = check_out_dir(args, say)
    torch.manual_seed(args.seed)
    source = source_checkpoint(args, rank)
    if not args.no_save:
        check_export(args.out, source)
    processor = R4BProcessor.from_pretrained(source)
    model = prepare_model(args, source, device, mesh)
    trainable, total = count_parameters(model)
    lr = args.lr if args.lr is not None else (2e-2 if args.lora else 1e-3)
    warmup = args.warmup_steps if args.warmup_steps is not None else args.steps // 10
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.steps, warmup))
    autocast = device.type == "cuda" and mesh is None  # FSDP on GPUs does bf16 through its policy instead
    precision = "bf16 autocast" if autocast else "bf16 (FSDP policy)" if device.type == "cuda" else "fp32"
    say(f"{source}: {total / 1e6:.1f} M parameters, {trainable / 1e6:.2f} M trainable; {world} process(es) on "
        f"{device.type}, {precision}; global batch "
        f"{args.batch_size} x {args.grad_accum} accumulation; lr {lr:g}")
    start, next_example = 0, 0
    if resume_from is not None:
        start, next_example = resume(args, resume_from, model, optimizer, scheduler, rank, say)
    elif args.force and rank == 0:
        for old in discard_states(args.out):
            say(f"removed {old.name} of the earlier run in {args.out} (--force)")
    log = open_log(args, start, rank)

    losses = []
    for step in range(start, args.steps):
        started = time.perf_counter()
        batches = [to_device(b, device) for b in micro_batches(processor, args, next_example, rank, world)]
        next_example += args.batch_size * args.grad_accum
        n_targets = torch.tensor(sum(count_target_tokens(b["labels"]) for b in batches), device=device)
        if world > 1:
            dist.all_reduce(n_targets)  # target tokens of the whole step, over all ranks
        loss_sum = torch.zeros((), device=device)
        for batch in batches:
            labels = batch.pop("labels")  # the loss is computed here, summed over tokens (see the docstring)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(**batch).logits
            summed = causal_lm_loss_sum(logits, labels)
            # FSDP averages gradients over ranks; scaling by world makes them sums, as one process computes them
            (summed * world / n_targets).backward()
            loss_sum += summed.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        step_lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(loss_sum)
        loss = (loss_sum / n_targets).item()
        losses.append(loss)
        say(f"step {step + 1:4d}/{args.steps}  loss {loss:.4f}  grad-norm {grad_norm.item():8.3f}  "
            f"lr {step_lr:.2e}  {time.perf_counter() - started:5.2f} s")
        if log:
            log.write(json.dumps({"step": step + 1, "loss": loss, "grad_norm": grad_norm.item(), "lr": step_lr}) + "\n")
            log.flush()
        if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
            path = save_training_state(args.out, model, optimizer, step=step + 1, scheduler=scheduler,
                                       data_position={"next_example": next_example}, extra={"config": run_config(args)},
                                       keep=args.keep_states, on_file_written=pause_in_save(step + 1))
            say(f"saved the training state to {path}")
    if losses:
        tail = losses[-5:]
        say(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps "
            f"(mean of the last {len(tail)}: {sum(tail) / len(tail):.4f})")
    if args.eval_examples:
        evaluate(model, processor, args, device, autocast, say)
    if not args.no_save:
        export(model, args, source, rank, say)
    if log:
        log.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return losses


@torch.no_grad()
def evaluate(model, processor: R4BProcessor, args, device: torch.device, autocast: bool, say) -> float:
    """Greedy captions of held-out pictures (no KV cache: the answers are a few tokens); every rank runs
    the same forwards, as FSDP needs. Returns the exact-match accuracy."""
    model.eval()
    correct = 0
    for i in range(args.eval_examples):
        image, description = shape_example(EVAL_OFFSET + i, args.seed, args.image_size)
        inputs = to_device(processor(messages=shape_conversation(), images=[image]), device)
        ids, new = inputs.pop("input_ids"), []
        inputs.pop("attention_mask")  # one prompt: no padding
        for _ in range(8):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                token = int(model(ids, **inputs).logits[0, -1].argmax())
            if token in processor.eos_token_ids:
                break
            new.append(token)
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
        answer = processor.decode(new).strip()
        correct += answer == description
        say(f"  eval {i}: {description!r:20} -> {answer!r}")
    say(f"eval exact match: {correct}/{args.eval_examples}")
    model.train()
    return correct / args.eval_examples


def export(model, args, source: str, rank: int, say) -> None:
    """The fine-tuned model as an HF checkpoint (LoRA merged), with the source's tokenizer/processor files."""
    from r4b_weights.hub import resolve_checkpoint

    out = Path(args.out)
    source_dir = resolve_checkpoint(source)
    if dist.is_initialized():  # gather the full (unsharded) weights onto rank 0's CPU, then rebuild a plain model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank != 0:
            return
        with torch.device("meta"):
            model = R4BForConditionalGeneration(model.config)
        if args.lora:
            apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha)
        model.load_state_dict(full, strict=True, assign=True)
        if model.config.tie_lm_head:
            model.language_model.tie_weights()
    model = model.cpu().eval()
    if args.lora:  # in a subfolder: a stray *.safetensors beside the export's weights would be read as a shard
        save_lora(model, out / "lora" / "adapter.safetensors")
        merge_lora(model)
    # force: --out also holds this run's training states (check_out_dir let only this run's output in)
    save_hf_checkpoint(model, out, source_dir=source_dir, force=True)
    say(f"saved the fine-tuned checkpoint to {out}")


if __name__ == "__main__":
    ctrl_c.run("train.py", train, parse_args())  # a state being written is left partial, removed by the next run
