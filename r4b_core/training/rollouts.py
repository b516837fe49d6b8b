"""Bi-mode rollouts: for every prompt, G responses with thinking forced and G with it switched off.

    prompt ──chat template, auto mode──► ids_auto (ends "<|im_start|>assistant\\n")
           ──long / short mode─────────► ids_auto + prefix     prefix "<think>\\n"  /  "<think>\\n\\n</think>\\n\\n"
    rows  [p0 long x G, p0 short x G, p1 long x G, ...]  (N = P * 2G), left-padded, images repeated per row
      ──generation.GenerationStream (one batch, sampled at ``temperature``, seeded)──► new tokens per row
      ──► RolloutBatch: prompt = ids_auto (left-padded), response = prefix + new tokens (right-padded)
      ──logprobs.response_logprobs (no grad)──► old_logprobs

The mode prefix is part of the RESPONSE, not of the prompt: it is the answer to "think or not?" that the
auto mode makes by itself (after ``<think>``, the tokenizer writes ``\\n`` then either the thought or a
second ``\\n`` and ``</think>``). With ``prefix_in_loss`` (default) the prefix tokens are trained with
the rollout's advantage, so the forced rollouts also teach the auto mode WHEN to think: on a question
where the thinking rollouts beat the non-thinking ones, the thinking prefix gains probability under the
auto prompt. The R-4B paper forces the two modes but does not say how (or whether) the decision tokens
get a gradient; this is r4b's choice, and ``prefix_in_loss=False`` trains only the sampled tokens.
The prefix tokens were not sampled, so their "old" log-prob is the old policy's probability of them
(the importance ratio stays a ratio of the same quantity).

``old_logprobs`` come from the training forward under ``torch.no_grad`` after generation (as verl's
"recompute old log-prob"), so the first update's ratio is exactly 1; ``record_sampler_logprobs`` also
keeps what the sampler computed for the sampled tokens (the two agree to float rounding; the test
checks <= 1e-5 in fp32), for checks and for users who want to skip the recomputation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from r4b_core.generation.generate import GenerationStream, prepare_generation
from r4b_core.generation_config import SamplingParams
from r4b_core.processing.processor import R4BProcessor
from r4b_core.training.logprobs import response_logprobs, token_logprobs

FORCED_MODES = ("long", "short")  # forced thinking, forced non-thinking: the chat template's switches


@dataclass
class RolloutPrompt:
    """One question: the conversation (ending with the user turn), its images, the gold answer and how to
    check it (``answer_type`` as in r4b_core.scoring: choice / number / math / text), free labels."""

    messages: list[dict]
    images: list[Any]
    gold: str
    answer_type: str = "text"
    options: dict[str, str] | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class RolloutBatch:
    """N rollouts (rows) of P prompts; see the module docstring for the layout. Tensors on the CPU."""

    prompt_ids: torch.Tensor  # [N, Tp] left-padded auto-mode prompts
    prompt_mask: torch.Tensor  # [N, Tp]
    response_ids: torch.Tensor  # [N, R] prefix + sampled tokens (eos included when it ended the row), right-padded
    response_mask: torch.Tensor  # [N, R] 1 = a response token
    loss_mask: torch.Tensor  # [N, R] 1 = a token the objective trains (response_mask, minus the prefix if not trained)
    sampled_mask: torch.Tensor  # [N, R] 1 = a token the sampler drew
    images: dict[str, torch.Tensor]  # pixel_values [I, views, 3, S, S], image_sizes [I, 2], batch_num_images [N]
    modes: list[str]  # "long" / "short" per row
    prompt_index: list[int]  # which prompt each row answers
    texts: list[str]  # decoded response (prefix included, special tokens skipped; <think> tags kept)
    finish_reasons: list[str]  # "eos" / "length"
    group_size: int
    old_logprobs: torch.Tensor | None = None  # [N, R]
    sampler_logprobs: torch.Tensor | None = None  # [N, R], 0 where not sampled

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def rows(self, start: int, stop: int) -> "RolloutBatch":
        """Rows ``start:stop`` (images sliced along with them)."""
        per_row = self.images["batch_num_images"].tolist()
        first, last = sum(per_row[:start]), sum(per_row[:stop])
        images = {"pixel_values": self.images["pixel_values"][first:last],
                  "image_sizes": self.images["image_sizes"][first:last],
                  "batch_num_images": self.images["batch_num_images"][start:stop]}
        take = slice(start, stop)
        return replace(
            self, prompt_ids=self.prompt_ids[take], prompt_mask=self.prompt_mask[take],
            response_ids=self.response_ids[take], response_mask=self.response_mask[take],
            loss_mask=self.loss_mask[take], sampled_mask=self.sampled_mask[take], images=images,
            modes=self.modes[take], prompt_index=self.prompt_index[take], texts=self.texts[take],
            finish_reasons=self.finish_reasons[take],
            old_logprobs=None if self.old_logprobs is None else self.old_logprobs[take],
            sampler_logprobs=None if self.sampler_logprobs is None else self.sampler_logprobs[take])


def mode_prompt_ids(processor: R4BProcessor, prompt: RolloutPrompt, mode: str) -> tuple[list[int], list[int], dict]:
    """(auto-mode prompt ids, the ids ``mode`` adds after them, the processor's image tensors)."""
    auto = processor(messages=prompt.messages, images=prompt.images, thinking_mode="auto")
    forced = processor(messages=prompt.messages, images=prompt.images, thinking_mode=mode)
    ids_auto, ids_mode = auto["input_ids"][0].tolist(), forced["input_ids"][0].tolist()
    if ids_mode[:len(ids_auto)] != ids_auto:
        raise ValueError(f"the chat template's {mode!r} prompt does not start with its auto-mode prompt token by "
                         "token, so the mode switch cannot be placed in the response; use a template whose "
                         "long/short generation prompts only append to the auto one.")
    return ids_auto, ids_mode[len(ids_auto):], auto


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    return ids, mask


def right_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def stack_images(per_row: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Each row's processor image tensors -> one batch (views zero-padded, as training.data.collate)."""
    with_images = [r for r in per_row if r.get("pixel_values") is not None]
    counts = torch.tensor([len(r["image_sizes"]) if r.get("pixel_values") is not None else 0 for r in per_row])
    if not with_images:
        return {"batch_num_images": counts}
    views = max(r["pixel_values"].shape[1] for r in with_images)
    pixel_values = torch.cat([  # [n, v, 3, S, S] -> [n, views, 3, S, S]
        torch.nn.functional.pad(r["pixel_values"], (0, 0, 0, 0, 0, 0, 0, views - r["pixel_values"].shape[1]))
        for r in with_images])
    return {"pixel_values": pixel_values, "image_sizes": torch.cat([r["image_sizes"] for r in with_images]),
            "batch_num_images": counts}


@torch.no_grad()
def batch_logprobs(model: nn.Module, batch: RolloutBatch, *, temperature: float = 1.0,
                   micro_batch_size: int = 8) -> torch.Tensor:
    """``response_logprobs`` of every row, ``micro_batch_size`` rows per forward, no gradient: [N, R] (CPU)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(batch), micro_batch_size):
        part = batch.rows(start, min(start + micro_batch_size, len(batch)))
        out.append(response_logprobs(model, part.prompt_ids.to(device), part.prompt_mask.to(device),
                                     part.response_ids.to(device), part.response_mask.to(device),
                                     temperature=temperature, images=to_model(part.images, model)).cpu())
    return torch.cat(out)


def to_model(images: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Image tensors where the model computes (pixel values in its dtype; sizes and counts stay on the host)."""
    param = next(p for p in model.parameters() if p.is_floating_point())
    out = dict(images)
    if out.get("pixel_values") is not None:
        out["pixel_values"] = out["pixel_values"].to(param.device, param.dtype)
    return out


def generate_rollouts(model: nn.Module, processor: R4BProcessor, prompts: Sequence[RolloutPrompt], group_size: int,
                      *, temperature: float = 1.0, max_new_tokens: int = 64, seed: int = 0,
                      modes: Sequence[str] = FORCED_MODES, prefix_in_loss: bool = True,
                      record_sampler_logprobs: bool = False, micro_batch_size: int = 8) -> RolloutBatch:
    """``group_size`` sampled responses per prompt in each of ``modes`` (default: forced thinking, forced
    non-thinking), generated as one batch; old log-probs included. ``seed`` makes the draw reproducible
    (a resumed run passes the same seed for the same step)."""
    if group_size < 1 or not prompts:
        raise ValueError(f"generate_rollouts: need at least one prompt and group_size >= 1 (got {len(prompts)} "
                         f"prompts, group_size {group_size}).")
    if temperature <= 0:
        raise ValueError(f"rollouts are sampled: temperature must be > 0 (got {temperature}).")
    prompt_rows, prefixes, image_rows, row_modes, row_prompt = [], [], [], [], []
    for p_index, prompt in enumerate(prompts):
        for mode in modes:
            ids_auto, prefix, auto_inputs = mode_prompt_ids(processor, prompt, mode)
            for _ in range(group_size):
                prompt_rows.append(ids_auto)
                prefixes.append(prefix)
                image_rows.append(auto_inputs)
                row_modes.append(mode)
                row_prompt.append(p_index)
    pad = processor.pad_token_id
    images = stack_images(image_rows)
    gen_ids, gen_mask = left_pad([a + b for a, b in zip(prompt_rows, prefixes)], pad)
    prepared = prepare_generation(model, gen_ids, {"attention_mask": gen_mask, **images},
                                  sampling=SamplingParams(temperature=temperature, seed=seed),
                                  eos_token_ids=processor.eos_token_ids, pad_token_id=pad)
    step_logits: list[torch.Tensor] = []
    hook = None
    if record_sampler_logprobs:  # the logits each sampling step drew from: [N, V] per step
        hook = model.register_forward_hook(lambda m, args, out: step_logits.append(out.logits[:, -1].float().cpu()))
    was_training = model.training
    model.eval()
    try:
        output = GenerationStream(model, prepared, max_new_tokens=max_new_tokens).run()
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    new_tokens = output.tokens
    prompt_ids, prompt_mask = left_pad(prompt_rows, pad)
    response_ids, response_mask = right_pad([pre + new for pre, new in zip(prefixes, new_tokens)], pad)
    sampled_mask = torch.zeros_like(response_mask)
    for i, (pre, new) in enumerate(zip(prefixes, new_tokens)):
        sampled_mask[i, len(pre):len(pre) + len(new)] = 1
    loss_mask = response_mask.clone() if prefix_in_loss else sampled_mask.clone()
    texts = [processor.decode(pre + new) for pre, new in zip(prefixes, new_tokens)]
    batch = RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                         response_mask=response_mask, loss_mask=loss_mask, sampled_mask=sampled_mask, images=images,
                         modes=row_modes, prompt_index=row_prompt, texts=texts, finish_reasons=output.finish_reasons,
                         group_size=group_size)
    if record_sampler_logprobs:
        sampler = torch.zeros(response_ids.shape, dtype=torch.float32)
        for i, (pre, new) in enumerate(zip(prefixes, new_tokens)):
            for k, token in enumerate(new):  # step k's logits drew token k of every running row
                sampler[i, len(pre) + k] = token_logprobs(step_logits[k][i], torch.tensor(token), temperature)
        batch.sampler_logprobs = sampler
    batch.old_logprobs = batch_logprobs(model, batch, temperature=temperature, micro_batch_size=micro_batch_size)
    return batch
