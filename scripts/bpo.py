#!/usr/bin/env python
"""Bi-mode annealing, then Bi-mode Policy Optimization (BPO), on generated pictures (scripts/bimode_shapes.py).

    python scripts/bpo.py --out runs/bpo                          # the documented long run (docs/training.md)
    python scripts/bpo.py --out runs/bpo --resume                 # after a crash: continue from the newest state
    python scripts/bpo.py --out runs/t --anneal-steps 2 --bpo-steps 2 --eval-prompts 4   # a smoke run

1. Annealing (SFT, full weights): thinking and non-thinking answers mixed (bimode_shapes.annealing_conversation),
   written to ``--out/annealed`` (an HF checkpoint) when done.
2. Held-out greedy eval of the annealed model in auto, long and short mode (accuracy, format, thinking rate
   by question kind) -> ``--out/eval_before.json``.
3. BPO (LoRA on the decoder's q/k/v/o by default, ``--full`` for all weights): each step draws
   ``--prompts-per-step`` questions, samples ``--group-size`` forced-thinking and as many forced-non-thinking
   answers per question, rewards them (correct answer through r4b_core.scoring + 0.1 x format), normalises
   advantages over each question's 2G answers and takes ``--updates`` clipped-objective steps. Per step it logs
   (``--out/bpo_log.jsonl``) reward / accuracy / format / length by mode, KL, clip fraction, gradient norm, and the
   auto-mode thinking rate of a greedy auto-mode answer to the step's questions by kind. The training state
   (adapters or weights, optimizer, schedule, step, data position, RNG) is saved to ``--out/states`` every
   ``--save-every`` steps (r4b_core.training.state: atomic), so ``--resume`` continues with the same losses.
4. Held-out eval again -> ``--out/eval_after.json``; ``--out/summary.json``; ``--out/curves.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bimode_shapes, shapes_data, ctrl_c
import ctrl_c  # noqa: E402  (imports nothing heavy)

if __name__ == "__main__":
    ctrl_c.during_imports("bpo.py")  # Ctrl-C: one line and status 130, not a traceback

import torch  # noqa: E402  (after the Ctrl-C hook above)

from bimode_shapes import AUTO_THINK_SHARE, KINDS, annealing_conversation, task_item, user_turn  # noqa: E402

from r4b_core.generation.generate import GenerationStream, prepare_generation  # noqa: E402
from r4b_core.generation_config import SamplingParams  # noqa: E402
from r4b_core.models.r4b import R4BForConditionalGeneration  # noqa: E402
from r4b_core.processing.processor import R4BProcessor  # noqa: E402
from r4b_core.scoring.score import split_answer  # noqa: E402
from r4b_core.training.bpo_step import REFERENCE_ADAPTERS_OFF, BPOConfig, bpo_step  # noqa: E402
from r4b_core.training.logprobs import response_logprobs  # noqa: E402
from r4b_core.training.lora import apply_lora  # noqa: E402
from r4b_core.training.model_setup import param_groups  # noqa: E402
from r4b_core.training.rewards import Completion, correct_answer, default_rewards, format_ok  # noqa: E402
from r4b_core.training.rollouts import RolloutPrompt, left_pad, mode_prompt_ids, right_pad, stack_images, to_model  # noqa: E402
from r4b_core.training.state import latest_state, load_training_state, read_manifest, save_training_state  # noqa: E402
from r4b_core.training.step_log import open_step_log  # noqa: E402
from r4b_weights.atomic_file import replacing  # noqa: E402

EVAL_OFFSET = 10**9  # held-out items come from indices the training streams never reach
BPO_OFFSET = 10**6  # BPO questions are drawn apart from the annealing examples
MUST_MATCH = ("preset", "tokenizer", "seed", "image_size", "anneal_steps", "anneal_batch", "anneal_lr",
              "auto_think_count", "auto_think_colour", "bpo_steps",
              "prompts_per_step", "group_size", "lr", "full", "lora_rank", "beta", "updates", "max_new_tokens",
              "temperature", "aggregation", "advantage_scale", "micro_batch")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="start from this checkpoint (default: a synthetic --preset one)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--tokenizer", default="qwen", choices=["qwen", "small"],
                   help="the synthetic checkpoint's tokenizer (default qwen: the real vocabulary, where the token "
                        "after <think> is the mode decision; see docs/training.md)")
    p.add_argument("--out", default="runs/bpo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=56)
    p.add_argument("--anneal-steps", type=int, default=400)
    p.add_argument("--anneal-batch", type=int, default=8)
    p.add_argument("--anneal-lr", type=float, default=2e-3)
    p.add_argument("--auto-think-count", type=float, default=AUTO_THINK_SHARE["count"],
                   help="share of the auto-mode annealing examples that think, on count questions")
    p.add_argument("--auto-think-colour", type=float, default=AUTO_THINK_SHARE["colour"],
                   help="the same on colour questions")
    p.add_argument("--bpo-steps", type=int, default=60)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4, help="G: answers per question in each mode")
    p.add_argument("--lr", type=float, default=None, help="BPO learning rate (default 1e-3 LoRA, 2e-4 --full)")
    p.add_argument("--full", action="store_true", help="BPO on all weights (reference: a frozen copy)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.02, help="KL coefficient (0: no reference)")
    p.add_argument("--updates", type=int, default=2, help="optimizer steps per rollout batch")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--aggregation", default="sequence", choices=["sequence", "token", "constant"])
    p.add_argument("--advantage-scale", default="std", choices=["std", "none"])
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--eval-prompts", type=int, default=128)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def say(*a) -> None:
    print(*a, flush=True)


def source_checkpoint(args) -> str:
    if args.checkpoint:
        return args.checkpoint
    from r4b_core.reference.synthetic import cached_synthetic_checkpoint

    return str(cached_synthetic_checkpoint(args.preset, seed=0, tokenizer=args.tokenizer))


def rollout_prompt(item: dict) -> RolloutPrompt:
    return RolloutPrompt(user_turn(item), [item["image"]], item["gold"], item["answer_type"], meta={"kind": item["kind"]})


# ---------------------------------------------------------------------------------------------
# stage 1: bi-mode annealing


def annealing_batch(processor, args, first: int) -> dict:
    """Examples ``first .. first + anneal_batch`` as (prompt in its mode, response) rows: the response is what
    the model writes after that mode's generation prompt, ended by ``<|im_end|>`` (what it learns to stop on)."""
    end = processor.tokenizer.token_to_id("<|im_end|>")
    prompt_rows, response_rows, images = [], [], []
    for i in range(first, first + args.anneal_batch):
        item = task_item(i, args.seed, args.image_size)
        mode, messages = annealing_conversation(item, {"count": args.auto_think_count,
                                                       "colour": args.auto_think_colour})
        inputs = processor(messages=messages[:1], images=[item["image"]], thinking_mode=mode)
        forced = {"auto": "", "long": "<think>\n", "short": "<think>\n\n</think>\n\n"}[mode]
        content = messages[1]["content"]
        prompt_rows.append(inputs["input_ids"][0].tolist())
        response_rows.append(processor.encode(content[len(forced):]) + [end])
        images.append(inputs)
    prompt_ids, prompt_mask = left_pad(prompt_rows, processor.pad_token_id)
    response_ids, response_mask = right_pad(response_rows, processor.pad_token_id)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
            "response_mask": response_mask, "images": stack_images(images)}


