"""Split-KV ("flash-decoding") GQA decode attention in Triton: one new query token per sequence, over a
contiguous KV cache or, with ``block_table=``, a paged one.

The kernels, the algorithm, the split heuristic, precision and the launch defaults are in ``split_kv.py``
(read its docstring first); this module is the one entry point and the input checks of both layouts.

Shapes:
    q        [B, Hq, D]          already RoPE'd; any strides
    k_cache  [B, Hkv, S, D]      a layer's view of KVCache.k; any strides except stride(-1) == 1
    v_cache  [B, Hkv, S, D]      same shape and dtype as k_cache
    seq_lens [B]                 int32/int64, 1 <= L_b <= S: sequence b's keys are slots [0, L_b)
    out      [B, Hq, D]          q's dtype (optional preallocated ``out=``, any strides)

Paged cache (``block_table=``): instead of one [S, D] run per (sequence, KV head), the cache is a pool of
fixed-size blocks shared by all sequences (vLLM's PagedAttention), and each sequence lists the blocks it
holds in order.
    NB   blocks in the pool                 P    block_size, tokens per block (any P >= 1; 16 typical)
    M    max_blocks_per_seq, the block table's width; M * P is the largest length it can describe
    k_cache, v_cache  [NB, P, Hkv, D]     one layer's pool (a view of a bigger tensor is fine); any strides
                                          except stride(-1) == 1 (named k_pool / v_pool in messages)
    block_table [B, M] int32/int64  sequence b's token t is k_pool[block_table[b, t // P], t % P];
                                    entries at or past cdiv(seq_lens[b], P) are never read (may hold
                                    -1 or anything); one block may appear in many rows (shared prefix)
    seq_lens    [B] int32/int64     1 <= L_b <= M * P, the new token's K/V already written

Entry points:
    decode_attention(...)       eager call, both layouts; validates inputs (ValueError), optional out= / workspace=
    decode_attention_op(...), paged_decode_attention_op(...)   in ``decode_op.py``: the custom ops
                                ``torch.ops.r4b.decode_attention`` / ``paged_decode_attention`` (torch.compile,
                                CUDA graphs) and the paged op's dispatch between this kernel and gather-then-SDPA
    supports(q, k_cache, ...), supports_paged(q, k_pool, ...)   None or why these tensors are unsupported
    is_available(device), unavailable_reason(device)   (from ``triton_runtime.py``) Triton importable
                                and a device it can run on
    default_num_splits(...), make_workspace(q, num_splits)   (from ``split_kv.py``)
"""

from __future__ import annotations

import torch

from r4b_kernels.split_kv import (
    DEFAULT_BLOCK_N,
    CacheRows,
    capturing,
    check_launch,
    default_num_splits,
    launch,
    make_workspace,
)
from r4b_kernels.triton_runtime import TRITON_IMPORT_ERROR, is_available, unavailable_reason

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_HEAD_DIM = 256
_MAX_GROUP = 64  # BLOCK_G <= 64 rows of queries per tile

__all__ = ["DEFAULT_BLOCK_N", "decode_attention", "default_num_splits", "is_available", "make_workspace",
           "supports", "supports_paged", "unavailable_reason"]


