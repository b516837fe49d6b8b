"""One BPO step: bi-mode rollouts -> rewards -> group advantages -> clipped-objective updates.

    config = BPOConfig(group_size=4, beta=0.0)
    metrics = bpo_step(model, optimizer, processor, prompts, rewards=default_rewards(), config=config,
                       seed=step, reference=None)             # or a frozen copy, or REFERENCE_ADAPTERS_OFF
    metrics["loss"], metrics["reward/long"], metrics["clip_fraction"], ...

Inside: ``generate_rollouts`` (G forced-thinking + G forced-non-thinking responses per prompt, old
log-probs), the rewards of every response, ``group_advantages`` over each prompt's 2G responses,
``token_weights`` over the whole step, then ``updates`` optimizer steps on the same rollouts, each summing
the gradients of ``micro_batch_size``-row micro-batches (their weights are the step's, so accumulation
gives the full-batch gradient exactly), clipping the gradient norm, stepping the optimizer (and scheduler).

Reference for the KL term (``config.beta > 0``): ``reference=`` a frozen module (e.g. a copy of the
policy before BPO: ``copy.deepcopy(model).requires_grad_(False)``), or ``REFERENCE_ADAPTERS_OFF``: the
policy itself with its LoRA adapters switched off (the base weights; no second model in memory).

FSDP2: every rank calls ``bpo_step`` with its own prompts (the same number on every rank, so every rank runs
the same forwards); gradients are averaged over ranks by FSDP, so "sequence" and "constant" weights are the
global ones; "token" weights are normalised by the token count of all ranks (one all-reduce).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from r4b_core.training.advantages import group_advantages, token_weights
from r4b_core.training.bpo_loss import ClipSettings, policy_loss
from r4b_core.training.logprobs import response_logprobs
from r4b_core.training.lora import lora_modules
from r4b_core.training.rewards import Completion, RewardSet
from r4b_core.training.rollouts import RolloutBatch, RolloutPrompt, batch_logprobs, generate_rollouts, to_model

REFERENCE_ADAPTERS_OFF = "adapters-off"


@dataclass(frozen=True)
class BPOConfig:
    group_size: int = 4  # G: responses per prompt in EACH mode (2G per prompt)
    temperature: float = 1.0
    max_new_tokens: int = 64
    advantage_scale: str = "std"  # "std" (GRPO, BPO) or "none" (Dr. GRPO)
    aggregation: str = "sequence"  # "sequence" (GRPO), "token" (DAPO), "constant" (Dr. GRPO)
    constant_length: int | None = None  # L of "constant" (default: max_new_tokens)
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0  # KL coefficient (0: no reference)
    updates: int = 1  # optimizer steps per rollout batch
    micro_batch_size: int = 8
    max_grad_norm: float = 1.0
    prefix_in_loss: bool = True  # train the mode prefix tokens (rollouts.py)

    def clip(self) -> ClipSettings:
        return ClipSettings(self.eps_low, self.eps_high, self.beta)


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Within the block, every LoRALinear computes its base layer only (its update is scaled by 0)."""
    modules = list(lora_modules(model).values())
    if not modules:
        raise ValueError("reference=REFERENCE_ADAPTERS_OFF: the model has no LoRA adapters (apply_lora first), "
                         "so its base weights are the policy itself; pass a frozen copy instead.")
    saved = [m.scaling for m in modules]
    try:
        for m in modules:
            m.scaling = 0.0
        yield
    finally:
        for m, s in zip(modules, saved):
            m.scaling = s


def reference_logprobs(model: nn.Module, reference, batch: RolloutBatch, config: BPOConfig) -> torch.Tensor:
    """Log-probs of the rollouts under the reference policy (no gradient) [N, R]."""
    if reference == REFERENCE_ADAPTERS_OFF:
        with adapters_off(model):
            return batch_logprobs(model, batch, temperature=config.temperature,
                                  micro_batch_size=config.micro_batch_size)
    if not isinstance(reference, nn.Module):
        raise ValueError(f"beta > 0 needs a reference: a frozen nn.Module or REFERENCE_ADAPTERS_OFF; got {reference!r}.")
    return batch_logprobs(reference, batch, temperature=config.temperature, micro_batch_size=config.micro_batch_size)


