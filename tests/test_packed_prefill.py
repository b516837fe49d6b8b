"""Several sequences' prefill chunks in one packed forward (r4b_core/models/packed_prefill.py): each chunk's
logits and stored K/V match the same chunk prefilled alone through a PagedBatch (computed in the same run),
fresh prompts and chunks after stored tokens alike, on the fused and on the explicit attention path; the
engine packs the prompts admitted together into one forward, and a packed forward that fails costs only the
request at fault."""

from __future__ import annotations

import pytest
import torch
from conftest import Collector, picture

from r4b_core.generation.generate import generate
from r4b_core.models.packed_prefill import PackedPrefill
from r4b_core.models.paged_kv_cache import PagedKVCache, blocks_for_tokens
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.processing.processor import R4BProcessor
from r4b_core.serve.engine import Engine, EngineRequest


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return R4BForConditionalGeneration.from_pretrained(tiny_checkpoint), R4BProcessor.from_pretrained(tiny_checkpoint)


def _pool(lm) -> PagedKVCache:
    return PagedKVCache.for_model(lm.config, num_tokens=16 * 24, block_size=16)


# (prompt length, tokens stored before the chunk): two fresh prompts and a chunk after 18 stored tokens
CASES = ((20, 0), (37, 0), (27, 18), (5, 0))


def _layout(case_index: int) -> list[int]:
    """Disjoint blocks per sequence, not in order, so a wrong block table reads someone else's keys."""
    n = blocks_for_tokens(CASES[case_index][0], 16)
    first = 1 + 5 * case_index
    return list(range(first + n - 1, first - 1, -1))


def _alone(lm, pool, ids: torch.Tensor, blocks: list[int], stored: int) -> torch.Tensor:
    """The chunk's last logits [V] prefilled alone (its stored prefix written first, alone too)."""
    if stored:
        lm(ids[:, :stored], kv_cache=pool.batch([blocks], [0]), logits_to_keep=1)
    return lm(ids[:, stored:], kv_cache=pool.batch([blocks], [stored]), logits_to_keep=1).logits[0, -1]


@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "output_attentions"])
def test_a_packed_prefill_matches_each_chunk_alone(tiny, explicit):
    model, _ = tiny
    lm = model.language_model
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, lm.config.vocab_size, (1, n), generator=gen) for n, _ in CASES]
    tables = [_layout(i) for i in range(len(CASES))]
    with torch.inference_mode():
        alone_pool, packed_pool = _pool(lm), _pool(lm)
        expected = [_alone(lm, alone_pool, ids, t, stored) for ids, t, (_, stored) in zip(prompts, tables, CASES)]
        for ids, t, (_, stored) in zip(prompts, tables, CASES):  # the stored prefixes, written alone
            if stored:
                lm(ids[:, :stored], kv_cache=packed_pool.batch([t], [0]), logits_to_keep=1)
        batch = PackedPrefill(packed_pool, tables, [s for _, s in CASES], [n for n, _ in CASES])
        chunks = torch.cat([ids[:, stored:] for ids, (_, stored) in zip(prompts, CASES)], dim=1)  # [1, T]
        out = lm(chunks, kv_cache=batch, logits_to_keep=batch.last_token_indices(), output_attentions=explicit)
    assert out.logits.shape == (1, len(CASES), lm.config.vocab_size)
    for i, want in enumerate(expected):
        torch.testing.assert_close(out.logits[0, i], want, rtol=1e-4, atol=1e-4, msg=f"sequence {i}")
        assert out.logits[0, i].argmax() == want.argmax()
    used = [b for t in tables for b in t]
    torch.testing.assert_close(packed_pool.k[:, used], alone_pool.k[:, used], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed_pool.v[:, used], alone_pool.v[:, used], rtol=1e-4, atol=1e-4)
    if explicit:  # each query's probability mass stays on its own sequence's keys
        probs = out.attentions[0][0].sum(0)  # [T, S]
        offsets, keys = [0], [0]
        for n, stored in CASES:
            offsets.append(offsets[-1] + n - stored)
            keys.append(keys[-1] + n)
        for i in range(len(CASES)):
            rows = probs[offsets[i]:offsets[i + 1]]
            own = rows[:, keys[i]:keys[i + 1]].sum(-1)
            torch.testing.assert_close(own, torch.full_like(own, float(lm.config.num_attention_heads)))


