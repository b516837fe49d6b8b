"""The in-process backend: every (item, mode) job through r4b's continuous-batching serving engine.

    jobs ──processor (chat template for the mode, images)──► EngineRequest ──engine.submit──► slots
    ◄── finish events (engine thread → a queue) ── decode + split_answer ──► (item, mode, Generation)

At most ``window`` requests are queued or running at once, so images are processed only shortly before a
slot needs them. Greedy unless ``sampling`` says otherwise. The model may carry hooks (a steering vector,
an ablation): the engine calls the model's modules, so they act on every forward. ``max_batch_size=1``
gives the one-prompt-at-a-time baseline.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterable, Iterator

import torch

from r4b_core.eval.benchmark import EvalItem, open_item_images
from r4b_core.eval.generation import Generation, thinking_token_count
from r4b_core.eval.prompts import user_message
from r4b_core.generation_config import SamplingParams
from r4b_core.processing.processor import THINK_END, THINK_START, R4BProcessor
from r4b_core.scoring import split_answer
from r4b_core.serve.engine import Engine, EngineEvent, EngineRequest


class LocalBackend:
    """Generate with ``model`` in this process; ``close()`` (or ``with``) stops the engine thread."""

    def __init__(self, model: torch.nn.Module, processor: R4BProcessor, *, max_new_tokens: int,
                 max_batch_size: int = 8, max_seq_len: int | None = None, sampling: SamplingParams | None = None,
                 max_image_pixels: int | None = None, stop_token_ids: list[int] | None = None) -> None:
        generation_config = processor.generation_config
        pad = generation_config.pad_token_id if generation_config.pad_token_id is not None else processor.pad_token_id
        text_config = getattr(model.config, "text_config", model.config)
        if max_seq_len is None:  # room for a long thinking after a prompt of a few thousand tokens
            max_seq_len = min(text_config.max_position_embeddings, max_new_tokens + 4096)
        self.engine = Engine(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                             max_queue=max(2 * max_batch_size, 4), eos_token_ids=processor.eos_token_ids,
                             pad_token_id=pad).start()
        self.processor, self.max_new_tokens = processor, max_new_tokens
        self.sampling = sampling or SamplingParams()  # temperature 0: greedy
        self.max_image_pixels = max_image_pixels
        self.stop_token_ids = stop_token_ids  # None: the checkpoint's eos ids; [] runs to max_new_tokens (benchmarks)
        self.window = self.engine.max_queue
        self.think_ids = processor.tokenizer.token_to_id(THINK_START), processor.tokenizer.token_to_id(THINK_END)
        self.name = "in-process engine"

    def _request(self, item: EvalItem, mode: str, finished: queue.Queue, key: int) -> EngineRequest:
        images = open_item_images(item, self.max_image_pixels)
        message = user_message(item, [{"type": "image"} for _ in images])
        inputs = self.processor(messages=[message], images=images or None, thinking_mode=mode)
        input_ids = inputs.pop("input_ids")
        inputs.pop("attention_mask", None)
        room = self.engine.max_new_tokens_for(input_ids.shape[1])
        if room < self.max_new_tokens:
            raise ValueError(f"item {item.id}: its prompt ({input_ids.shape[1]} tokens) + --max-new-tokens "
                             f"{self.max_new_tokens} does not fit the engine's {self.engine.max_seq_len}-token "
                             "slots; raise --max-seq-len or lower --max-new-tokens.")

        def on_event(event: EngineEvent) -> None:
            if event.kind == "finish":
                finished.put((key, event.error))

        return EngineRequest(input_ids=input_ids, max_new_tokens=self.max_new_tokens, on_event=on_event,
                             sampling=self.sampling, model_inputs=inputs, stop_token_ids=self.stop_token_ids)

    def _generation(self, request: EngineRequest, mode: str) -> Generation:
        tokens = list(request.tokens)
        text = self.processor.decode(tokens)  # special tokens skipped; <think> / </think> are kept
        split = split_answer(text, thinking_mode=mode)
        seconds = (request.finished_at or time.perf_counter()) - request.submitted_at
        return Generation(split.thinking, split.answer, split.thought, len(tokens),
                          thinking_token_count(tokens, mode, split.thought, *self.think_ids), seconds,
                          request.finish_reason or "error")

    def generate(self, jobs: Iterable[tuple[EvalItem, str]]) -> Iterator[tuple[EvalItem, str, Generation]]:
        """Yield each job's generation as it finishes (completion order, not job order)."""
        pending = iter(jobs)
        finished: queue.Queue[tuple[int, str | None]] = queue.Queue()
        running: dict[int, tuple[EvalItem, str, EngineRequest]] = {}
        key = 0
        try:
            while True:
                while len(running) < self.window:
                    job = next(pending, None)
                    if job is None:
                        break
                    item, mode = job
                    request = self._request(item, mode, finished, key)
                    self.engine.submit(request)
                    running[key] = (item, mode, request)
                    key += 1
                if not running:
                    return
                try:
                    done, error = finished.get(timeout=0.5)
                except queue.Empty:
                    if not self.engine.running:
                        raise RuntimeError("the serving engine stopped while requests were running.") from None
                    continue
                item, mode, request = running.pop(done)
                if request.finish_reason == "error":
                    raise RuntimeError(f"item {item.id} ({mode}): generation failed: {error or 'see the log'}")
                yield item, mode, self._generation(request, mode)
        finally:
            for _, _, request in running.values():  # Ctrl-C or an error: nothing keeps running for us
                request.cancel()

    def close(self) -> None:
        self.engine.stop()

    def __enter__(self) -> "LocalBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
