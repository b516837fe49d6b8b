"""Paged split-KV GQA decode attention in Triton: one new query token per sequence, K/V read through a block table.

The same kernel as ``decode_attention.py`` (``split_kv.py``: read its docstring first: GQA packing, online
softmax in base 2, splits, merge, precision, interpreter notes); only where a sequence's keys live differs. Instead
of one [S, D] run per (sequence, KV head), the cache is a pool of fixed-size blocks shared by all
sequences (vLLM's PagedAttention), and each sequence lists the blocks it holds in order.

Notation (as in decode_attention.py, plus):
    NB   blocks in the pool                 P    block_size, tokens per block (any P >= 1; 16 typical)
    M    max_blocks_per_seq, the block table's width; M * P is the largest length it can describe

Shapes:
    q           [B, Hq, D]          any strides
    k_pool      [NB, P, Hkv, D]     one layer's pool (a view of a bigger tensor is fine); any strides
                                    except stride(-1) == 1
    v_pool      [NB, P, Hkv, D]     same shape and dtype as k_pool
    block_table [B, M] int32/int64  sequence b's token t is k_pool[block_table[b, t // P], t % P];
                                    entries at or past cdiv(seq_lens[b], P) are never read (may hold
                                    -1 or anything); one block may appear in many rows (shared prefix)
    seq_lens    [B] int32/int64     1 <= L_b <= M * P, the new token's K/V already written
    out         [B, Hq, D]          q's dtype

Kernel: ``split_kv._split_kernel`` with ``PAGED=True``: the grid (B, Hkv, NS) and split ranges of the
contiguous cache; inside a BLOCK_N-token tile it looks up each token's block (``block_table[b, t // P]``,
a small gather that stays in L1) and loads row ``t % P`` of that block: one contiguous D-vector per token
and KV head, so tiles may span block boundaries and P need not relate to BLOCK_N. Block ids are
clamped to [0, NB) for memory safety when inputs were not validated. The merge and its workspace
(``make_workspace``) are the contiguous cache's.

Entry points:
    paged_decode_attention(...)   eager call; validates inputs (ValueError), optional out= / workspace=
    paged_decode_attention_op     in ``decode_op.py``: the custom op ``torch.ops.r4b.paged_decode_attention``
                                  and its dispatch between this kernel and the gather-then-SDPA path
    supports_paged(...)           None or why these tensors are unsupported
"""

from __future__ import annotations

import torch

from r4b_kernels.decode_attention import supports
from r4b_kernels.split_kv import DEFAULT_BLOCK_N, CacheRows, capturing, check_launch, launch
from r4b_kernels.triton_runtime import TRITON_IMPORT_ERROR

__all__ = ["paged_decode_attention", "supports_paged"]


def supports_paged(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
) -> str | None:
    """None when the paged kernel handles these inputs, else a one-line reason.

    Looks at shapes, dtypes, strides and devices only, never at values (that would sync with the device).
    """
    if q.ndim != 3:
        return f"q must be [B, Hq, D] (one query token per sequence), got shape {tuple(q.shape)}"
    if k_pool.ndim != 4:
        return f"k_pool must be [num_blocks, block_size, Hkv, D], got shape {tuple(k_pool.shape)}"
    B = q.shape[0]
    NB, P, Hkv, D = k_pool.shape
    if min(NB, P) == 0:
        return f"empty pool: k_pool {tuple(k_pool.shape)}"
    if D != q.shape[2]:
        return f"q {tuple(q.shape)} and k_pool {tuple(k_pool.shape)} differ in head_dim"
    # the head checks of the contiguous kernel, on a [B, Hkv, P, D]-shaped probe (no data touched)
    probe = k_pool.permute(0, 2, 1, 3)[:1].expand(B, Hkv, P, D)
    reason = supports(q, probe)
    if reason is not None:
        return reason.replace("k_cache", "k_pool")
    if v_pool is not None:
        if v_pool.shape != k_pool.shape:
            return f"v_pool shape {tuple(v_pool.shape)} differs from k_pool shape {tuple(k_pool.shape)}"
        if v_pool.dtype != k_pool.dtype:
            return f"v_pool dtype {v_pool.dtype} differs from k_pool dtype {k_pool.dtype}"
        if v_pool.stride(-1) != 1:
            return f"v_pool's last dim must be contiguous (stride 1), got strides {v_pool.stride()}"
    tensors = {"q": q, "k_pool": k_pool, "v_pool": v_pool}
    if block_table is not None:
        if block_table.ndim != 2 or block_table.shape[0] != B or block_table.shape[1] == 0:
            return f"block_table must be [B = {B}, max_blocks_per_seq >= 1], got shape {tuple(block_table.shape)}"
        if block_table.dtype not in (torch.int32, torch.int64):
            return f"block_table must be int32 or int64, got {block_table.dtype}"
        tensors["block_table"] = block_table
    if seq_lens is not None:
        if seq_lens.shape != (B,):
            return f"seq_lens must have shape ({B},), got {tuple(seq_lens.shape)}"
        if seq_lens.dtype not in (torch.int32, torch.int64):
            return f"seq_lens must be int32 or int64, got {seq_lens.dtype}"
        tensors["seq_lens"] = seq_lens
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) != 1:
        return "tensors on different devices: " + ", ".join(
            f"{n} on {t.device}" for n, t in tensors.items() if t is not None)
    return None


