"""Log-probabilities of response tokens under the training forward (images included).

    batch layout (one row per rollout; the layout generation uses, so positions agree):

        [pad pad p p p p | r r r r pad]      input_ids = cat(prompt_ids, response_ids)  [B, Tp + R]
         left-padded prompt  right-padded response
                           ^ response_start = Tp (the same column for every row)

    logits = model(input_ids, attention_mask, images, logits_to_keep=R + 1)     [B, R + 1, V]
    logp[b, j] = log_softmax(logits[b, j] / temperature)[response_ids[b, j]]   [B, R]  (0 where masked)

A token's position is the number of real tokens before it (the model reads it from ``attention_mask``),
so the left padding does not change the logits: these are the log-probs the sampler drew from (equal to
it within float rounding; tests/test_bpo_logprobs.py: <= 1e-5 in fp32). Only the last ``R + 1`` positions
go through ``lm_head``, so a step never builds the [B, T, V] logits of the prompt (a 151,936-token
vocabulary makes those the largest tensor of a step). The forward is the model's own ``forward`` (no
sub-module calls), so FSDP2's root hooks run, activation checkpointing and compiled blocks apply.

``temperature``: the policy whose probabilities the objective uses is softmax(logits / temperature), the
distribution the rollouts were sampled from (TRL and verl divide by the sampling temperature too).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

IMAGE_KEYS = ("pixel_values", "image_sizes", "batch_num_images")


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [..., V] and token ids [...] -> log p(token) [...] in fp32 (log-softmax over V)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probabilities (got {temperature}); greedy decoding "
                         "has no sampling distribution.")
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    return scaled.log_softmax(dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def response_logprobs(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      response_ids: torch.Tensor, response_mask: torch.Tensor, *, temperature: float = 1.0,
                      images: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Per-token log-probs [B, R] (fp32) of ``response_ids`` [B, R] after ``prompt_ids`` [B, Tp].

    ``prompt_ids`` are left-padded (``prompt_mask`` [B, Tp], 1 = real), ``response_ids`` right-padded
    (``response_mask`` [B, R], 1 = a response token). Positions outside ``response_mask`` are 0.
    ``images``: ``pixel_values`` / ``image_sizes`` / ``batch_num_images`` of the rows, as the processor
    and ``training.data.collate`` make them. Gradients flow (call under ``torch.no_grad()`` for old or
    reference log-probs).
    """
    if prompt_ids.shape[0] != response_ids.shape[0] or prompt_ids.shape != prompt_mask.shape \
            or response_ids.shape != response_mask.shape:
        raise ValueError(f"response_logprobs: prompt_ids {list(prompt_ids.shape)}, prompt_mask "
                         f"{list(prompt_mask.shape)}, response_ids {list(response_ids.shape)} and response_mask "
                         f"{list(response_mask.shape)} should be [B, Tp], [B, Tp], [B, R], [B, R].")
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("response_logprobs: the prompts must be LEFT-padded (every row's last prompt column "
                         "real), so that all responses start at the same column.")
    width = response_ids.shape[1]
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # [B, Tp + R]
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).to(torch.long)
    extra = {k: v for k, v in (images or {}).items() if k in IMAGE_KEYS and v is not None}
    logits = model(input_ids, attention_mask=attention_mask, logits_to_keep=width + 1, **extra).logits
    # logits [B, R + 1, V]: column j predicts response token j (the last one predicts past the end)
    logp = token_logprobs(logits[:, :-1], response_ids.to(logits.device), temperature)  # [B, R]
    return logp * response_mask.to(logp.device, logp.dtype)
