"""Engine v2 on the paged KV cache: a repeated image prompt takes its prefix from the cache and skips the
vision tower; a pool too small for every request at once preempts and recomputes, losing nothing; a
long prompt is prefilled in chunks beside a running stream; blocks go back to the pool; exact mode;
the default engine admits an image prompt plus max_tokens=16384. Every token list is checked against
generate() on the same weights."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import Collector, picture

from r4b_core.config import preset
from r4b_core.generation.generate import generate
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.processing.processor import R4BProcessor
from r4b_core.serve.engine import Engine, EngineRequest


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return R4BForConditionalGeneration.from_pretrained(tiny_checkpoint), R4BProcessor.from_pretrained(tiny_checkpoint)


def _prompt(processor, text: str, images=None) -> dict:
    content = [{"type": "image"} for _ in images or []] + [{"type": "text", "text": text}]
    inputs = processor(messages=[{"role": "user", "content": content}], images=images)
    inputs.pop("attention_mask")
    return inputs


def _request(inputs: dict, max_new_tokens: int, **kwargs) -> EngineRequest:
    inputs = dict(inputs)
    ids = inputs.pop("input_ids")
    return EngineRequest(ids, max_new_tokens, on_event=Collector(), model_inputs=inputs, stop_token_ids=[], **kwargs)


def _run(engine: Engine, *requests: EngineRequest, timeout: float = 120.0) -> None:
    for r in requests:
        engine.submit(r)
    for r in requests:
        assert r.on_event.done.wait(timeout), "request did not finish"
        assert r.finish_reason == "length", r.on_event.finish().error


def _reference(model, processor, inputs: dict, max_new_tokens: int) -> list[int]:
    inputs = dict(inputs)
    ids = inputs.pop("input_ids")
    return generate(model, ids, max_new_tokens=max_new_tokens, eos_token_ids=[],
                    pad_token_id=processor.pad_token_id, **inputs).tokens[0]


def _engine(model, processor, start: bool = True, **kwargs) -> Engine:
    kwargs.setdefault("max_seq_len", 512)
    engine = Engine(model, eos_token_ids=processor.eos_token_ids, pad_token_id=processor.pad_token_id, **kwargs)
    return engine.start() if start else engine


def test_second_turn_over_the_same_image_reuses_blocks_and_features(tiny):
    model, processor = tiny
    inputs = _prompt(processor, "Describe this image in detail.", images=[picture(150, 90, 0)])
    engine = _engine(model, processor, block_size=8)
    try:
        first, second = _request(inputs, 12), _request(inputs, 12)
        _run(engine, first)
        _run(engine, second)
        stats = engine.stats()
    finally:
        engine.stop()
    prompt_len = inputs["input_ids"].shape[1]
    assert first.cached_prompt_tokens == 0
    assert second.cached_prompt_tokens == (prompt_len - 1) // 8 * 8 > prompt_len // 2
    assert stats["vision_runs"] == 1  # the rest of the second prompt holds no image token, or used the cache
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_cached"] > 0
    expected = _reference(model, processor, inputs, 12)
    assert first.tokens == expected and second.tokens == expected


def test_a_small_pool_preempts_and_recomputes_without_losing_anything(tiny):
    model, processor = tiny
    prompts = [_prompt(processor, "word " * (4 + 3 * i)) for i in range(3)]
    lengths = [p["input_ids"].shape[1] for p in prompts]
    new = 40
    # room for about two of the three at full length: the third forces preemption as they grow
    engine = _engine(model, processor, start=False, block_size=8, kv_cache_tokens=2 * (max(lengths) + new) + 8,
                     prefix_caching=False)
    try:
        # all queued before the engine starts: the schedule (and so where preemption falls) is the same every run
        requests = [_request(p, new) for p in prompts]
        for r in requests:
            engine.submit(r)
        engine.start()
        for r in requests:
            assert r.on_event.done.wait(120) and r.finish_reason == "length"
        stats = engine.stats()
    finally:
        engine.stop()
    assert stats["preemptions"] > 0 and stats["finished_length"] == 3 and stats["finished_error"] == 0
    for r, p in zip(requests, prompts):
        assert len(r.tokens) == new and [e.token for e in r.on_event.events.queue if e.kind == "token"] == r.tokens  # streamed once each
        assert r.tokens == _reference(model, processor, p, new)


def test_a_long_prompt_is_prefilled_in_chunks_beside_a_running_stream(tiny):
    model, processor = tiny
    running = _prompt(processor, "Count to ten.")
    image = _prompt(processor, "What is in the picture?", images=[picture(200, 120, 1)])
    engine = _engine(model, processor, token_budget=24, prefix_caching=False)
    try:
        stream = _request(running, 60)
        engine.submit(stream)
        while not stream.tokens:
            time.sleep(0.001)
        long = _request(image, 8)
        before = len(stream.tokens)
        engine.submit(long)
        while not long.tokens and not long.on_event.done.is_set():
            time.sleep(0.0005)
        during = len(stream.tokens) - before  # the stream's tokens while the long prompt was prefilled
        for r in (long, stream):
            assert r.on_event.done.wait(120) and r.finish_reason == "length"
        stats = engine.stats()
    finally:
        engine.stop()
    chunks = -(-image["input_ids"].shape[1] // 23)  # 24 tokens a step, one of them the stream's decode row
    assert stats["prefill_chunks"] >= chunks >= 3
    assert during >= chunks - 2  # the stream kept decoding, one token per chunk (not stalled for the whole prefill)
    # batched with the long request, the stream's rows run through other GEMM shapes than generate()'s
    # batch 1, so only the long request (prefilled alone, in chunks) is compared token for token here;
    # exact mode (below) is the bit-for-bit guarantee
    assert long.tokens == _reference(model, processor, image, 8)
    assert len(stream.tokens) == 60


def test_exact_mode_decodes_every_row_over_the_whole_length(tiny):
    model, processor = tiny
    inputs = _prompt(processor, "Say something.")
    engine = _engine(model, processor, max_batch_size=3, max_seq_len=128, exact=True)
    try:
        alone = _request(inputs, 16)
        _run(engine, alone)
        crowd = [_request(inputs, 16), _request(_prompt(processor, "hello there"), 16)]
        _run(engine, *crowd)
    finally:
        engine.stop()
    assert engine.runner.buckets == (3,) and engine.runner.fixed_kv_len == 128 and not engine.pool.prefix_caching
    assert alone.tokens == crowd[0].tokens == _reference(model, processor, inputs, 16)


def test_the_default_engine_admits_an_image_prompt_plus_16384_new_tokens():
    config = preset("tiny")
    config.text_config.max_position_embeddings = 40960  # R-4B's
    with torch.device("meta"):
        model = R4BForConditionalGeneration(config)
    model = model.to_empty(device="cpu")
    engine = Engine(model)
    engine.check_request(3000, 16384)  # raises if it does not fit
    assert engine.max_new_tokens_for(3000) >= 16384
    assert engine.kv_cache_tokens >= 3000 + 16384
    stats = engine.stats()
    assert stats["kv_cache_tokens"] == engine.kv_cache_tokens and stats["kv_blocks_used"] == 0
    with pytest.raises(ValueError, match="kv-cache-tokens"):
        Engine(model, kv_cache_tokens=1024).check_request(1000, 100)


def test_prompts_admitted_together_are_prefilled_in_one_step_within_the_token_budget():
    from r4b_core.serve.block_pool import BlockPool
    from r4b_core.serve.scheduler import Scheduler, Sequence

    sched = Scheduler(BlockPool(64, 16), max_running=8, token_budget=100)
    for n in (30, 30, 30, 30):
        sched.waiting.append(Sequence(request=None, token_ids=list(range(1, n + 1)), prompt_len=n))
    sched.admit()
    plan, preempted = sched.plan()
    assert not plan.decode and not preempted
    # 30 + 30 + 30 whole, the fourth gets the last 10 tokens of the budget as its first chunk
    assert [(seq.prompt_len, end) for seq, end in plan.prefills] == [(30, 30), (30, 30), (30, 30), (30, 10)]
    assert sum(end - seq.num_computed for seq, end in plan.prefills) == 100
