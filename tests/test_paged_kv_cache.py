"""The paged KV cache and its block accounting: a forward through scattered blocks (chunked prefill, then a
bucketed decode batch beside a padding row) gives the static cache's logits; attention probabilities
through it match; the pool is sized by tokens or GiB; blocks are reference-counted, found again by
content hash after they are freed, evicted least-recently-freed first, and an image digest changes the hash."""

from __future__ import annotations

import pytest
import torch

from r4b_core.config import preset
from r4b_core.models.kv_cache import KVCache
from r4b_core.models.paged_kv_cache import PagedKVCache, kv_bytes_per_token
from r4b_core.models.qwen3 import Qwen3ForCausalLM
from r4b_core.serve.block_pool import BlockPool, OutOfBlocksError, block_hashes


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    config = preset("tiny").text_config
    return Qwen3ForCausalLM(config).eval(), config


@torch.no_grad()
def test_chunked_prefill_and_decode_through_blocks_equal_the_static_cache(decoder):
    model, config = decoder
    ids = torch.randint(0, 1000, (1, 37))
    static = KVCache.for_model(config, 1, 64)
    expected = model(ids, kv_cache=static).logits  # [1, 37, V]
    expected_next = model(torch.tensor([[5]]), kv_cache=static).logits  # [1, 1, V]

    pool = PagedKVCache.for_model(config, num_tokens=256, block_size=16)
    table = [7, 3, 9]  # scattered, out of order
    first = model(ids[:, :20], kv_cache=pool.batch([table[:2]], [0])).logits
    second = model(ids[:, 20:], kv_cache=pool.batch([table], [20])).logits
    torch.testing.assert_close(torch.cat([first, second], 1), expected, rtol=1e-5, atol=1e-5)
    # decode: the sequence beside a padding row (null block, length 0), span bucketed to 64 slots
    batch = pool.batch([table, [0]], [37, 0], capacity=64)
    assert batch.capacity == 64 and batch.batch_size == 2
    got = model(torch.tensor([[5], [0]]), kv_cache=batch).logits
    torch.testing.assert_close(got[:1], expected_next, rtol=1e-5, atol=1e-5)
    assert batch.seq_lens.tolist() == [38, 1]
    assert pool.k[:, 1:3].abs().sum() == 0  # blocks nobody was given stay untouched


@torch.no_grad()
def test_decode_steps_gather_into_one_reused_scratch_buffer_and_match_the_static_cache(decoder):
    model, config = decoder
    ids = torch.randint(0, 1000, (1, 30))
    static = KVCache.for_model(config, 1, 64)
    model(ids, kv_cache=static)
    pool = PagedKVCache.for_model(config, num_tokens=256, block_size=16)
    table = [5, 2, 8, 11]
    model(ids, kv_cache=pool.batch([table[:2]], [0]))
    pointers = []
    for step, capacity in enumerate((64, 32, 48, 64)):  # the widest span first: later steps fit its buffer
        token = torch.tensor([[10 + step]])
        expected = model(token, kv_cache=static).logits
        got = model(token, kv_cache=pool.batch([table], [30 + step], capacity=capacity)).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"step {step}")
        pointers.append(pool.scratch(1).data_ptr())
    assert len(set(pointers)) == 1  # every layer of every step gathered into the same memory
    k_rows = pool.k[-1, table].reshape(-1)  # the last layer's K blocks of the last (64-slot) step
    v_rows = pool.v[-1, table].reshape(-1)
    assert torch.equal(pool.scratch(2 * k_rows.numel()), torch.cat([k_rows, v_rows]))  # ... are what it holds
    assert pool.scratch(10**7).data_ptr() != pointers[0]  # grown when too small


@torch.no_grad()
def test_attention_probabilities_through_the_paged_cache(decoder):
    model, config = decoder
    ids = torch.randint(0, 1000, (1, 21))
    static = KVCache.for_model(config, 1, 32)
    model(ids[:, :-1], kv_cache=static)
    expected = model(ids[:, -1:], kv_cache=static, output_attentions=True).attentions
    pool = PagedKVCache.for_model(config, num_tokens=64, block_size=8)
    model(ids[:, :-1], kv_cache=pool.batch([[4, 2, 3]], [0]))
    got = model(ids[:, -1:], kv_cache=pool.batch([[4, 2, 3]], [20]), output_attentions=True).attentions
    for g, e in zip(got, expected):
        assert g.shape == e.shape == (1, config.num_attention_heads, 1, 21)
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_pool_sized_by_tokens_or_memory(decoder):
    _, config = decoder
    per_token = kv_bytes_per_token(config, torch.float32)
    assert per_token == 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    by_tokens = PagedKVCache.for_model(config, num_tokens=100, block_size=16)
    assert by_tokens.num_tokens == 96 and by_tokens.num_blocks == 7  # 6 usable + the null block
    by_memory = PagedKVCache.for_model(config, memory_gb=per_token * 64 / 2**30, block_size=16)
    assert by_memory.num_tokens == 64
    with pytest.raises(ValueError, match="kv-cache-tokens"):
        PagedKVCache.for_model(config, num_tokens=8, block_size=16)
    with pytest.raises(ValueError, match="exactly one"):
        PagedKVCache.for_model(config, num_tokens=64, memory_gb=1.0)
    with pytest.raises(ValueError, match="attention_mask"):
        by_tokens.batch([[1]], [0]).plan(torch.ones(1, 3), 3)


def test_block_pool_reference_counts_prefix_hits_and_lru_eviction():
    pool = BlockPool(num_blocks=5, block_size=4)  # blocks 1..4 usable
    assert pool.num_free == 4
    a = pool.allocate(2)
    h = block_hashes(list(range(8)), 4)
    assert len(h) == 2 and h[0] != h[1]
    for block, digest in zip(a, h):
        pool.register(block, digest)
    assert pool.match(h) == a  # a second sequence shares both blocks
    assert [pool.ref_count[b] for b in a] == [2, 2]
    pool.free(a)
    pool.free(a)
    assert pool.num_free == 4 and pool.num_cached == 2  # freed but still findable
    assert pool.match(h[:1]) == a[:1]  # taken back from the free queue
    pool.free(a[:1])
    # allocation takes never-used blocks first, then the least recently freed: the tail block a[1] goes before a[0]
    fresh = pool.allocate(2)
    assert set(fresh).isdisjoint(a)
    assert pool.allocate(1) == [a[1]] and pool.num_cached == 1 and pool.evictions == 1
    with pytest.raises(OutOfBlocksError):
        pool.allocate(2)
    pool.free([a[1]], forget=True)
    assert pool.match(h) == [a[0]]  # block 2's content was forgotten; block 1 still matches


def test_block_hash_is_chained_and_covers_images():
    tokens = [1, 2, 3, 4, 9, 9, 9, 9]
    plain = block_hashes(tokens, 4)
    with_image = block_hashes(tokens, 4, image_starts={4: b"image-a"})
    other_image = block_hashes(tokens, 4, image_starts={4: b"image-b"})
    assert plain[0] == with_image[0] == other_image[0]  # the block before the image is the same
    assert len({plain[1], with_image[1], other_image[1]}) == 3
    changed_first = block_hashes([0, 2, 3, 4, 9, 9, 9, 9], 4)
    assert changed_first[1] != plain[1]  # same content, different prefix: a different block
    assert block_hashes(tokens[:7], 4) == plain[:1]  # only full blocks are hashed