def supports(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
) -> str | None:
    """None when the kernel handles these inputs, else a one-line reason (shapes, dtypes, layout, devices).

    Does not look at the values of ``seq_lens`` (that would sync with the device) nor at whether a
    Triton backend exists for the device (see ``is_available``).
    """
    if q.ndim != 3:
        return f"q must be [B, Hq, D] (one query token per sequence), got shape {tuple(q.shape)}"
    if k_cache.ndim != 4:
        return f"k_cache must be [B, Hkv, S, D], got shape {tuple(k_cache.shape)}"
    B, Hq, D = q.shape
    Bk, Hkv, S, Dk = k_cache.shape
    if Bk != B or Dk != D:
        return f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} differ in batch or head_dim"
    if min(B, Hq, Hkv, S, D) == 0:
        return f"empty input: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}"
    if Hq % Hkv != 0:
        return f"Hq = {Hq} query heads is not a multiple of Hkv = {Hkv} key/value heads"
    if Hq // Hkv > _MAX_GROUP:
        return f"GQA group Hq / Hkv = {Hq // Hkv} exceeds {_MAX_GROUP}"
    if D > _MAX_HEAD_DIM:
        return f"head_dim {D} exceeds {_MAX_HEAD_DIM}"
    if q.dtype not in _DTYPES:
        return f"q dtype {q.dtype} is not one of float32, bfloat16, float16"
    if k_cache.dtype not in _DTYPES:
        return f"k_cache dtype {k_cache.dtype} is not one of float32, bfloat16, float16"
    if k_cache.stride(-1) != 1:
        return f"k_cache's last dim must be contiguous (stride 1), got strides {k_cache.stride()}"
    tensors = {"q": q, "k_cache": k_cache}
    if v_cache is not None:
        if v_cache.shape != k_cache.shape:
            return f"v_cache shape {tuple(v_cache.shape)} differs from k_cache shape {tuple(k_cache.shape)}"
        if v_cache.dtype != k_cache.dtype:
            return f"v_cache dtype {v_cache.dtype} differs from k_cache dtype {k_cache.dtype}"
        if v_cache.stride(-1) != 1:
            return f"v_cache's last dim must be contiguous (stride 1), got strides {v_cache.stride()}"
        tensors["v_cache"] = v_cache
    if seq_lens is not None:
        if seq_lens.shape != (B,):
            return f"seq_lens must have shape ({B},), got {tuple(seq_lens.shape)}"
        if seq_lens.dtype not in (torch.int32, torch.int64):
            return f"seq_lens must be int32 or int64, got {seq_lens.dtype}"
        tensors["seq_lens"] = seq_lens
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        return "tensors on different devices: " + ", ".join(f"{n} on {t.device}" for n, t in tensors.items())
    return None


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
    if v_pool is not None and v_pool.shape != k_pool.shape:
        return f"v_pool shape {tuple(v_pool.shape)} differs from k_pool shape {tuple(k_pool.shape)}"

    def as_cache(pool: torch.Tensor) -> torch.Tensor:  # [NB, P, Hkv, D] -> a [B, Hkv, P, D] view, no data touched
        return pool.permute(0, 2, 1, 3)[:1].expand(B, Hkv, P, D)

    # the contiguous cache's checks (heads, dtypes, strides, seq_lens, devices) on views of the pools
    reason = supports(q, as_cache(k_pool), None if v_pool is None else as_cache(v_pool), seq_lens)
    if reason is not None:
        return reason.replace("k_cache", "k_pool").replace("v_cache", "v_pool")
    if block_table is not None:
        if block_table.ndim != 2 or block_table.shape[0] != B or block_table.shape[1] == 0:
            return f"block_table must be [B = {B}, max_blocks_per_seq >= 1], got shape {tuple(block_table.shape)}"
        if block_table.dtype not in (torch.int32, torch.int64):
            return f"block_table must be int32 or int64, got {block_table.dtype}"
        if block_table.device != q.device:
            return f"tensors on different devices: q on {q.device}, block_table on {block_table.device}"
    return None


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    *,
    block_table: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_n: int = DEFAULT_BLOCK_N,
    num_warps: int = 4,
    num_stages: int = 2,
    check_seq_lens: bool = True,
) -> torch.Tensor:
    """Attention of one query token per sequence over its first ``seq_lens[b]`` cache slots (with
    ``block_table``: tokens, read through the table from the pools k_cache / v_cache [NB, P, Hkv, D]).

    q [B, Hq, D], k_cache/v_cache [B, Hkv, S, D] (stride(-1) == 1), seq_lens [B] int32/int64 in
    [1, S], scale a float -> [B, Hq, D] in q's dtype (written into ``out`` when given: [B, Hq, D],
    q's dtype, any strides). ``num_splits`` None picks ``default_num_splits``; ``workspace`` is an
    optional preallocated ``make_workspace(q, num_splits)`` pair (only used when num_splits > 1).
    ``block_n`` (power of two >= 16), ``num_warps`` and ``num_stages`` are the split kernel's tile
    size and launch options (see split_kv.py for the defaults).
    ``check_seq_lens`` validates 1 <= seq_lens <= S on the host, which syncs with the device: pass
    False on hot paths and inside CUDA graphs (the kernel then clamps lengths to [0, S] for memory
    safety, and a length-0 sequence yields zeros); it is skipped while compiling or capturing a CUDA graph.
    Paged: ``num_splits`` None picks for a capacity of M * P tokens, and ``check_seq_lens`` also checks
    the block ids in use (0 <= id < NB); unchecked, they are clamped to [0, NB) in the kernel.
    Raises ValueError for unsupported inputs.
    """
    if TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"Triton is not available: {TRITON_IMPORT_ERROR!r}")
    if block_table is None:
        reason = supports(q, k_cache, v_cache, seq_lens)
    else:
        reason = supports_paged(q, k_cache, v_cache, block_table, seq_lens)
    if reason is not None:
        raise ValueError(f"decode_attention: {reason}.")
    rows = _cache_rows(k_cache, v_cache, block_table)
    num_splits, out, o_part, lse_part = check_launch("decode_attention", q, rows, num_splits, out, workspace,
                                                     block_n)
    if check_seq_lens and not torch.compiler.is_compiling() and not capturing(q.device):  # host syncs
        if block_table is None:
            lo, hi = int(seq_lens.min()), int(seq_lens.max())
            if lo < 1 or hi > rows.max_len:
                raise ValueError(f"decode_attention: seq_lens must lie in [1, S = {rows.max_len}], got min {lo}, "
                                 f"max {hi}.")
        else:
            _check_lengths_and_blocks(block_table, seq_lens, rows.num_blocks, rows.block_size)
    launch(q, rows, seq_lens, scale, num_splits, out, o_part, lse_part, block_n, num_warps, num_stages)
    return out


