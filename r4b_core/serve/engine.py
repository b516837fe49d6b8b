"""Continuous batching over the static KV cache: one engine thread owns the model.

    submit(request) ──► bounded queue ──(a free slot, at a step boundary)──► prefill alone into the
    slot's cache row ──► decode steps: every slot's next token [B, 1] through the whole cache at once
    ──► a finished or cancelled request frees its slot at once; the next queued one is admitted at
    the next boundary

Slots are the rows of one ``KVCache`` [L, B, H_kv, S, D] (B = ``max_batch_size``, S = ``max_seq_len``).
A request is prefilled on its own through ``KVCache.row(slot)`` (a batch-1 view of that row), so its
prompt never waits for, nor pads against, the others. The decode step always runs all B rows, so its
shapes are static (it can be compiled) and a row's arithmetic does not depend on how many rows are
busy: a request's greedy tokens are the same alone or among others. A free row is "parked" before
every step: its length is set to 0, so it writes its pad token into its own slot 0 and attends to that
slot only; it never touches another row and never overflows.

Only the engine thread runs forwards. Other threads talk to it through ``submit`` (which raises
``QueueFullError`` past ``max_queue`` waiting requests and ``EngineStoppedError`` once shutdown began),
``EngineRequest.cancel()`` (honoured at the next step boundary) and the request's ``on_event`` callback,
which the engine thread calls with each ``EngineEvent`` (keep it quick: hand the event to your own
thread or event loop). Per request: its own sampling parameters and seeded generator, stop ids,
``max_new_tokens`` and an optional ``ThinkingBudget`` whose forced tokens replace the sampled ones.

NaN / Inf logits (as generate() checks them: a row's fp32 sum, read back with the tokens in the host sync
each step already has) finish that request alone with "error" (``NonFiniteLogitsError``'s message); its
cache row is zeroed before the slot is reused, since masked-out slots must not hold NaN.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from r4b_core.generation.generate import (
    NonFiniteLogitsError,
    check_lengths,
    compiled_decode_step,
    decode_step,
    prefill,
    sample_next_token,
)
from r4b_core.generation_config import SamplingParams
from r4b_core.models.kv_cache import KVCache
from r4b_core.generation.thinking_budget import ThinkingBudget

log = logging.getLogger("r4b.serve")

_COUNTERS = ("prefill_tokens", "generated_tokens", "decode_steps", "finished_stop", "finished_length",
             "finished_cancelled", "finished_error")
DEFAULT_MAX_SEQ_LEN = 4096  # the SDPA decode step attends over all S slots: a larger cache is slower per step


def _nonfinite_error(step: int) -> str:
    return (f"{NonFiniteLogitsError.__name__}: generation step {step} (0 = the first new token): the model's logits "
            "hold NaN or Inf, so every token from here would be noise; the request was stopped. Check the weights "
            "(r4b inspect --load) and the dtype (float16 overflows where bfloat16 does not).")


class EngineError(RuntimeError):
    """Base class of the engine's refusals."""


