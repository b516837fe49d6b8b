"""The static KV cache: cached decode equals one full forward, padding never changes a sequence's
result, and overflow is an error, not corruption."""

from __future__ import annotations

import pytest
import torch

from r4b_core import CacheOverflowError, KVCache, Qwen3ForCausalLM
from r4b_core.config import TextConfig

CFG = TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=10000.0)


@pytest.fixture(scope="module")
def model() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    m = Qwen3ForCausalLM(CFG).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return m


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(model):
    ids = _ids(2, 20)
    full = model(ids).logits
    cache = KVCache.for_model(CFG, batch_size=2, capacity=32)
    steps = [model(ids[:, :9], kv_cache=cache).logits]
    for t in range(9, 20):
        steps.append(model(ids[:, t : t + 1], kv_cache=cache).logits)
    assert cache.seq_lens.tolist() == [20, 20]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


@torch.no_grad()
def test_chunked_prefill_equals_full_forward(model):
    ids = _ids(1, 30, seed=3)
    cache = KVCache.for_model(CFG, batch_size=1, capacity=30)  # exactly full at the end
    chunks = [model(ids[:, a:b], kv_cache=cache).logits for a, b in ((0, 11), (11, 12), (12, 25), (25, 30))]
    assert (torch.cat(chunks, 1) - model(ids).logits).abs().max() <= 1e-5


@torch.no_grad()
def test_left_padded_batch_equals_each_sequence_alone(model):
    lengths = [13, 6, 10]
    seqs = [_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    new_tokens = _ids(len(seqs), 4, seed=99)

    uncached = model(ids, attention_mask=mask).logits
    cache = KVCache.for_model(CFG, batch_size=len(seqs), capacity=width + 4)
    prefill = model(ids, attention_mask=mask, kv_cache=cache).logits
    assert cache.seq_lens.tolist() == lengths  # padding is not stored
    decoded = [model(new_tokens[:, t : t + 1], kv_cache=cache).logits[:, 0] for t in range(4)]

    for i, s in enumerate(seqs):
        alone = model(torch.cat([s, new_tokens[i]])[None]).logits[0]  # [n + 4, V]
        n = len(s)
        assert (uncached[i, width - n:] - alone[:n]).abs().max() <= 1e-5
        assert (prefill[i, width - n:] - alone[:n]).abs().max() <= 1e-5
        for t in range(4):
            assert (decoded[t][i] - alone[n + t]).abs().max() <= 1e-5


@torch.no_grad()
def test_padding_rows_stay_finite(model):
    ids = _ids(2, 8)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    assert torch.isfinite(model(ids, attention_mask=mask).logits).all()


def test_gradients_flow_without_nan_through_padding(model):
    ids = _ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model.zero_grad()
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()


@torch.no_grad()
def test_overflow_raises_and_writes_nothing(model):
    cache = KVCache.for_model(CFG, batch_size=2, capacity=10)
    model(_ids(2, 8), kv_cache=cache)
    k_before = cache.k.clone()
    with pytest.raises(CacheOverflowError, match="capacity 10"):
        model(_ids(2, 3, seed=5), kv_cache=cache)
    assert cache.seq_lens.tolist() == [8, 8]
    assert torch.equal(cache.k, k_before)
    model(_ids(2, 2, seed=6), kv_cache=cache)  # exactly fills it
    assert cache.seq_lens.tolist() == [10, 10]
    with pytest.raises(CacheOverflowError):
        model(_ids(2, 1), kv_cache=cache)


def test_cache_errors():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        KVCache.for_model(CFG, batch_size=1, capacity=CFG.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="capacity"):
        KVCache(2, 1, 2, 0, 16)
    cache = KVCache.for_model(CFG, batch_size=2, capacity=16)
    assert cache.k.shape == (CFG.num_hidden_layers, 2, CFG.num_key_value_heads, 16, CFG.head_dim)
    with pytest.raises(ValueError, match="batch size 3"):
        Qwen3ForCausalLM(CFG)(_ids(3, 4), kv_cache=cache)


@torch.no_grad()
def test_reset_reuses_the_cache(model):
    cache = KVCache.for_model(CFG, batch_size=1, capacity=16)
    a = model(_ids(1, 12, seed=1), kv_cache=cache).logits
    cache.reset()
    b = model(_ids(1, 12, seed=1), kv_cache=cache).logits
    assert torch.equal(a, b) and cache.seq_lens.tolist() == [12]


# ---------------------------------------------------------------------------------------------
# decode cost follows the context: the decode step reads a bucketed span, not the capacity

LONG = TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rope_theta=10000.0)


@pytest.fixture(scope="module")
def long_model() -> Qwen3ForCausalLM:
    torch.manual_seed(1)
    return Qwen3ForCausalLM(LONG).eval()


def test_decode_span_is_a_bucket():
    from r4b_core.models.kv_cache import MIN_DECODE_SPAN, decode_span

    assert decode_span(49, 12047) == MIN_DECODE_SPAN == 256
    assert [decode_span(n, 12047) for n in (256, 257, 512, 513, 9000)] == [256, 512, 512, 1024, 12047]
    assert decode_span(49, 79) == 79  # never past the capacity
    assert len({decode_span(n, 12047) for n in range(1, 12048)}) == 7  # the compiled graphs a long run needs


@torch.no_grad()
def test_decode_reads_only_its_span(long_model):
    """Slots past the span are never read: NaN there leaves the logits finite (and equal to a small cache's)."""
    ids = _ids(2, 48)
    big, small = KVCache.for_model(LONG, 2, 3000), KVCache.for_model(LONG, 2, 60)
    for cache in (big, small):
        long_model(ids, kv_cache=cache)
    big.k[:, :, :, 256:] = float("nan")
    big.v[:, :, :, 256:] = float("nan")
    for t in range(3):
        token = _ids(2, 1, seed=t)
        a, b = long_model(token, kv_cache=big).logits, long_model(token, kv_cache=small).logits
        assert torch.isfinite(a).all() and (a - b).abs().max() <= 1e-6


@torch.no_grad()
def test_the_span_grows_with_the_longest_row_view(long_model):
    """A row view's prefill raises the whole cache's host bound, so the next batched decode step reads far
    enough for every row."""
    cache = KVCache.for_model(LONG, 2, 1000)
    long_model(_ids(1, 10), kv_cache=cache.row(0))
    long_model(_ids(1, 300, seed=1), kv_cache=cache.row(1))
    ref = KVCache.for_model(LONG, 1, 1000)
    long_model(_ids(1, 300, seed=1), kv_cache=ref)
    token = _ids(2, 1, seed=5)
    got = long_model(token, kv_cache=cache).logits  # row 1 holds 301 tokens: the span must be 512
    want = long_model(token[1:], kv_cache=ref).logits
    assert (got[1:] - want).abs().max() <= 1e-5
    assert cache.seq_lens.tolist() == [11, 301]


def test_compiled_decode_across_spans_equals_eager(long_model):
    """Greedy tokens of the compiled decode step (one graph per span) equal eager ones across 256 -> 512."""
    from r4b_core.generation.generate import generate

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the graph counts of earlier tests
    ids = _ids(1, 250, seed=3)
    eager = generate(long_model, ids, max_new_tokens=12)
    compiled = generate(long_model, ids, max_new_tokens=12, compile=True)
    assert compiled.tokens == eager.tokens and len(eager.tokens[0]) == 12
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # spans 256 and 261 (the capacity)
