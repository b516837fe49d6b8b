"""Continuous batching over a paged KV cache: one engine thread owns the model.

    submit(request) ──► bounded queue ──► scheduler (serve/scheduler.py): admitted when its prompt's blocks
    fit the pool (cached prefix blocks reused) ──► each step: ONE batched decode forward over the running
    sequences with one pending token + the prefill chunks (packed into one forward), within ``token_budget``
    tokens
    ──► a finished, cancelled or failed request gives its blocks back at once

Memory follows the tokens held: the KV cache is one pool of fixed-size blocks (models/paged_kv_cache.py)
sized by ``kv_cache_tokens`` or ``kv_cache_gb``; a sequence holds ceil(len / block_size) blocks and nothing
for the answer it has not generated yet. Only running sequences are decoded (batch padded up to a bucket,
1, 2, 4, 8, ..., max_batch_size; the attended length bucketed too, serve/model_runner.py), so one client
streams at about generate()'s speed. Full blocks are kept by content hash after their request ends
(serve/block_pool.py: token ids + a digest of the images after preprocessing), so a second turn over the
same image skips the cached prefix, and the image features of recently seen images are kept too (the
vision tower is skipped when a chunk still needs them). When blocks run out the newest running request is
preempted and recomputed later (it loses nothing; its client sees a pause).

A step's prefill chunks run as ONE packed forward (models/packed_prefill.py: chunks end to end in one row,
each attending to its own sequence), so k short prompts admitted together read every weight once, not k
times; a request asking for prompt logprobs keeps a forward of its own.

Exactness: a row's arithmetic now depends on its batch bucket, its attended-length bucket, on prefix-cache
hits, on where its prompt was chunked and on the chunks packed beside it, so a request's greedy tokens alone
and among others agree up to floating-point ties (measured with scripts/measure_agreement.py: BENCHMARKS.md).
``exact=True`` restores the old guarantee: every decode step runs ``max_batch_size`` rows over
``max_seq_len`` slots, prompts are prefilled whole, one per forward, and never taken from the prefix cache,
so a request's tokens do not depend on its neighbours (at the old per-step cost).

Only the engine thread runs forwards. Other threads talk to it through ``submit`` (``QueueFullError`` past
``max_queue`` waiting requests, ``EngineStoppedError`` once shutdown began), ``EngineRequest.cancel()``
(honoured at the next step boundary) and the request's ``on_event`` callback, called on the engine thread
with each ``EngineEvent`` (keep it quick). Token choice (sampling, a thinking budget's forced tokens, C's
logprobs / min_tokens / logits processors) happens in ONE place: ``Engine._pick``.

NaN / Inf logits (a row's fp32 sum, read back with the tokens) finish that request alone with "error"
(``NonFiniteLogitsError``'s message); its private blocks are zeroed and dropped from the prefix cache
before they are reused, since a masked NaN still poisons attention (0 * NaN).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from r4b_core.generation.generate import NonFiniteLogitsError, check_lengths
from r4b_core.models.paged_kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache, kv_bytes_per_token
from r4b_core.serve.block_pool import BlockPool
from r4b_core.serve.engine_requests import EngineEvent, EngineRequest, EngineStoppedError, QueueFullError
from r4b_core.serve.model_runner import ModelRunner, image_digest
from r4b_core.serve.scheduler import Scheduler
from r4b_core.serve.scheduler import Sequence as EngineSequence
from r4b_core.serve.token_picker import pick_tokens, prompt_logprobs_of

# the engine's public surface: the request types live in serve/engine_requests.py
__all__ = ["DEFAULT_KV_CACHE_TOKENS", "DEFAULT_MAX_SEQ_LEN", "DEFAULT_TOKEN_BUDGET", "Engine", "EngineEvent",
           "EngineRequest", "EngineStoppedError", "QueueFullError"]

log = logging.getLogger("r4b.serve")

_COUNTERS = ("prefill_tokens", "cached_prompt_tokens", "generated_tokens", "decode_steps", "prefill_chunks",
             "prefill_forwards", "preemptions", "finished_stop", "finished_length", "finished_cancelled",
             "finished_error")
DEFAULT_MAX_SEQ_LEN = 32768  # prompt + answer per request: an image prompt plus max_tokens=16384 fits
DEFAULT_KV_CACHE_TOKENS = 32768  # the pool: raised to max_seq_len when that is larger
DEFAULT_TOKEN_BUDGET = 512  # tokens per engine step (decode rows + prefill chunks)


def _nonfinite_error(step: int) -> str:
    return (f"{NonFiniteLogitsError.__name__}: generation step {step} (0 = the first new token): the model's logits "
            "hold NaN or Inf, so every token from here would be noise; the request was stopped. Check the weights "
            "(r4b inspect --load) and the dtype (float16 overflows where bfloat16 does not).")


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


class Engine:
    """At most ``max_batch_size`` running requests over one paged KV cache; see the module docstring."""

    def __init__(self, model: torch.nn.Module, *, max_batch_size: int = 8, max_seq_len: int | None = None,
                 max_queue: int = 64, eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                 compile: bool = False, attention_backend: str = "auto", kv_cache_tokens: int | None = None,
                 kv_cache_gb: float | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 token_budget: int = DEFAULT_TOKEN_BUDGET, prefix_caching: bool = True, exact: bool = False,
                 vision_cache_size: int = 8) -> None:
        _positive_int("max_batch_size", max_batch_size)
        _positive_int("max_queue", max_queue)
        _positive_int("block_size", block_size)
        _positive_int("token_budget", token_budget)
        text_config = getattr(model.config, "text_config", model.config)
        self.max_positions = text_config.max_position_embeddings
        if max_seq_len is None:
            max_seq_len = min(DEFAULT_MAX_SEQ_LEN, self.max_positions)
        _positive_int("max_seq_len", max_seq_len, 2)
        if max_seq_len > self.max_positions:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                             f"({self.max_positions}); lower --max-seq-len.")
        if kv_cache_tokens is not None and kv_cache_gb is not None:
            raise ValueError("give at most one of kv_cache_tokens (--kv-cache-tokens) or kv_cache_gb (--kv-cache-gb).")
        parameter = next(p for p in model.parameters() if p.is_floating_point())
        self.model, self.device, self.dtype = model, parameter.device, parameter.dtype
        self.max_batch_size, self.max_seq_len, self.max_queue = max_batch_size, max_seq_len, max_queue
        self.eos_token_ids, self.pad_token_id = [int(i) for i in eos_token_ids], int(pad_token_id)
        self.exact = exact
        if kv_cache_gb is None:
            tokens = kv_cache_tokens if kv_cache_tokens is not None else max(DEFAULT_KV_CACHE_TOKENS, max_seq_len)
            _positive_int("kv_cache_tokens", tokens, block_size)
            self.cache = PagedKVCache.for_model(text_config, num_tokens=tokens, block_size=block_size,
                                                dtype=self.dtype, device=self.device,
                                                attention_backend=attention_backend)
        else:
            self.cache = PagedKVCache.for_model(text_config, memory_gb=kv_cache_gb, block_size=block_size,
                                                dtype=self.dtype, device=self.device,
                                                attention_backend=attention_backend)
        self.kv_bytes_per_token = kv_bytes_per_token(text_config, self.dtype)
        self.pool = BlockPool(self.cache.num_blocks, block_size, prefix_caching=prefix_caching and not exact)
        budget = max(token_budget, max_seq_len) if exact else token_budget
        self.scheduler = Scheduler(self.pool, max_running=max_batch_size, token_budget=max(budget, max_batch_size + 1))
        decode_fn = None
        if compile:
            from r4b_core.generation.generate import compiled_decode_step

            decode_fn = compiled_decode_step(self.device.type)
        self.runner = ModelRunner(model, self.cache, max_batch_size=max_batch_size, pad_token_id=self.pad_token_id,
                                  fixed_batch=exact, fixed_kv_len=max_seq_len if exact else None,
                                  vision_cache_size=vision_cache_size, decode_fn=decode_fn)
        self._queue: collections.deque[EngineRequest] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._active = 0
        self._waiting = 0  # sequences the scheduler holds but does not run (moved from _queue, or preempted)
        self.counters = collections.Counter()  # requests by finish reason, tokens, steps

    # ------------------------------------------------------------------------------------------
    # the caller's side (any thread)

    @property
    def kv_cache_tokens(self) -> int:
        return self.cache.num_tokens

    def check_request(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise ValueError (naming the numbers) when a prompt + max_new_tokens cannot fit."""
        check_lengths(prompt_tokens, max_new_tokens, self.max_seq_len, self.max_positions)
        if prompt_tokens + max_new_tokens - 1 > self.kv_cache_tokens:
            raise ValueError(f"the prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) needs "
                             f"{prompt_tokens + max_new_tokens - 1} KV-cache slots but the server's whole pool "
                             f"holds {self.kv_cache_tokens} (--kv-cache-tokens / --kv-cache-gb).")

    def max_new_tokens_for(self, prompt_tokens: int) -> int:
        """The most tokens a request of this prompt length may generate."""
        return min(self.max_seq_len + 1, self.max_positions, self.kv_cache_tokens + 1) - prompt_tokens

    def start(self) -> "Engine":
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="r4b-engine", daemon=True)
                self._thread.start()
        return self

    def submit(self, request: EngineRequest) -> None:
        """Queue a request (checked first); it is admitted when its prompt's blocks fit."""
        self.check_request(request.prompt_tokens, request.max_new_tokens)
        if request.sampling.seed is not None:
            request._generator = torch.Generator(device=self.device).manual_seed(request.sampling.seed)
        request._image_digest = image_digest(request.model_inputs)
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down and admits no new requests.")
            if len(self._queue) + self._waiting >= self.max_queue:
                raise QueueFullError(f"{len(self._queue) + self._waiting} requests are already waiting (--max-queue "
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
            usage = self.pool.usage()
            return {"slots": self.max_batch_size, "active": self._active, "queued": len(self._queue) + self._waiting,
                    "max_queue": self.max_queue, "max_seq_len": self.max_seq_len, "accepting": self.accepting,
                    "kv_cache_tokens": self.kv_cache_tokens,
                    "kv_cache_bytes": self.cache.nbytes,
                    "kv_cache_used_tokens": usage["blocks_used"] * self.pool.block_size,
                    **{f"kv_{k}": v for k, v in usage.items()},
                    "vision_cache_hits": self.runner.vision_hits, "vision_runs": self.runner.vision_runs,
                    **{k: int(self.counters[k]) for k in _COUNTERS}}

    # ------------------------------------------------------------------------------------------
    # the engine thread

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        with torch.inference_mode():
            while self._wait_for_work():
                self._drop_cancelled()
                self.scheduler.admit()
                self._publish_active()
                plan, preempted = self.scheduler.plan()
                if preempted:
                    self.counters["preemptions"] += len(preempted)
                    log.info("preempted %d request(s): KV blocks ran out", len(preempted))
                if plan.decode:
                    self._decode(plan.decode)
                if plan.prefills:
                    self._prefill(plan.prefills)
                self._publish_active()

    def _publish_active(self) -> None:
        with self._cond:
            self._active, self._waiting = len(self.scheduler.running), len(self.scheduler.waiting)

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; move new requests to the scheduler. False: exit."""
        sched = self.scheduler
        expired: list[EngineRequest] = []
        exit_now = False
        with self._cond:
            while True:
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    expired = [*self._queue, *(s.request for s in (*sched.waiting, *sched.running))]
                    self._queue.clear()
                    for seq in list(sched.running):
                        sched.release(seq)
                    sched.waiting.clear()
                if sched.running or self._queue or sched.waiting:
                    break
                if self._stopping:
                    exit_now = True
                    break
                self._cond.wait(timeout=0.05 if self._stopping else None)
            while self._queue:
                request = self._queue.popleft()
                if request.cancelled:
                    expired.append(request)
                    continue
                prompt = request.input_ids[0].tolist()
                seq = EngineSequence(request, list(prompt), len(prompt))
                if request._image_digest is not None and self.runner.image_token_id in prompt:
                    seq.image_starts[prompt.index(self.runner.image_token_id)] = request._image_digest
                sched.waiting.append(seq)
            self._active, self._waiting = len(sched.running), len(sched.waiting)
        for request in expired:
            error = "the server shut down before the request finished" if self._stopping else None
            self._finish(request, "cancelled", error=error)
        return not exit_now

    def _drop_cancelled(self) -> None:
        sched = self.scheduler
        for seq in [*sched.running, *sched.waiting]:
            if seq.request.cancelled:
                if seq in sched.waiting:
                    sched.waiting.remove(seq)
                self._finish(seq.request, "cancelled", seq)

    def _prefill(self, chunks: list[tuple[EngineSequence, int]]) -> None:
        """This step's prefill chunks: those that need only their last logits go through ONE packed forward
        (serve/model_runner.py ``prefill_packed``; a lone chunk too: one path for every chunk); a request
        asking for prompt logprobs, and every chunk in exact mode, gets a forward of its own. A packed
        forward of several chunks that raises is retried chunk by chunk, so only the request at fault fails."""
        alone = [(s, e) for s, e in chunks if s in self.scheduler.running]
        packed = [] if self.exact else [(s, e) for s, e in alone if s.request.prompt_logprobs is None]
        if packed:
            try:
                logits = self.runner.prefill_packed(packed)  # [k, V]
            except Exception:
                if len(packed) > 1:
                    log.warning("a packed prefill of %d chunks failed; retrying them one at a time", len(packed),
                                exc_info=True)
            else:
                self.counters["prefill_forwards"] += 1
                for (seq, end), row in zip(packed, logits):
                    self._prefilled(seq, end, row[None], all_logits=False)
                alone = [chunk for chunk in alone if chunk not in packed]
        for seq, end in alone:  # a forward each (one request's failure finishes that request only)
            self._prefill_one(seq, end)

    def _note_cached_prefix(self, seq: EngineSequence) -> None:
        if seq.num_computed == seq.cached_tokens and seq.preemptions == 0:  # its first chunk
            seq.request.cached_prompt_tokens = seq.cached_tokens
            self.counters["cached_prompt_tokens"] += seq.cached_tokens

    def _prefill_one(self, seq: EngineSequence, end: int) -> None:
        all_logits = seq.request.prompt_logprobs is not None
        try:
            logits = self.runner.prefill(seq, end, all_logits=all_logits)
        except Exception as e:  # a bad request must not take the server down
            log.exception("prefill failed")
            self._finish(seq.request, "error", seq, error=f"{type(e).__name__}: {e}")
            return
        self.counters["prefill_forwards"] += 1
        self._prefilled(seq, end, logits, all_logits)

    def _prefilled(self, seq: EngineSequence, end: int, logits: torch.Tensor, all_logits: bool) -> None:
        """token_ids[num_computed:end] of ``seq`` are in its blocks; ``logits`` [1, V] of the chunk's last token
        ([T_chunk, V] with ``all_logits``). The last chunk of a prompt picks the first token."""
        request = seq.request
        self._note_cached_prefix(seq)
        n = end - seq.num_computed
        self.scheduler.computed(seq, n)
        self.counters["prefill_tokens"] += n
        self.counters["prefill_chunks"] += 1
        if all_logits and not request.tokens:
            seq.prompt_logits.append(logits)  # [T_chunk, V]
        if end < len(seq.token_ids):
            return  # more chunks to come
        last = logits[-1:] if all_logits else logits  # [1, V]
        if not torch.isfinite(last.sum(dtype=torch.float32)).item():
            log.warning("request stopped: non-finite logits at its prefill")
            self._fail_nonfinite(seq, step=len(request.tokens))
            return
        self._pick([seq], last, first_event=self._prompt_logprobs_event(seq))

    @staticmethod
    def _prompt_logprobs_event(seq: EngineSequence) -> EngineEvent | None:
        """The first token event carrying the prompt's log-probabilities (request.prompt_logprobs set)."""
        if not seq.prompt_logits:
            return None
        logits = torch.cat(seq.prompt_logits)  # [T, V]
        seq.prompt_logits = []
        ids = torch.tensor(seq.token_ids[:seq.prompt_len])
        logprobs, top = prompt_logprobs_of(logits[:seq.prompt_len], ids, seq.request.prompt_logprobs)
        return EngineEvent("token", prompt_logprobs=logprobs, prompt_top_logprobs=top)

    def _decode(self, seqs: list[EngineSequence]) -> None:
        try:
            logits = self.runner.decode(seqs)  # [n, V]
            nonfinite = (~torch.isfinite(logits.sum(dim=-1, dtype=torch.float32))).tolist()
        except Exception as e:
            log.exception("decode step failed")
            for seq in seqs:
                self._finish(seq.request, "error", seq, error=f"{type(e).__name__}: {e}")
            return
        self.counters["decode_steps"] += 1
        healthy, rows = [], []
        for i, seq in enumerate(seqs):
            self.scheduler.computed(seq, 1)
            if nonfinite[i]:
                log.warning("a request stopped: non-finite logits")
                self._fail_nonfinite(seq, step=len(seq.request.tokens))
            else:
                healthy.append(seq)
                rows.append(i)
        if healthy:
            self._pick(healthy, logits[rows] if len(rows) != len(seqs) else logits)

    def _pick(self, seqs: list[EngineSequence], logits: torch.Tensor, first_event: EngineEvent | None = None) -> None:
        """THE place where tokens are chosen: one row of ``logits`` [n, V] per sequence, through
        serve/token_picker.py (thinking-budget forcing, logits processors, min tokens, sampling, logprobs).
        ``first_event``: a prefilled event for a single sequence's first token (its prompt logprobs)."""
        picks = pick_tokens(logits, [s.request for s in seqs], self.eos_token_ids)
        for seq, pick in zip(seqs, picks):
            event = first_event or EngineEvent("token")
            event.logprob, event.top_logprobs = pick.logprob, pick.top_logprobs
            self._accept_token(seq, pick.token, event)

    def _accept_token(self, seq: EngineSequence, token: int, event: EngineEvent | None = None) -> None:
        request = seq.request
        if request.thinking_budget is not None:
            token = request.thinking_budget(token)  # a forced </think> or separator replaces the sample
        request.tokens.append(token)
        seq.token_ids.append(token)
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        self.counters["generated_tokens"] += 1
        event = event or EngineEvent("token")
        event.token = token
        self._emit(request, event)
        stop_ids = self.eos_token_ids if request.stop_token_ids is None else request.stop_token_ids
        if token in stop_ids:
            self._finish(request, "stop", seq)
        elif len(request.tokens) >= request.max_new_tokens:
            self._finish(request, "length", seq)
        elif request.cancelled:
            self._finish(request, "cancelled", seq)

    def _fail_nonfinite(self, seq: EngineSequence, step: int) -> None:
        """Finish with "error"; zero the blocks only this request holds (a masked NaN poisons attention, 0 * NaN)
        and keep them out of the prefix cache."""
        private = [b for b in seq.blocks if self.pool.ref_count[b] == 1]
        self.cache.zero_blocks(private)
        self._finish(seq.request, "error", seq, error=_nonfinite_error(step), forget=True)

    def _finish(self, request: EngineRequest, reason: str, seq: EngineSequence | None = None,
                error: str | None = None, forget: bool = False) -> None:
        if seq is not None:
            self.scheduler.release(seq, forget=forget)
            self._publish_active()  # before the finish event: a listener may read stats() at once
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
