"""The serve engine's non-finite-logits stop: a request whose logits go NaN (injected through the hooks API
into one row of the decoder's input) finishes with "error" naming NonFiniteLogitsError, its slot is freed
and zeroed, the request beside it is untouched, and the next request in that slot decodes as generate()
does; the same for NaN at the prefill. (generate()'s own check is tested in test_generate.py.)"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import Collector

from r4b_core.generation.generate import generate
from r4b_core.models.hooks import hooks
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.processing.processor import R4BProcessor
from r4b_core.serve.engine import Engine, EngineRequest

POINT = "language_model.model.layers.0.hook_resid_pre"  # NaN here reaches the K/V written to the cache too


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return R4BForConditionalGeneration.from_pretrained(tiny_checkpoint), R4BProcessor.from_pretrained(tiny_checkpoint)


class NaNInjector:
    """A hook that writes NaN into row ``row`` of the decoder input once, at the next forward whose batch
    is ``batch`` (2: a decode step of both running requests; 1 with ``prefill``: a prefill of more than one
    token, not a batch-1 decode step of the engine's other request)."""

    def __init__(self) -> None:
        self.armed: tuple[int, int, bool] | None = None  # (batch, row, prefill)
        self.fired = threading.Event()

    def arm(self, batch: int, row: int, prefill: bool = False) -> None:
        self.fired.clear()
        self.armed = (batch, row, prefill)

    def __call__(self, x: torch.Tensor, name: str) -> torch.Tensor | None:
        if self.armed is None or x.shape[0] != self.armed[0] or (self.armed[2] and x.shape[1] == 1):
            return None
        row = self.armed[1]
        self.armed = None
        x = x.clone()
        x[row] = float("nan")  # [B, T, D]: every position of that row
        self.fired.set()
        return x


def _inputs(processor, text: str) -> torch.Tensor:
    inputs = processor(messages=[{"role": "user", "content": [{"type": "text", "text": text}]}])
    return inputs["input_ids"]


def _request(ids: torch.Tensor, max_new_tokens: int, **kwargs) -> EngineRequest:
    return EngineRequest(ids, max_new_tokens, on_event=Collector(), **kwargs)


def _wait(*requests: EngineRequest, timeout: float = 60.0) -> None:
    for r in requests:
        assert r.on_event.done.wait(timeout), "request did not finish"


def _admit(engine: Engine, request: EngineRequest) -> None:
    engine.submit(request)
    deadline = time.monotonic() + 60
    while not request.tokens and not request.on_event.done.is_set():
        assert time.monotonic() < deadline, "request was not admitted"
        time.sleep(0.001)


def _reference(model, processor, ids: torch.Tensor, max_new_tokens: int, eos=None) -> list[int]:
    eos = processor.eos_token_ids if eos is None else eos
    with torch.no_grad():
        out = generate(model, ids, max_new_tokens=max_new_tokens, eos_token_ids=eos,
                       pad_token_id=processor.pad_token_id)
    return out.tokens[0]


def test_a_nan_request_fails_alone_and_its_slot_serves_the_next(tiny):
    model, processor = tiny
    injector = NaNInjector()
    with hooks(model, [(POINT, injector)]):
        engine = Engine(model, eos_token_ids=processor.eos_token_ids, pad_token_id=processor.pad_token_id,
                        max_batch_size=2, max_seq_len=1024).start()
        try:
            healthy_ids = _inputs(processor, "Describe the picture.")
            healthy = _request(healthy_ids, 1000, stop_token_ids=[])  # runs until cancelled: slot 0 stays busy
            _admit(engine, healthy)
            poisoned = _request(_inputs(processor, "Count the shapes, please."), 200, stop_token_ids=[])
            _admit(engine, poisoned)  # slot 1
            injector.arm(batch=2, row=1)
            _wait(poisoned)
            assert injector.fired.is_set()
            finish = poisoned.on_event.finish()
            assert poisoned.finish_reason == "error" and finish.finish_reason == "error"
            assert "NonFiniteLogitsError" in finish.error and "NaN or Inf" in finish.error
            assert 0 < len(poisoned.tokens) < 200
            assert not healthy.on_event.done.is_set()  # the request beside it goes on

            # the next request takes the freed slot 1; stale NaN K/V there would poison it (masked 0 * NaN)
            after_ids = _inputs(processor, "What colour is the square?")
            after = _request(after_ids, 24)
            engine.submit(after)
            _wait(after)
            assert after.finish_reason in ("stop", "length")
            assert not healthy.on_event.done.is_set()  # so `after` did run in slot 1

            # NaN at the prefill: refused at step 0, before any token
            at_prefill = _request(_inputs(processor, "And the circle?"), 8)
            injector.arm(batch=1, row=0, prefill=True)
            engine.submit(at_prefill)
            _wait(at_prefill)
            assert at_prefill.finish_reason == "error" and at_prefill.tokens == []
            assert "step 0" in at_prefill.on_event.finish().error

            healthy.cancel()
            _wait(healthy)
            stats = engine.stats()
            assert stats["finished_error"] == 2 and stats["active"] == 0 and engine.accepting
        finally:
            engine.stop()
    assert after.tokens == _reference(model, processor, after_ids, 24)
    assert len(healthy.tokens) > 1
    assert healthy.tokens == _reference(model, processor, healthy_ids, len(healthy.tokens), eos=[])