def _cache_rows(k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor | None) -> CacheRows:
    """Where the kernel reads K/V rows (block, slot) of KV head h."""
    if block_table is None:  # one block of S rows per sequence: row (b, t) of head h is k[b, h, t]
        B, Hkv, S, _ = k.shape
        return CacheRows(k, v, (k.stride(0), k.stride(2), k.stride(1)), (v.stride(0), v.stride(2), v.stride(1)),
                         Hkv, S, B)
    NB, P, Hkv, _ = k.shape  # row (block, slot) of head h is k[block, slot, h]
    return CacheRows(k, v, k.stride()[:3], v.stride()[:3], Hkv, block_table.shape[1] * P, NB, block_table, P)


def _check_lengths_and_blocks(block_table: torch.Tensor, seq_lens: torch.Tensor, num_blocks: int,
                              block_size: int) -> None:
    """1 <= seq_lens <= M * P and every block id a sequence uses in [0, num_blocks); raises ValueError."""
    M = block_table.shape[1]
    lo, hi = int(seq_lens.min()), int(seq_lens.max())
    if lo < 1 or hi > M * block_size:
        raise ValueError(
            f"decode_attention: seq_lens must lie in [1, max_blocks_per_seq * block_size = "
            f"{M} * {block_size}], got min {lo}, max {hi}."
        )
    used = torch.arange(M, device=block_table.device)[None, :] * block_size < seq_lens[:, None]  # [B, M]
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"decode_attention: block_table[{b}, {j}] = {int(block_table[b, j])} is used by sequence {b} "
            f"(length {int(seq_lens[b])}) but lies outside the pool's [0, {num_blocks}) blocks."
        )