class QueueFullError(EngineError):
    """``max_queue`` requests are already waiting for a slot."""


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
    # filled by the engine
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _generator: torch.Generator | None = field(default=None, repr=False)

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
        """Ask the engine to stop this request; its slot is freed at the next step boundary."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


class Engine:
    """``max_batch_size`` slots over one static KV cache; see the module docstring."""

    def __init__(self, model: torch.nn.Module, *, max_batch_size: int = 8, max_seq_len: int | None = None,
                 max_queue: int = 64, eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                 compile: bool = False, attention_backend: str = "auto") -> None:
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        text_config = getattr(model.config, "text_config", model.config)
        self.max_positions = text_config.max_position_embeddings
        if max_seq_len is None:
            max_seq_len = min(DEFAULT_MAX_SEQ_LEN, self.max_positions)
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}.")
        if max_seq_len > self.max_positions:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                             f"({self.max_positions}); lower --max-seq-len.")
        parameter = next(p for p in model.parameters() if p.is_floating_point())
        self.model, self.device, self.dtype = model, parameter.device, parameter.dtype
        self.max_batch_size, self.max_seq_len, self.max_queue = max_batch_size, max_seq_len, max_queue
        self.eos_token_ids, self.pad_token_id = [int(i) for i in eos_token_ids], int(pad_token_id)
        self.cache = KVCache.for_model(text_config, max_batch_size, max_seq_len, dtype=self.dtype, device=self.device,
                                       attention_backend=attention_backend)
        self._decode = compiled_decode_step(self.device.type) if compile else decode_step
        if compile and self.device.type == "cuda":  # CUDA graphs need the cache at fixed addresses
            for t in (self.cache.k, self.cache.v, self.cache.seq_lens):
                torch._dynamo.mark_static_address(t)
        self._slots: list[EngineRequest | None] = [None] * max_batch_size
        self._next_token = [self.pad_token_id] * max_batch_size  # what each slot feeds the next decode step
        self._queue: collections.deque[EngineRequest] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self.counters = collections.Counter()  # requests by finish reason, tokens, decode steps

    # ------------------------------------------------------------------------------------------
    # the caller's side (any thread)

    def check_request(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise ValueError (naming the numbers) when a prompt + max_new_tokens cannot fit a slot."""
        check_lengths(prompt_tokens, max_new_tokens, self.max_seq_len, self.max_positions)

    def max_new_tokens_for(self, prompt_tokens: int) -> int:
        """The most tokens a request of this prompt length may generate (the rest of its slot)."""
        return min(self.max_seq_len + 1, self.max_positions) - prompt_tokens

    def start(self) -> "Engine":
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="r4b-engine", daemon=True)
                self._thread.start()
        return self

    def submit(self, request: EngineRequest) -> None:
        """Queue a request (checked first); it is admitted when a slot is free."""
        self.check_request(request.prompt_tokens, request.max_new_tokens)
        if request.sampling.seed is not None:
            request._generator = torch.Generator(device=self.device).manual_seed(request.sampling.seed)
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down and admits no new requests.")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are already waiting (--max-queue "
                                     f"{self.max_queue}); retry later.")
            request.submitted_at = time.perf_counter()
            self._queue.append(request)
            self._cond.notify()

    def begin_shutdown(self, deadline_s: float) -> None:
        """Admit nothing new; finish queued and running requests, cancelling what remains after ``deadline_s``."""
        with self._cond:
            deadline = time.monotonic() + max(deadline_s, 0.0)
            self._stopping = True
            self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
            self._cond.notify()

    def stop(self, deadline_s: float = 0.0, join_timeout_s: float | None = 30.0) -> None:
        """``begin_shutdown(deadline_s)`` and wait for the engine thread to end."""
        self.begin_shutdown(deadline_s)
        if self._thread is not None:
            self._thread.join(join_timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self.running and not self._stopping

    def stats(self) -> dict[str, Any]:
        with self._cond:
            active = sum(r is not None for r in self._slots)
            return {"slots": self.max_batch_size, "active": active, "queued": len(self._queue),
                    "max_queue": self.max_queue, "max_seq_len": self.max_seq_len, "accepting": self.accepting,
                    **{k: int(self.counters[k]) for k in _COUNTERS}}

    # ------------------------------------------------------------------------------------------
    # the engine thread

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        with torch.inference_mode():
            while True:
                admitted = self._wait_for_work()
                if admitted is None:
                    return
                for slot, request in admitted:
                    self._prefill(slot, request)
                self._drop_cancelled()
                if any(r is not None for r in self._slots):
                    self._decode_step()

    def _wait_for_work(self) -> list[tuple[int, EngineRequest]] | None:
        """Block until there is something to do; admit queued requests into free slots. None: exit."""
        expired: list[EngineRequest] = []
        exit_now = False
        with self._cond:
            while True:
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    expired = [*self._queue, *(r for r in self._slots if r is not None)]
                    self._queue.clear()
                    self._slots = [None] * self.max_batch_size
                    self._next_token = [self.pad_token_id] * self.max_batch_size
                busy = any(r is not None for r in self._slots)
                if busy or (self._queue and None in self._slots):
                    break
                if self._stopping and not self._queue:
                    exit_now = True
                    break
                self._cond.wait(timeout=0.05 if self._stopping else None)
            admitted = []
            while self._queue and None in self._slots:
                request = self._queue.popleft()
                if request.cancelled:
                    expired.append(request)
                    continue
                slot = self._slots.index(None)
                self._slots[slot] = request
                admitted.append((slot, request))
        for request in expired:
            error = "the server shut down before the request finished" if self._stopping else None
            self._finish(request, "cancelled", slot=None, error=error)
        return None if exit_now else admitted

    def _prefill(self, slot: int, request: EngineRequest) -> None:
        row = self.cache.row(slot)
        row.seq_lens.zero_()
        inputs = dict(request.model_inputs)
        if inputs.get("pixel_values") is not None:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.device, self.dtype)
        try:
            logits = prefill(self.model, request.input_ids.to(self.device), row, **inputs)  # [1, V]
            # checked before sampling (multinomial refuses NaN); the fp32 sum is NaN / Inf iff the row holds one
            finite = math.isfinite(logits.sum(dtype=torch.float32).item())
            token = int(sample_next_token(logits, request.sampling, request._generator)[0]) if finite else -1
        except Exception as e:  # a bad request must not take the server down
            log.exception("prefill failed")
            self._finish(request, "error", slot, error=f"{type(e).__name__}: {e}")
            return
        if not finite:
            log.warning("request stopped: non-finite logits at its prefill")
            self._fail_nonfinite(slot, request, step=0)
            return
        self.counters["prefill_tokens"] += request.prompt_tokens
        self._accept_token(slot, request, token)

    def _decode_step(self) -> None:
        busy = [r is not None for r in self._slots]
        idle = torch.tensor([not b for b in busy], device=self.device)
        self.cache.seq_lens.masked_fill_(idle, 0)  # park free rows: slot 0 of their own row only
        tokens = torch.tensor(self._next_token, dtype=torch.int64, device=self.device)[:, None]  # [B, 1]
        try:
            logits = self._decode(self.model, tokens, self.cache)  # [B, V]
            # argmax and each row's non-finite flag, read back together (the step's one host sync)
            nonfinite = ~torch.isfinite(logits.sum(dim=-1, dtype=torch.float32))  # [B]
            greedy, bad = torch.stack([logits.argmax(dim=-1), nonfinite.long()]).tolist()
            chosen = {}
            for slot, request in enumerate(self._slots):
                if request is None:
                    continue
                if bad[slot]:
                    log.warning("request in slot %d stopped: non-finite logits", slot)
                    self._fail_nonfinite(slot, request, step=len(request.tokens))
                    continue
                if request.sampling.temperature == 0:
                    chosen[slot] = greedy[slot]
                else:
                    chosen[slot] = int(sample_next_token(logits[slot:slot + 1], request.sampling,
                                                         request._generator)[0])
        except Exception as e:
            log.exception("decode step failed")
            for slot, request in enumerate(self._slots):
                if request is not None:
                    self._finish(request, "error", slot, error=f"{type(e).__name__}: {e}")
            return
        self.counters["decode_steps"] += 1
        for slot, token in chosen.items():
            self._accept_token(slot, self._slots[slot], token)

    def _accept_token(self, slot: int, request: EngineRequest, token: int) -> None:
        if request.thinking_budget is not None:
            token = request.thinking_budget(token)  # a forced </think> or separator replaces the sample
        request.tokens.append(token)
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        self.counters["generated_tokens"] += 1
        self._emit(request, EngineEvent("token", token=token))
        stop_ids = self.eos_token_ids if request.stop_token_ids is None else request.stop_token_ids
        if token in stop_ids:
            self._finish(request, "stop", slot)
        elif len(request.tokens) >= request.max_new_tokens:
            self._finish(request, "length", slot)
        elif request.cancelled:
            self._finish(request, "cancelled", slot)
        else:
            self._next_token[slot] = token

    def _fail_nonfinite(self, slot: int, request: EngineRequest, step: int) -> None:
        """Finish ``request`` with "error" and zero its cache row: the next request in the slot masks those
        positions out, but a masked NaN still poisons attention (0 * NaN)."""
        self.cache.k[:, slot].zero_()
        self.cache.v[:, slot].zero_()
        self._finish(request, "error", slot, error=_nonfinite_error(step))

    def _drop_cancelled(self) -> None:
        for slot, request in enumerate(self._slots):
            if request is not None and request.cancelled:
                self._finish(request, "cancelled", slot)

    def _finish(self, request: EngineRequest, reason: str, slot: int | None, error: str | None = None) -> None:
        if slot is not None:
            with self._cond:
                if self._slots[slot] is request:
                    self._slots[slot] = None
                    self._next_token[slot] = self.pad_token_id
        if request.finish_reason is not None:
            return
        request.finish_reason, request.finished_at = reason, time.perf_counter()
        self.counters[f"finished_{reason}"] += 1
        self._emit(request, EngineEvent("finish", finish_reason=reason, error=error))

    @staticmethod
    def _emit(request: EngineRequest, event: EngineEvent) -> None:
        try:
            request.on_event(event)
        except Exception:  # a listener that went away must not stop the engine
            log.debug("on_event raised; the request's listener is gone", exc_info=True)
            request.cancel()