def test_a_packed_prefill_refuses_chunks_that_do_not_fit(tiny):
    model, _ = tiny
    pool = _pool(model.language_model)
    with pytest.raises(ValueError, match="sequence 1 would hold 33 tokens but its 1 block holds 16"):
        PackedPrefill(pool, [[1, 2], [3]], [0, 0], [20, 33])
    with pytest.raises(ValueError, match=r"chunk \[5, 5\) holds no token"):
        PackedPrefill(pool, [[1]], [5], [5])
    batch = PackedPrefill(pool, [[1], [2]], [0, 0], [4, 6])
    with pytest.raises(ValueError, match="9 new tokens but the chunks hold 10"):
        model.language_model(torch.ones(1, 9, dtype=torch.int64), kv_cache=batch)


def _prompt(processor, text: str, images=None) -> dict:
    content = [{"type": "image"} for _ in images or []] + [{"type": "text", "text": text}]
    inputs = processor(messages=[{"role": "user", "content": content}], images=images)
    inputs.pop("attention_mask")
    return inputs


def _request(inputs: dict, max_new_tokens: int) -> EngineRequest:
    inputs = dict(inputs)
    ids = inputs.pop("input_ids")
    return EngineRequest(ids, max_new_tokens, on_event=Collector(), model_inputs=inputs, stop_token_ids=[])


def _reference(model, processor, inputs: dict, max_new_tokens: int) -> list[int]:
    inputs = dict(inputs)
    ids = inputs.pop("input_ids")
    return generate(model, ids, max_new_tokens=max_new_tokens, eos_token_ids=[],
                    pad_token_id=processor.pad_token_id, **inputs).tokens[0]


def _engine(model, processor) -> Engine:
    return Engine(model, eos_token_ids=processor.eos_token_ids, pad_token_id=processor.pad_token_id,
                  max_seq_len=512, kv_cache_tokens=4096)


def test_the_engine_prefills_prompts_admitted_together_in_one_forward(tiny):
    model, processor = tiny
    prompts = [_prompt(processor, "describe it", [picture(96, 64, seed=3)]),
               *(_prompt(processor, " ".join(["word"] * n)) for n in (3, 11, 25))]
    requests = [_request(p, 6) for p in prompts]
    engine = _engine(model, processor)
    for r in requests:  # queued before the engine thread starts: admitted in one step
        engine.submit(r)
    engine.start()
    try:
        for r in requests:
            assert r.on_event.done.wait(120), "request did not finish"
        stats = engine.stats()
    finally:
        engine.stop()
    assert stats["prefill_chunks"] == 4 and stats["prefill_forwards"] == 1
    for p, r in zip(prompts, requests):
        assert r.finish_reason == "length" and r.tokens == _reference(model, processor, p, 6)


def test_a_failing_packed_prefill_fails_only_the_request_at_fault(tiny, caplog):
    model, processor = tiny
    good = [_prompt(processor, "hello there"), _prompt(processor, "a longer prompt than the first")]
    image_token = model.config.image_token_index
    bad_ids = torch.tensor([[*good[0]["input_ids"][0, :4].tolist(), image_token, image_token, 7]])
    requests = [_request(good[0], 4), _request({"input_ids": bad_ids}, 4), _request(good[1], 4)]
    engine = _engine(model, processor)
    for r in requests:
        engine.submit(r)
    with caplog.at_level("WARNING", logger="r4b.serve"):
        engine.start()
        try:
            for r in requests:
                assert r.on_event.done.wait(120), "request did not finish"
        finally:
            engine.stop()
    assert "packed prefill of 3 chunks failed" in caplog.text
    assert requests[1].finish_reason == "error"
    assert "2 image tokens" in requests[1].on_event.finish().error
    for p, r in ((good[0], requests[0]), (good[1], requests[2])):
        assert r.finish_reason == "length" and r.tokens == _reference(model, processor, p, 4)