def anneal(model, processor, args) -> list[float]:
    """Bi-mode annealing: SFT (mean token cross entropy of the responses) on the mixed-mode examples. The
    response log-probs come from logprobs.response_logprobs, so only the response positions reach lm_head
    (the same numbers as training.data.build_training_example's labels would give; tests/test_bpo_script.py)."""
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=args.anneal_lr, betas=(0.9, 0.95))
    warmup = max(1, args.anneal_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    losses = []
    model.train()
    for step in range(args.anneal_steps):
        b = annealing_batch(processor, args, step * args.anneal_batch)
        logp = response_logprobs(model, b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"],
                                 images=to_model(b["images"], model))
        loss = -logp.sum() / b["response_mask"].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step == args.anneal_steps - 1:
            say(f"anneal {step + 1:4d}/{args.anneal_steps}  loss {losses[-1]:.4f}")
    return losses


# ---------------------------------------------------------------------------------------------
# greedy evaluation in one mode


@torch.no_grad()
def answer_greedy(model, processor, items: list[dict], mode: str, max_new_tokens: int) -> list[Completion]:
    """Greedy answers to ``items`` in ``mode`` (auto: the model chooses; long / short: forced), as Completions
    whose text starts where the auto prompt ends (so the forced prefix is part of it, as in the rollouts)."""
    rows, prefixes, images = [], [], []
    for item in items:
        prompt = rollout_prompt(item)
        ids_auto, prefix, inputs = mode_prompt_ids(processor, prompt, "long" if mode == "auto" else mode)
        rows.append(ids_auto + ([] if mode == "auto" else prefix))
        prefixes.append([] if mode == "auto" else prefix)
        images.append(inputs)
    ids, mask = left_pad(rows, processor.pad_token_id)
    prepared = prepare_generation(model, ids, {"attention_mask": mask, **stack_images(images)},
                                  sampling=SamplingParams(), eos_token_ids=processor.eos_token_ids,
                                  pad_token_id=processor.pad_token_id)
    was = model.training
    model.eval()
    out = GenerationStream(model, prepared, max_new_tokens=max_new_tokens).run()
    model.train(was)
    return [Completion(processor.decode(pre + new), mode, reason, item["gold"], item["answer_type"])
            for pre, new, reason, item in zip(prefixes, out.tokens, out.finish_reasons, items)]


def evaluate(model, processor, args, items: list[dict]) -> dict:
    """Per mode and kind: accuracy, format rate, thinking rate, mean answer length (characters)."""
    report = {}
    for mode in ("auto", "long", "short"):
        done = answer_greedy(model, processor, items, mode, args.max_new_tokens)
        for kind in KINDS:
            rows = [c for c, item in zip(done, items) if item["kind"] == kind]
            if not rows:
                continue
            report[f"{mode}/{kind}"] = {
                "accuracy": sum(correct_answer(c) for c in rows) / len(rows),
                "format": sum(format_ok(c) for c in rows) / len(rows),
                "thinking_rate": sum(split_answer(c.text).thought for c in rows) / len(rows),
                "reward": sum(correct_answer(c) + 0.1 * format_ok(c) for c in rows) / len(rows),
            }
    auto = [report[f"auto/{k}"]["reward"] for k in KINDS if f"auto/{k}" in report]
    report["auto_reward"] = sum(auto) / len(auto)
    return report


def show(report: dict, title: str) -> None:
    say(f"{title}:")
    for key, v in report.items():
        if isinstance(v, dict):
            say(f"  {key:14s} accuracy {v['accuracy']:.2f}  format {v['format']:.2f}  thinking {v['thinking_rate']:.2f}")
    say(f"  auto-mode reward {report['auto_reward']:.3f}")


# ---------------------------------------------------------------------------------------------
# stage 2: BPO


def bpo_config(args) -> BPOConfig:
    return BPOConfig(group_size=args.group_size, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                     advantage_scale=args.advantage_scale, aggregation=args.aggregation, beta=args.beta,
                     updates=args.updates, micro_batch_size=args.micro_batch)


def prepare_policy(args, annealed: Path):
    """(policy, reference, optimizer, scheduler) for BPO from the annealed checkpoint."""
    model = R4BForConditionalGeneration.from_pretrained(annealed)
    reference = None
    if args.full:
        if args.beta > 0:
            reference = copy.deepcopy(model).requires_grad_(False).eval()
    else:
        torch.manual_seed(args.seed)  # the adapters' init (overwritten on resume anyway)
        apply_lora(model, rank=args.lora_rank, alpha=2.0 * args.lora_rank)
        reference = REFERENCE_ADAPTERS_OFF if args.beta > 0 else None
    lr = args.lr if args.lr is not None else (2e-4 if args.full else 1e-3)
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=lr, betas=(0.9, 0.99))
    updates = args.bpo_steps * args.updates
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, updates // 10)))
    return model.train(), reference, opt, sched