# --------------------------------------------------------------------------------------------------
# Host entry point
# --------------------------------------------------------------------------------------------------


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    *,
    out: torch.Tensor | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_n: int = DEFAULT_BLOCK_N,
    num_warps: int = 4,
    num_stages: int = 2,
    check_seq_lens: bool = True,
) -> torch.Tensor:
    """Attention of one query token per sequence over its first ``seq_lens[b]`` tokens, read through
    ``block_table`` from the block pools.

    q [B, Hq, D], k_pool/v_pool [NB, P, Hkv, D] (stride(-1) == 1), block_table [B, M] int32/int64,
    seq_lens [B] int32/int64 in [1, M * P], scale a float -> [B, Hq, D] in q's dtype (into ``out`` when
    given). ``num_splits`` None picks ``default_num_splits`` for a capacity of M * P tokens (shapes only,
    stable under CUDA graphs); ``workspace`` is an optional ``make_workspace(q, num_splits)`` pair.
    ``check_seq_lens`` validates the lengths and the block ids in use (0 <= id < NB) on the host, which
    syncs with the device: pass False on hot paths and inside CUDA graphs (lengths are then clamped to
    [0, M * P] and block ids to [0, NB) in the kernel, for memory safety only). Skipped while compiling
    or capturing. Raises ValueError for unsupported inputs.
    """
    if TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"Triton is not available: {TRITON_IMPORT_ERROR!r}")
    reason = supports_paged(q, k_pool, v_pool, block_table, seq_lens)
    if reason is not None:
        raise ValueError(f"paged_decode_attention: {reason}.")
    NB, P, Hkv, _ = k_pool.shape
    # row (block, slot) of KV head h is k_pool[block, slot, h]
    rows = CacheRows(k_pool, v_pool, (k_pool.stride(0), k_pool.stride(1), k_pool.stride(2)),
                     (v_pool.stride(0), v_pool.stride(1), v_pool.stride(2)), Hkv, block_table.shape[1] * P, NB,
                     block_table, P)
    num_splits, out, o_part, lse_part = check_launch("paged_decode_attention", q, rows, num_splits, out, workspace,
                                                     block_n)
    if check_seq_lens and not torch.compiler.is_compiling() and not capturing(q.device):
        _check_lengths_and_blocks(block_table, seq_lens, NB, P)  # host sync
    launch(q, rows, seq_lens, scale, num_splits, out, o_part, lse_part, block_n, num_warps, num_stages)
    return out


def _check_lengths_and_blocks(block_table: torch.Tensor, seq_lens: torch.Tensor, num_blocks: int,
                              block_size: int) -> None:
    """1 <= seq_lens <= M * P and every block id a sequence uses in [0, num_blocks); raises ValueError."""
    M = block_table.shape[1]
    lo, hi = int(seq_lens.min()), int(seq_lens.max())
    if lo < 1 or hi > M * block_size:
        raise ValueError(
            f"paged_decode_attention: seq_lens must lie in [1, max_blocks_per_seq * block_size = "
            f"{M} * {block_size}], got min {lo}, max {hi}."
        )
    used = torch.arange(M, device=block_table.device)[None, :] * block_size < seq_lens[:, None]  # [B, M]
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"paged_decode_attention: block_table[{b}, {j}] = {int(block_table[b, j])} is used by sequence {b} "
            f"(length {int(seq_lens[b])}) but lies outside the pool's [0, {num_blocks}) blocks."
        )