def score_rollouts(batch: RolloutBatch, prompts: Sequence[RolloutPrompt], rewards: RewardSet
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rewards of every row (totals [N], per rule)."""
    completions = [Completion(text=batch.texts[i], mode=batch.modes[i], finish_reason=batch.finish_reasons[i],
                              gold=prompts[p].gold, answer_type=prompts[p].answer_type, options=prompts[p].options)
                   for i, p in enumerate(batch.prompt_index)]
    return rewards.score(completions)


def step_weights(batch: RolloutBatch, config: BPOConfig) -> torch.Tensor:
    """The step's token weights [N, R] (advantages.token_weights), normalised over all ranks for "token"."""
    length = config.constant_length or config.max_new_tokens
    weights = token_weights(batch.loss_mask, config.aggregation, constant_length=length)
    if config.aggregation == "token" and dist.is_available() and dist.is_initialized():
        local = batch.loss_mask.sum().float()
        total = local.clone().to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(total)
        # FSDP averages over ranks: weights summing to world / global_tokens make the average the global mean
        weights = weights * local.clamp(min=1) * dist.get_world_size() / total.cpu().clamp(min=1)
    return weights


def bpo_step(model: nn.Module, optimizer: torch.optim.Optimizer, processor, prompts: Sequence[RolloutPrompt], *,
             rewards: RewardSet, config: BPOConfig = BPOConfig(), seed: int = 0, reference=None,
             scheduler=None) -> dict[str, float]:
    """Rollouts for ``prompts``, then ``config.updates`` optimizer steps; returns the step's metrics."""
    batch = generate_rollouts(model, processor, prompts, config.group_size, temperature=config.temperature,
                              max_new_tokens=config.max_new_tokens, seed=seed, prefix_in_loss=config.prefix_in_loss,
                              micro_batch_size=config.micro_batch_size)
    totals, parts = score_rollouts(batch, prompts, rewards)
    advantages = group_advantages(totals.view(len(prompts), -1), config.advantage_scale).reshape(-1)  # [N]
    ref = reference_logprobs(model, reference, batch, config) if config.beta > 0 else None
    weights = step_weights(batch, config)
    device = next(model.parameters()).device
    metrics = rollout_metrics(batch, totals, parts)
    losses, kls, clips, norms = [], [], [], []
    model.train()
    for _ in range(config.updates):
        loss_sum, kl_sum, clip_sum = 0.0, 0.0, 0.0
        for start in range(0, len(batch), config.micro_batch_size):
            stop = min(start + config.micro_batch_size, len(batch))
            part = batch.rows(start, stop)
            logp = response_logprobs(model, part.prompt_ids.to(device), part.prompt_mask.to(device),
                                     part.response_ids.to(device), part.response_mask.to(device),
                                     temperature=config.temperature, images=to_model(part.images, model))
            w = weights[start:stop].to(device)
            loss, stats = policy_loss(logp, part.old_logprobs.to(device), advantages[start:stop].to(device), w,
                                      config.clip(), None if ref is None else ref[start:stop].to(device))
            loss.backward()
            share = float(w.sum())  # this micro-batch's part of the step's weight
            loss_sum += float(loss.detach())
            kl_sum += stats["kl"] * share
            clip_sum += stats["clip_fraction"] * share
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total_weight = float(weights.sum()) or 1.0
        losses.append(loss_sum)
        kls.append(kl_sum / total_weight)
        clips.append(clip_sum / total_weight)
        norms.append(float(norm))
    metrics.update({"loss": losses[0], "losses": losses, "kl": kls[-1], "clip_fraction": max(clips),
                    "grad_norm": norms[0]})
    return metrics


def rollout_metrics(batch: RolloutBatch, totals: torch.Tensor, parts: dict[str, torch.Tensor]) -> dict:
    """Reward (total and per rule) and response length by mode."""
    out: dict = {"reward": float(totals.mean())}
    lengths = batch.sampled_mask.sum(dim=1).float()
    for mode in sorted(set(batch.modes)):
        rows = torch.tensor([m == mode for m in batch.modes])
        out[f"reward/{mode}"] = float(totals[rows].mean())
        out[f"length/{mode}"] = float(lengths[rows].mean())
        for name, values in parts.items():
            out[f"{name}/{mode}"] = float(values[rows].mean())
    return out