@torch.no_grad()
def auto_thinking(model, processor, items: list[dict], max_new_tokens: int) -> dict[str, float]:
    """Greedy auto-mode thinking rate on ``items`` by kind (-1 when a kind is absent)."""
    done = answer_greedy(model, processor, items, "auto", max_new_tokens)
    out = {}
    for kind in KINDS:
        rows = [c for c, item in zip(done, items) if item["kind"] == kind]
        out[f"auto_think/{kind}"] = sum(split_answer(c.text).thought for c in rows) / len(rows) if rows else -1.0
    return out


def progress(total: int, initial: int):
    try:
        from tqdm import tqdm
    except ImportError:  # plain lines instead
        return None
    return tqdm(total=total, initial=initial, desc="BPO", unit="step", file=sys.stdout,
                disable=not sys.stdout.isatty())


def run_bpo(args, processor, annealed: Path, states: Path, log_path: Path, resume_from: Path | None) -> tuple[torch.nn.Module, list[dict]]:
    model, reference, opt, sched = prepare_policy(args, annealed)
    start = 0
    if resume_from is not None:
        start = load_training_state(resume_from, model, opt, scheduler=sched).step
        say(f"resumed BPO from {resume_from} (step {start})")
    config, rewards = bpo_config(args), default_rewards()
    log = open_step_log(log_path, start)
    bar = progress(args.bpo_steps, start)
    history = []
    for step in range(start, args.bpo_steps):
        started = time.perf_counter()
        first = BPO_OFFSET + step * args.prompts_per_step
        items = [task_item(i, args.seed, args.image_size) for i in range(first, first + args.prompts_per_step)]
        metrics = bpo_step(model, opt, processor, [rollout_prompt(it) for it in items], rewards=rewards,
                           config=config, seed=args.seed * 1_000_003 + step, reference=reference, scheduler=sched)
        metrics.update(auto_thinking(model, processor, items, args.max_new_tokens))
        metrics.update(step=step + 1, seconds=time.perf_counter() - started)
        history.append(metrics)
        log.write(json.dumps(metrics) + "\n")
        log.flush()
        line = (f"step {step + 1:3d}/{args.bpo_steps}  loss {metrics['loss']:+.4f}  reward long "
                f"{metrics['reward/long']:.2f} short {metrics['reward/short']:.2f}  auto-think colour "
                f"{metrics['auto_think/colour']:.2f} count {metrics['auto_think/count']:.2f}  len long "
                f"{metrics['length/long']:.1f} short {metrics['length/short']:.1f}  kl {metrics['kl']:.4f}  "
                f"clip {metrics['clip_fraction']:.3f}  {metrics['seconds']:.1f} s")
        if bar is not None and not bar.disable:
            bar.update(1)
            bar.write(line)
        else:
            say(line)
        if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 == args.bpo_steps):
            save_training_state(states, model, opt, step=step + 1, scheduler=sched,
                                data_position={"next_prompt": first + args.prompts_per_step},
                                extra={"config": {k: getattr(args, k) for k in MUST_MATCH}})
    if bar is not None:
        bar.close()
    log.close()
    return model, [json.loads(line) for line in log_path.read_text().splitlines()]


def plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("reward by mode", ["reward/long", "reward/short"]),
              ("auto-mode thinking rate", ["auto_think/colour", "auto_think/count"]),
              ("response length (tokens)", ["length/long", "length/short"]),
              ("KL and clip fraction", ["kl", "clip_fraction"])]
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            values = [h.get(key, float("nan")) for h in history]
            if key.startswith("auto_think/"):  # -1: no question of that kind in the step
                values = [float("nan") if v < 0 else v for v in values]
            ax.plot(steps, values, label=key, marker=".")
        ax.set_title(title)
        ax.set_xlabel("BPO step")
        ax.legend()
    fig.tight_layout()
    with replacing(path) as tmp:  # atomic; a killed run's temporary is removed by the next (atomic_file.py)
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def warn_if_long_is_not_forced(processor, args) -> None:
    """Forced thinking is only forced when the long-mode prefix is not the start of the short-mode one: with
    a tokenizer that splits "\\n\\n" into two "\\n" (the small synthetic one), "<think>\\n" can still go on
    "\\n</think>", so long-mode answers may skip the thought (docs/training.md)."""
    prompt = rollout_prompt(task_item(0, args.seed, args.image_size))
    long_prefix = mode_prompt_ids(processor, prompt, "long")[1]
    short_prefix = mode_prompt_ids(processor, prompt, "short")[1]
    if short_prefix[:len(long_prefix)] == long_prefix:
        say(f"warning: with this tokenizer the long-mode prefix {long_prefix} starts the short-mode one "
            f"{short_prefix}: forced thinking can still answer without a thought (use --tokenizer qwen)")


