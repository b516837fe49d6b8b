"""The Triton decode kernel on the paged layout (K/V read through a block table), run by the Triton
interpreter on the CPU, against the PyTorch reference (gather then attend), and the paged op's dispatch and
SDPA path.

Every pool starts as NaN and only the slots some sequence holds get values, so a kernel that reads a slot
past a length, an unused table entry, or the wrong block fails; the output and split workspace are
NaN-poisoned too (an unwritten element fails). Block tables are random permutations of the pool (not
contiguous), with unused entries -1; some cases share their first blocks between sequences, as prefix
caching does. The paged reference is itself checked against the contiguous one on the gathered cache.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see test_decode_kernel.py)

import warnings

import pytest
import torch

import triton  # noqa: E402,F401  (a missing Triton must fail, not skip)

from r4b_kernels import decode_attention as contiguous_kernel
from r4b_kernels.backend import BackendUnavailableError, resolve_decode_backend
from r4b_kernels.decode_attention import decode_attention, make_workspace, supports_paged
from r4b_kernels.decode_op import paged_decode_attention_op, paged_decode_attention_sdpa
from r4b_kernels.reference import decode_attention_reference, gather_paged_kv

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_paged_inputs(B, Hkv, G, P, D, lens, dtype, seed, shared_blocks=0, spare_blocks=3, kv_dtype=None):
    """q [B, Hq, D], pools [NB, P, Hkv, D] (NaN except held slots), block_table [B, M] int32 (-1 unused),
    seq_lens [B] int32. The first ``shared_blocks`` blocks of every sequence are the same pool blocks
    (a shared prefix: every length must cover them)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_of = [-(-n // P) for n in lens]
    assert all(n >= shared_blocks * P for n in lens)
    M = max(blocks_of) + 1  # one unused column for every sequence
    NB = shared_blocks + sum(b - shared_blocks for b in blocks_of) + spare_blocks
    ids = torch.randperm(NB, generator=gen).tolist()  # pool blocks handed out in random order
    shared, ids = ids[:shared_blocks], ids[shared_blocks:]
    table = torch.full((B, M), -1, dtype=torch.int32)
    kv_dtype = kv_dtype or dtype
    k_pool = torch.full((NB, P, Hkv, D), float("nan"), dtype=kv_dtype)
    v_pool = torch.full((NB, P, Hkv, D), float("nan"), dtype=kv_dtype)
    for b, n in enumerate(lens):
        own, ids = ids[: blocks_of[b] - shared_blocks], ids[blocks_of[b] - shared_blocks:]
        row = shared + own
        table[b, : len(row)] = torch.tensor(row, dtype=torch.int32)
        for t in range(n):  # write sequence b's tokens (the shared prefix is written alike by every row)
            blk, slot = row[t // P], t % P
            if b > 0 and t < shared_blocks * P:
                continue
            k_pool[blk, slot] = torch.randn(Hkv, D, generator=gen).to(kv_dtype)
            v_pool[blk, slot] = torch.randn(Hkv, D, generator=gen).to(kv_dtype)
    q = torch.randn(B, Hkv * G, D, generator=gen).to(dtype)
    return q, k_pool, v_pool, table, torch.tensor(lens, dtype=torch.int32)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def check(q, k_pool, v_pool, table, lens, num_splits, block_n, tol=None):
    """Paged kernel (NaN-poisoned out and workspace) vs the paged reference in fp32 on the same values."""
    scale = q.shape[-1] ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    workspace = tuple(t.fill_(float("nan")) for t in make_workspace(q, num_splits))
    got = decode_attention(q, k_pool, v_pool, lens, scale, num_splits, block_table=table, out=out,
                           workspace=workspace, block_n=block_n)
    assert got is out
    want = decode_attention_reference(q.float(), k_pool, v_pool, lens, scale, block_table=table)
    assert torch.isfinite(got).all(), "kernel left NaN in the output (unwritten element or read a wrong slot)"
    err = rel_error(got, want)
    assert err <= (tol or TOL[q.dtype]), f"relative error {err:.3g}"
    return got


# (B, Hkv, G, P, D, lens, dtype, num_splits, block_n, shared_blocks): lengths 1, on a block boundary and
# off it; block sizes smaller than, equal to and larger than the tile; GQA 1/4/8; D 64/72/128;
# one split and many; fp32/bf16/fp16; shared prefixes.
CASES = {
    "mha-D64-P16-len1-and-boundary": (2, 2, 1, 16, 64, [1, 32], torch.float32, 1, 16, 0),
    "gqa4-D128-P16-ragged-3-splits": (3, 2, 4, 16, 128, [17, 48, 5], torch.float32, 3, 16, 0),
    "gqa8-D72-P8-tile-spans-blocks": (2, 1, 8, 8, 72, [45, 24], torch.float32, 2, 32, 0),
    "gqa4-D64-P64-block-larger-than-tile": (2, 2, 4, 64, 64, [130, 64], torch.float32, 4, 16, 0),
    "gqa4-D64-P5-non-pow2-block": (2, 1, 4, 5, 64, [23, 10], torch.float32, 2, 16, 0),
    "shared-prefix-3-seqs": (3, 2, 4, 16, 64, [40, 33, 64], torch.float32, 2, 16, 2),
    "more-splits-than-tiles": (2, 1, 4, 16, 64, [20, 1], torch.float32, 8, 16, 0),
    "bf16-gqa4-D128-ragged": (3, 2, 4, 16, 128, [1, 50, 32], torch.bfloat16, 3, 16, 0),
    "bf16-gqa8-D72-shared": (2, 1, 8, 16, 72, [37, 16], torch.bfloat16, 1, 16, 1),
    "fp16-gqa2-D64": (2, 2, 2, 16, 64, [31, 16], torch.float16, 2, 16, 0),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_paged_kernel_matches_reference(case):
    B, Hkv, G, P, D, lens, dtype, num_splits, block_n, shared = case
    seed = hash((B, Hkv, G, P, D, tuple(lens), num_splits, shared)) % 2**31
    check(*make_paged_inputs(B, Hkv, G, P, D, lens, dtype, seed, shared_blocks=shared), num_splits=num_splits,
          block_n=block_n)


def test_paged_equals_contiguous_kernel():
    """Same values, same tiles and splits: the kernel through a block table gives its contiguous result to the bit."""
    q, k_pool, v_pool, table, lens = make_paged_inputs(3, 2, 4, 16, 64, [70, 1, 48], torch.float32, seed=21)
    k = gather_paged_kv(k_pool, table, 80).contiguous()  # [B, Hkv, 80, D]
    v = gather_paged_kv(v_pool, table, 80).contiguous()
    for splits in (1, 3):
        paged = decode_attention(q, k_pool, v_pool, lens, 0.125, splits, block_table=table, block_n=16)
        contiguous = decode_attention(q, k, v, lens, 0.125, splits, block_n=16)
        assert torch.equal(paged, contiguous)


def test_paged_reference_matches_contiguous_reference():
    """The gather: the paged reference equals the contiguous reference on a cache built token by token."""
    q, k_pool, v_pool, table, lens = make_paged_inputs(2, 2, 2, 4, 16, [9, 4], torch.float32, seed=8)
    S = 9
    k = torch.zeros(2, 2, S, 16)
    v = torch.zeros(2, 2, S, 16)
    for b, n in enumerate(lens.tolist()):
        for t in range(n):
            k[b, :, t] = k_pool[table[b, t // 4], t % 4]
            v[b, :, t] = v_pool[table[b, t // 4], t % 4]
    want = decode_attention_reference(q, k, v, lens, 0.3)
    assert torch.allclose(decode_attention_reference(q, k_pool, v_pool, lens, 0.3, block_table=table), want, atol=1e-6)


def test_layer_view_of_a_bigger_pool_int64_table_strided_q():
    """What an engine passes: pool[layer] of a [L, NB, P, Hkv, D] tensor, an int64 table, a transposed q,
    default num_splits, no out/workspace."""
    q, k_pool, v_pool, table, lens = make_paged_inputs(2, 2, 4, 16, 64, [33, 16], torch.float32, seed=5)
    k_all = torch.stack([torch.randn_like(k_pool), k_pool])  # [L=2, NB, P, Hkv, D]
    v_all = torch.stack([torch.randn_like(v_pool), v_pool])
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)  # [B, Hq, D] with strides (D, B * D, 1)
    assert not q_t.is_contiguous()
    got = decode_attention(q_t, k_all[1], v_all[1], lens.long(), 0.2, block_table=table.long())
    want = decode_attention_reference(q, k_pool, v_pool, lens, 0.2, block_table=table)
    assert rel_error(got, want) <= 1e-5


def test_bf16_pool_with_fp32_query():
    q, k_pool, v_pool, table, lens = make_paged_inputs(2, 2, 4, 16, 64, [40, 9], torch.float32, seed=3,
                                                       kv_dtype=torch.bfloat16)
    assert check(q, k_pool, v_pool, table, lens, num_splits=2, block_n=16).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_path_matches_reference(dtype):
    """The CPU path (gather every listed block, SDPA in q's dtype): NaN in recycled slots (the tail of a
    sequence's last block, blocks listed past its length, a sequence shorter than one block) does not leak;
    it compiles with fullgraph=True."""
    q, k_pool, v_pool, table, lens = make_paged_inputs(3, 2, 4, 8, 32, [1, 20, 16], dtype, seed=9,
                                                       shared_blocks=0)
    table = table.clamp(min=0)  # unused entries point at real (NaN-holding) blocks
    got = paged_decode_attention_sdpa(q, k_pool, v_pool, table, lens, 0.25)
    want = decode_attention_reference(q.float(), k_pool, v_pool, lens, 0.25, block_table=table)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert rel_error(got, want) <= (1e-5 if dtype == torch.float32 else 2e-2)
    compiled = torch.compile(paged_decode_attention_sdpa, fullgraph=True, backend="aot_eager")  # static shapes
    assert torch.equal(compiled(q, k_pool, v_pool, table, lens, 0.25), got)


def test_op_dispatch_and_notice_rules(monkeypatch):
    q, k_pool, v_pool, table, lens = make_paged_inputs(2, 1, 4, 16, 64, [20, 7], torch.float32, seed=4)
    want = decode_attention_reference(q, k_pool, v_pool, lens, 0.125, block_table=table)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" off CUDA: SDPA, silently
        assert resolve_decode_backend("auto", "cpu", torch.float32, 64, 4, 1) == "sdpa"
        assert rel_error(paged_decode_attention_op(q, k_pool, v_pool, table, lens, 0.125), want) <= 1e-5
    assert resolve_decode_backend("triton", "cpu", torch.float32, 64, 4, 1) == "triton"  # interpreter
    assert rel_error(paged_decode_attention_op(q, k_pool, v_pool, table, lens, 0.125, "triton"), want) <= 1e-5
    assert resolve_decode_backend("sdpa", "cuda", torch.float32, 64, 4, 1) == "sdpa"
    with pytest.raises(BackendUnavailableError, match="head_dim 320 exceeds 256"):
        resolve_decode_backend("triton", "cpu", torch.float32, 320, 4, 1)
    monkeypatch.setattr(contiguous_kernel, "unavailable_reason", lambda device: None)  # as if CUDA + Triton were here
    assert resolve_decode_backend("auto", "cuda", torch.bfloat16, 128, 32, 8) == "triton"
    with pytest.warns(UserWarning, match=r"Triton decode attention unavailable \(head_dim 320"):
        assert resolve_decode_backend("auto", "cuda", torch.bfloat16, 320, 32, 8) == "sdpa"
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="not a CUDA device"):
        resolve_decode_backend("triton", "cpu", torch.float32, 64, 4, 1)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_decode_backend("flash", "cpu", torch.float32, 64, 4, 1)


def test_custom_op_compiles_without_graph_breaks():
    """torch.ops.r4b.paged_decode_attention: fake == real, no graph break, compiled == eager."""
    q, k_pool, v_pool, table, lens = make_paged_inputs(2, 2, 4, 16, 64, [40, 7], torch.float32, seed=6)

    def step(q, k_pool, v_pool, table, lens):
        return paged_decode_attention_op(q, k_pool, v_pool, table, lens, 0.125, "triton") + 1

    torch.library.opcheck(torch.ops.r4b.paged_decode_attention.default, (q, k_pool, v_pool, table, lens, 0.125, 2))
    assert torch._dynamo.explain(step)(q, k_pool, v_pool, table, lens).graph_break_count == 0
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k_pool, v_pool, table, lens)
    assert rel_error(compiled - 1, decode_attention_reference(q, k_pool, v_pool, lens, 0.125, block_table=table)) <= 1e-5


def test_unchecked_garbage_is_memory_safe():
    """check_seq_lens=False (the op's path): block ids past the pool and lengths past the table are clamped
    in the kernel (results are meaningless, but nothing is read out of bounds and the output is written)."""
    q, k_pool, v_pool, table, lens = make_paged_inputs(2, 1, 4, 16, 64, [20, 7], torch.float32, seed=12)
    k_pool, v_pool = torch.nan_to_num(k_pool), torch.nan_to_num(v_pool)
    bad_table = table.clone()
    bad_table[0, 0] = 10_000
    out = decode_attention(q, k_pool, v_pool, torch.tensor([20, 999], dtype=torch.int32), 0.1, 2,
                           block_table=bad_table, check_seq_lens=False)
    assert torch.isfinite(out).all()


def _error(match, q, k_pool, v_pool, table, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        decode_attention(q, k_pool, v_pool, *args, block_table=table, **kwargs)


def test_errors():
    q, k_pool, v_pool, table, lens = make_paged_inputs(2, 2, 4, 16, 64, [20, 7], torch.float32, seed=1)
    assert supports_paged(q, k_pool, v_pool, table, lens) is None
    assert supports_paged(q[:, :5], k_pool) == "Hq = 5 query heads is not a multiple of Hkv = 2 key/value heads"
    _error(r"seq_lens must lie in \[1, max_blocks_per_seq \* block_size = 3 \* 16\]", q, k_pool, v_pool, table,
           torch.tensor([49, 7]), 0.1)
    _error(r"seq_lens must lie", q, k_pool, v_pool, table, torch.tensor([0, 7]), 0.1)
    bad = table.clone()
    bad[1, 0] = -1
    _error(r"block_table\[1, 0\] = -1 is used by sequence 1 \(length 7\)", q, k_pool, v_pool, bad, lens, 0.1)
    bad[1, 0] = k_pool.shape[0]
    _error(r"outside the pool's \[0, \d+\) blocks", q, k_pool, v_pool, bad, lens, 0.1)
    _error("block_table must be int32 or int64", q, k_pool, v_pool, table.float(), lens, 0.1)
    _error(r"block_table must be \[B = 2", q, k_pool, v_pool, table[:1], lens, 0.1)
    _error(r"k_pool must be \[num_blocks, block_size, Hkv, D\]", q, k_pool[0], v_pool[0], table, lens, 0.1)
    _error("differ in head_dim", q[..., :32], k_pool, v_pool, table, lens, 0.1)
    _error("v_pool shape", q, k_pool, v_pool[:, :8], table, lens, 0.1)
    _error("v_pool dtype", q, k_pool, v_pool.half(), table, lens, 0.1)
    _error("k_pool's last dim must be contiguous",
           q, torch.randn(4, 16, 2, 128)[..., ::2], v_pool[:4], table.clamp(0, 3), lens, 0.1)
    _error("seq_lens must be int32 or int64", q, k_pool, v_pool, table, lens.float(), 0.1)
    _error("different devices", q, k_pool, v_pool, table, lens.to("meta"), 0.1)
    _error("num_splits must be a positive int", q, k_pool, v_pool, table, lens, 0.1, 0)
    _error("workspace must be", q, k_pool, v_pool, table, lens, 0.1, 2, workspace=make_workspace(q, 3))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(24))
def test_random_sweep(seed):
    """Random geometry, block size, lengths, sharing, dtype and splits (heavier: slow marker)."""
    gen = torch.Generator().manual_seed(1000 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    B, Hkv, G, P, D = pick([1, 3, 5]), pick([1, 2]), pick([1, 2, 4, 8]), pick([1, 4, 16, 32]), pick([32, 64, 72, 128])
    shared = pick([0, 1, 2])
    lens = [shared * P + int(torch.randint(1, 600, (1,), generator=gen)) for _ in range(B)]
    dtype = pick([torch.float32, torch.bfloat16, torch.float16])
    check(*make_paged_inputs(B, Hkv, G, P, D, lens, dtype, seed, shared_blocks=shared),
          num_splits=pick([1, 2, 5]), block_n=pick([16, 32, 64]))
