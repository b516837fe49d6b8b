"""Per-request token picking for the engine: constraints, sampling and log probabilities.

    logits [B, V] of the running requests (row b = requests[b]) ──per row──►
        a token the thinking budget forces (its ``pending`` list)            wins, else
        request.logits_processor(generated ids, fp32 row)  (structured output: disallowed -> -inf)
        stop ids -> -inf while fewer than request.min_new_tokens were generated
        request.sampling with request's own generator (temperature 0: argmax)
    ──► Pick(token, logprob, top_logprobs)

Log probabilities are the log-softmax of the model's raw fp32 logits row, before any processor,
temperature, top-k or top-p (vLLM's default ``logprobs_mode="raw_logprobs"``), taken at the token
finally emitted: a forced token gets its probability under the model too. ``top_logprobs`` are the
``k`` most likely tokens, most likely first (ties: the lower id first, as ``torch.topk`` orders them
on CPU).

Rows that need none of this (greedy, no logprobs, no processor, no min tokens) take the engine's
batched argmax (``greedy``), so a plain greedy step stays one argmax over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from r4b_core.generation.generate import sample_next_token

if TYPE_CHECKING:
    from r4b_core.serve.engine import EngineRequest

TopLogprobs = list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class Pick:
    token: int
    logprob: float | None = None  # None: the request did not ask for logprobs
    top_logprobs: TopLogprobs | None = None
    # set on the prefill's pick of a request with prompt_logprobs (position 0 has none: None)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs | None] | None = None


def _forced(request: "EngineRequest") -> int | None:
    budget = request.thinking_budget
    return budget.pending[0] if budget is not None and budget.pending else None


def _needs_row(request: "EngineRequest") -> bool:
    return (request.sampling.temperature != 0 or request.logprobs is not None or request.logits_processor is not None
            or len(request.tokens) < request.min_new_tokens or _forced(request) is not None)


def top_k_of(logprobs: torch.Tensor, k: int) -> TopLogprobs:
    """The ``k`` largest entries of a [V] logprob row as (id, logprob), largest first."""
    if k <= 0:
        return []
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return list(zip(ids.tolist(), values.tolist()))


def pick_row(logits: torch.Tensor, request: "EngineRequest", eos_token_ids: Sequence[int]) -> Pick:
    """One request's token from its logits row [V]; see the module docstring."""
    raw = logits.float()
    token = _forced(request)
    if token is None:
        row = raw
        if request.logits_processor is not None:
            row = request.logits_processor(list(request.tokens), row.clone())
        if len(request.tokens) < request.min_new_tokens:
            stop_ids = eos_token_ids if request.stop_token_ids is None else request.stop_token_ids
            if stop_ids:
                row = row.clone()
                row[list(stop_ids)] = float("-inf")
        if not torch.isfinite(row).any():  # every token masked (a grammar dead end): fall back to the model
            row = raw
        token = int(sample_next_token(row[None], request.sampling, request._generator)[0])
    if request.logprobs is None:
        return Pick(token)
    logprobs = torch.log_softmax(raw, dim=-1)  # [V]
    return Pick(token, float(logprobs[token]), top_k_of(logprobs, request.logprobs))


def pick_tokens(logits: torch.Tensor, requests: Sequence["EngineRequest | None"], eos_token_ids: Sequence[int],
                greedy: Sequence[int] | None = None) -> list[Pick | None]:
    """Picks for the rows of ``logits`` [B, V] (None where ``requests[b]`` is None). ``greedy``: the rows'
    argmax when the caller already has it on the host (saves a sync), else computed here when needed."""
    picks: list[Pick | None] = []
    for b, request in enumerate(requests):
        if request is None:
            picks.append(None)
        elif _needs_row(request):
            picks.append(pick_row(logits[b], request, eos_token_ids))
        else:
            if greedy is None:
                greedy = logits.argmax(dim=-1).tolist()
            picks.append(Pick(int(greedy[b])))
    return picks


def prompt_logprobs_of(logits: torch.Tensor, input_ids: torch.Tensor,
                       k: int) -> tuple[list[float | None], list[TopLogprobs | None]]:
    """Each prompt token's logprob given the tokens before it, and the top ``k`` there.

    ``logits`` [T, V] of the prompt positions (row i predicts token i + 1), ``input_ids`` [T]. Position 0
    has no prediction: None. Computed in chunks of rows so a long prompt never holds [T, V] in fp32 twice.
    """
    ids = input_ids.tolist()
    values: list[float | None] = [None]
    tops: list[TopLogprobs | None] = [None]
    for start in range(0, len(ids) - 1, 256):
        rows = torch.log_softmax(logits[start:min(start + 256, len(ids) - 1)].float(), dim=-1)  # [c, V]
        targets = torch.tensor(ids[start + 1:start + 1 + rows.shape[0]], device=rows.device)
        values += rows.gather(-1, targets[:, None])[:, 0].tolist()
        tops += [top_k_of(row, k) for row in rows]
    return values, tops
