"""Group-relative advantages (GRPO's baseline) over BPO's bi-mode groups, and the loss's token weights.

    rewards [P, 2G]   (prompt p: G forced-thinking then G forced-non-thinking rollouts, in any order)
    A[p, i] = (r[p, i] - mean_i r[p, :]) / (std_i r[p, :] + eps)        scale="std"  (GRPO, BPO)
    A[p, i] =  r[p, i] - mean_i r[p, :]                                 scale="none" (Dr. GRPO)

BPO's choice (arXiv 2508.21113, R-4B): the group is ALL 2G responses of a prompt, both modes together, so
a thinking response is scored against the non-thinking ones of the same question and the other way
round: on a question that needs steps the thinking rollouts win (positive advantages) and the
non-thinking ones lose; on one that does not, both are right and the advantages are ~0 (or the shorter
mode wins once a length-sensitive reward is used). ``std`` is the sample standard deviation (n - 1), as
GRPO / TRL compute it; a group whose rewards are all equal gets advantage 0 everywhere (nothing to learn).
Dr. GRPO (arXiv 2503.20783) drops the std division: it up-weights questions that are nearly always solved
or failed; ``scale="none"`` is that option.

How a sequence's per-token losses are summed (``token_weights``; the weights of one optimizer step sum to
1 over every token it trains, so splitting the step into micro-batches gives exactly the same gradient):

    "sequence"  GRPO:        (1 / N) sum_i (1 / |o_i|) sum_t l[i, t]   each response counts once
    "token"     DAPO:        (1 / sum_i |o_i|) sum_i sum_t l[i, t]     each token counts once (long responses weigh more)
    "constant"  Dr. GRPO:    (1 / (N * L)) sum_i sum_t l[i, t]         L a fixed length (no length bias)

N = responses in the step, |o_i| = response i's trained tokens.
"""

from __future__ import annotations

import torch

SCALES = ("std", "none")
AGGREGATIONS = ("sequence", "token", "constant")


def group_advantages(rewards: torch.Tensor, scale: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """rewards [P, 2G] (one row per prompt, all its responses) -> advantages [P, 2G] (fp32)."""
    if scale not in SCALES:
        raise ValueError(f"advantage scale must be one of {SCALES}; got {scale!r}.")
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards should be [prompts, responses per prompt] with at least 2 responses per "
                         f"prompt; got shape {list(rewards.shape)}.")
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)  # std: unbiased (n - 1), as GRPO


def token_weights(mask: torch.Tensor, aggregation: str = "sequence", constant_length: int | None = None) -> torch.Tensor:
    """mask [N, R] (1 = a trained token of the step's response i) -> weights [N, R] whose weighted sum of
    per-token losses is the step's loss (module docstring). ``constant_length``: L of "constant"
    (default: R, the step's widest response)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}; got {aggregation!r}.")
    mask = mask if mask.is_floating_point() else mask.float()
    n = mask.shape[0]
    if aggregation == "sequence":
        lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)  # [N, 1]
        return mask / (lengths * n)
    if aggregation == "token":
        return mask / mask.sum().clamp(min=1)
    length = constant_length if constant_length is not None else mask.shape[1]
    if length < 1:
        raise ValueError(f"constant_length must be >= 1; got {length}.")
    return mask / (n * length)