def main(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    states, annealed, log_path = out / "states", out / "annealed", out / "bpo_log.jsonl"
    config = {k: getattr(args, k) for k in MUST_MATCH}
    resume_from = latest_state(states)
    if args.resume:
        if resume_from is None or not (annealed / "config.json").is_file():
            raise SystemExit(f"r4b: error: --resume: no annealed checkpoint and training state in {out}; run without "
                             "--resume first.")
        saved = read_manifest(resume_from).get("extra", {}).get("config", {})
        differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {v!r})" for k, v in config.items() if saved.get(k) != v]
        if differ:
            raise SystemExit(f"r4b: error: --resume: {resume_from} was saved with other options: {'; '.join(differ)}.")
    elif resume_from is not None:
        raise SystemExit(f"r4b: error: {states} already holds training states; pass --resume or use another --out.")
    torch.manual_seed(args.seed)
    source = source_checkpoint(args)
    processor = R4BProcessor.from_pretrained(source)
    warn_if_long_is_not_forced(processor, args)
    held_out = [task_item(EVAL_OFFSET + i, args.seed, args.image_size) for i in range(args.eval_prompts)]
    if not args.resume:
        from r4b_weights.export import save_hf_checkpoint

        model = R4BForConditionalGeneration.from_pretrained(source)
        started = time.perf_counter()
        losses = anneal(model, processor, args)
        say(f"annealing: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {time.perf_counter() - started:.0f} s")
        save_hf_checkpoint(model.eval(), annealed, source_dir=source, force=True)
        before = evaluate(model, processor, args, held_out)
        (out / "eval_before.json").write_text(json.dumps(before, indent=1))
        del model
    before = json.loads((out / "eval_before.json").read_text())
    show(before, "after annealing (held out, greedy)")
    started = time.perf_counter()
    model, history = run_bpo(args, processor, annealed, states, log_path, resume_from if args.resume else None)
    say(f"BPO: {len(history)} steps in {time.perf_counter() - started:.0f} s (this process)")
    after = evaluate(model, processor, args, held_out)
    (out / "eval_after.json").write_text(json.dumps(after, indent=1))
    show(after, "after BPO (held out, greedy)")
    summary = {"auto_reward_before": before["auto_reward"], "auto_reward_after": after["auto_reward"],
               **{f"auto_think_{k}_{when}": r[f"auto/{k}"]["thinking_rate"] for when, r in (("before", before),
                  ("after", after)) for k in KINDS if f"auto/{k}" in r},
               "losses": [h["loss"] for h in history]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if not args.no_plot and history:
        plot(history, out / "curves.png")
        say(f"curves: {out / 'curves.png'}")
    return summary


if __name__ == "__main__":
    ctrl_c.run("bpo.py", main, parse_args())  # a state being written is left partial, removed by the next run
