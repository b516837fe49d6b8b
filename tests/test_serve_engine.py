"""The continuous-batching engine without HTTP: KVCache.row, tokens equal generate()'s, a request alone
equals the same request among 7 others, slots freed at once (finish, cancel), the bounded queue, and
shutdown with a deadline. (The thinking budget's tests are in test_serve_thinking_budget.py.)"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import Collector, picture

from r4b_core.generation.generate import SamplingParams, generate
from r4b_core.models.kv_cache import KVCache
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.processing.processor import R4BProcessor
from r4b_core.serve.engine import Engine, EngineRequest, EngineStoppedError, QueueFullError


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    directory = tiny_checkpoint  # the session's shared one (conftest.py): read-only; the model is this file's own
    return R4BForConditionalGeneration.from_pretrained(directory), R4BProcessor.from_pretrained(directory)


def _engine(model, processor, **kwargs) -> Engine:
    kwargs.setdefault("max_seq_len", 384)
    return Engine(model, eos_token_ids=processor.eos_token_ids, pad_token_id=processor.pad_token_id, **kwargs).start()


def _prompt(processor, text: str, images=None, thinking_mode: str = "auto") -> dict:
    content = [{"type": "image"} for _ in images or []] + [{"type": "text", "text": text}]
    inputs = processor(messages=[{"role": "user", "content": content}], images=images, thinking_mode=thinking_mode)
    inputs.pop("attention_mask")
    return inputs


def _request(inputs: dict, max_new_tokens: int, **kwargs) -> EngineRequest:
    inputs = dict(inputs)
    ids = inputs.pop("input_ids")
    return EngineRequest(ids, max_new_tokens, on_event=Collector(), model_inputs=inputs, **kwargs)


def _wait(*requests: EngineRequest, timeout: float = 60.0) -> None:
    for r in requests:
        assert r.on_event.done.wait(timeout), "request did not finish"


def _admit(engine: Engine, request: EngineRequest) -> None:
    """Submit and wait until the request runs (has its first token)."""
    engine.submit(request)
    while not request.tokens and not request.on_event.done.is_set():
        time.sleep(0.001)


def _reference(model, processor, inputs: dict, max_new_tokens: int, **kwargs) -> list[int]:
    inputs = dict(inputs)
    ids = inputs.pop("input_ids")
    out = generate(model, ids, max_new_tokens=max_new_tokens, eos_token_ids=processor.eos_token_ids,
                   pad_token_id=processor.pad_token_id, **kwargs, **inputs)
    return out.tokens[0]


# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_kv_cache_row_is_a_view_of_one_sequence(tiny):
    model, processor = tiny
    text = model.config.text_config
    ids = _prompt(processor, "Describe the picture.")["input_ids"]
    alone = KVCache.for_model(text, 1, 64)
    expected = model(ids, kv_cache=alone, logits_to_keep=1).logits
    shared = KVCache.for_model(text, 3, 64)
    row = shared.row(1)
    assert row.batch_size == 1 and row.capacity == 64 and row.decode_backend == shared.decode_backend
    got = model(ids, kv_cache=row, logits_to_keep=1).logits
    assert torch.equal(got, expected)
    assert shared.seq_lens.tolist() == [0, ids.shape[1], 0]  # the view's length is the parent's row 1
    n = ids.shape[1]
    assert torch.equal(shared.k[:, 1:2, :, :n], alone.k[:, :, :, :n])
    assert shared.k[:, 0].abs().sum() == 0 and shared.k[:, 2].abs().sum() == 0  # other rows untouched
    with pytest.raises(ValueError, match="index"):
        shared.row(3)


def test_greedy_tokens_equal_generate(tiny):
    model, processor = tiny
    engine = _engine(model, processor, max_batch_size=4, exact=True)  # two at once: exact mode (see below)
    try:
        text = _prompt(processor, "What colour is the square?")
        image = _prompt(processor, "Describe this image.", images=[picture(150, 90, 0)])
        requests = [_request(text, 24), _request(image, 24)]
        for r in requests:
            engine.submit(r)
        _wait(*requests)
        assert requests[0].tokens == _reference(model, processor, text, 24)
        assert requests[1].tokens == _reference(model, processor, image, 24)
        assert requests[0].tokens != requests[1].tokens
        for r in requests:  # generate()'s "eos" is the engine's (and OpenAI's) "stop"
            assert r.finish_reason == ("stop" if r.tokens[-1] in processor.eos_token_ids else "length")
    finally:
        engine.stop()


def test_request_alone_equals_request_among_seven_others(tiny):
    model, processor = tiny
    target = _prompt(processor, "How many circles are there?", images=[picture(120, 70, 3)])
    others = [_prompt(processor, "word " * (3 + 5 * i)) for i in range(7)]
    # exact mode: the bit-for-bit guarantee (the default batches by bucket, so a row's GEMM shapes vary with load)
    engine = _engine(model, processor, max_batch_size=8, exact=True)
    try:
        alone = _request(target, 40)
        engine.submit(alone)
        _wait(alone)
        assert engine.stats()["active"] == 0
        # the others start first with various lengths, the target joins mid-flight, one sampled neighbour
        crowd = [_request(p, 20 + 7 * i) for i, p in enumerate(others[:4])]
        for r in crowd:
            engine.submit(r)
        while not crowd[0].tokens:
            time.sleep(0.001)
        again = _request(target, 40)
        later = [_request(p, 30, sampling=SamplingParams(temperature=0.8, seed=i)) for i, p in enumerate(others[4:])]
        for r in [again, *later]:
            engine.submit(r)
        _wait(again, *crowd, *later)
        assert again.tokens == alone.tokens and len(alone.tokens) == 40
    finally:
        engine.stop()


def test_seeded_sampling_is_the_same_alone_and_batched(tiny):
    model, processor = tiny
    inputs = _prompt(processor, "Let me think step by step.")
    sampling = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=7)
    engine = _engine(model, processor, max_batch_size=4)
    try:
        alone = _request(inputs, 20, sampling=sampling)
        engine.submit(alone)
        _wait(alone)
        batch = [_request(inputs, 20, sampling=sampling), _request(_prompt(processor, "hello"), 20)]
        for r in batch:
            engine.submit(r)
        _wait(*batch)
        assert batch[0].tokens == alone.tokens
        assert alone.tokens == _reference(model, processor, inputs, 20, sampling=sampling)
    finally:
        engine.stop()


def test_finished_and_cancelled_requests_free_their_slots(tiny):
    model, processor = tiny
    engine = _engine(model, processor, max_batch_size=2, max_queue=1)
    try:
        inputs = _prompt(processor, "Count the shapes.")
        short, long = _request(inputs, 3), _request(inputs, 300)
        _admit(engine, short)
        _admit(engine, long)
        _wait(short)
        waiting = _request(inputs, 5)
        engine.submit(waiting)  # admitted into the slot the short request freed, while `long` still runs
        _wait(waiting)
        assert not long.on_event.done.is_set() and engine.stats()["active"] == 1
        long.cancel()
        _wait(long)
        assert long.finish_reason == "cancelled" and 0 < len(long.tokens) < 300
        assert engine.stats()["active"] == 0
        # a full queue refuses; a cancelled queued request is dropped when its turn comes
        blockers = [_request(inputs, 300), _request(inputs, 300)]
        for r in blockers:
            _admit(engine, r)
        queued = _request(inputs, 5)
        engine.submit(queued)
        with pytest.raises(QueueFullError, match="max-queue 1"):
            engine.submit(_request(inputs, 5))
        queued.cancel()
        for r in blockers:
            r.cancel()
        _wait(queued, *blockers)
        assert queued.finish_reason == "cancelled" and queued.tokens == []
    finally:
        engine.stop()


def test_request_length_checks(tiny):
    model, processor = tiny
    engine = Engine(model, max_batch_size=1, max_seq_len=32)
    inputs = _prompt(processor, "hi")
    n = inputs["input_ids"].shape[1]
    assert engine.max_new_tokens_for(n) == 33 - n
    with pytest.raises(ValueError, match="needs a KV cache of"):
        engine.submit(_request(inputs, 34 - n))
    with pytest.raises(ValueError, match="max_seq_len"):
        Engine(model, max_seq_len=10**6)
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(model, max_batch_size=0)


def test_shutdown_finishes_running_work_then_refuses_and_cancels_at_the_deadline(tiny):
    model, processor = tiny
    inputs = _prompt(processor, "Describe the image in detail.")
    engine = _engine(model, processor, max_batch_size=1, max_queue=4)
    running, queued = _request(inputs, 8), _request(inputs, 8)
    engine.submit(running)
    engine.submit(queued)
    engine.begin_shutdown(deadline_s=60)
    with pytest.raises(EngineStoppedError):
        engine.submit(_request(inputs, 8))
    _wait(running, queued)
    assert running.finish_reason == queued.finish_reason == "length"
    engine._thread.join(10)
    assert not engine.running

    engine = _engine(model, processor, max_batch_size=1)
    endless = _request(inputs, 380 - inputs["input_ids"].shape[1])
    engine.submit(endless)
    while not endless.tokens:
        time.sleep(0.001)
    engine.stop(deadline_s=0.05)
    assert not engine.running
    assert endless.finish_reason == "cancelled" and len(endless.tokens) < endless.max_new_tokens
    events = []
    while not endless.on_event.events.empty():
        events.append(endless.on_event.events.get_nowait())
    assert events[-1].kind == "finish" and "shut down" in events[-1].error
