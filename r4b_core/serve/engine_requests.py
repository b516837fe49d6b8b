"""What crosses the engine's boundary: an ``EngineRequest`` submitted by another thread, the
``EngineEvent`` s its ``on_event`` callback receives on the engine thread, and the engine's refusals
(see serve/engine.py for the threading rules)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from r4b_core.generation.thinking_budget import ThinkingBudget
from r4b_core.generation_config import SamplingParams

__all__ = ["EngineError", "EngineEvent", "EngineRequest", "EngineStoppedError", "QueueFullError"]


class EngineError(RuntimeError):
    """Base class of the engine's refusals."""


class QueueFullError(EngineError):
    """``max_queue`` requests are already waiting."""


class EngineStoppedError(EngineError):
    """The engine is shutting down (or stopped) and admits no new requests."""


@dataclass
class EngineEvent:
    """``kind`` "token" (``token`` set) or "finish" (``finish_reason``: "stop" = a stop id, "length" =
    max_new_tokens, "cancelled" = cancelled or shut down, "error" with ``error`` set)."""

    kind: str
    token: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    logprob: float | None = None  # the token's log-probability (request.logprobs set)
    top_logprobs: list[tuple[int, float]] | None = None
    prompt_logprobs: list | None = None  # on the first token event only (request.prompt_logprobs set)
    prompt_top_logprobs: list | None = None


@dataclass
class EngineRequest:
    """One generation: a tokenized prompt (``input_ids`` [1, T] int64, plus ``model_inputs`` such as
    pixel_values / image_sizes / batch_num_images) and how to decode it."""

    input_ids: torch.Tensor
    max_new_tokens: int
    on_event: Callable[[EngineEvent], None]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    model_inputs: dict[str, Any] = field(default_factory=dict)
    stop_token_ids: Sequence[int] | None = None  # None: the engine's eos ids
    thinking_budget: ThinkingBudget | None = None
    logprobs: int | None = None  # top-k log-probabilities per generated token (0: the chosen token's only)
    prompt_logprobs: int | None = None  # set: log-probabilities of the prompt tokens too
    min_new_tokens: int = 0
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None
    # filled by the engine
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    cached_prompt_tokens: int = 0  # prompt positions taken from the prefix cache
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _generator: torch.Generator | None = field(default=None, repr=False)
    _image_digest: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.input_ids.ndim == 1:
            self.input_ids = self.input_ids[None]
        if self.input_ids.ndim != 2 or self.input_ids.shape[0] != 1 or self.input_ids.shape[1] == 0:
            raise ValueError(f"EngineRequest.input_ids should be one non-empty prompt [1, T]; got shape "
                             f"{tuple(self.input_ids.shape)}.")

    @property
    def prompt_tokens(self) -> int:
        return self.input_ids.shape[1]

    def cancel(self) -> None:
        """Ask the engine to stop this request; its blocks are freed at the next step boundary."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()
