"""Paged split-KV GQA decode attention in Triton: one new query token per sequence, K/V read through a block table.

The same algorithm as ``decode_attention.py`` (read its docstring first: GQA packing, online softmax in
base 2, splits, merge, precision, interpreter notes); only where a sequence's keys live differs. Instead
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

Kernel: ``_paged_split_kernel`` has the grid (B, Hkv, NS) of ``_split_kernel`` and the same split
ranges; inside a BLOCK_N-token tile it looks up each token's block (``block_table[b, t // P]``, a
small gather that stays in L1) and loads row ``t % P`` of that block: one contiguous D-vector per token
and KV head, so tiles may span block boundaries and P need not relate to BLOCK_N. Block ids are
clamped to [0, NB) for memory safety when inputs were not validated. The merge is ``_merge_kernel``
of decode_attention.py, with the same workspace (``make_workspace``).

Entry points:
    paged_decode_attention(...)   eager call; validates inputs (ValueError), optional out= / workspace=
    paged_decode_attention_op     in ``decode_op.py``: the custom op ``torch.ops.r4b.paged_decode_attention``
                                  and its dispatch between this kernel and the gather-then-SDPA path
    supports_paged(...)           None or why these tensors are unsupported
"""

from __future__ import annotations

import contextlib
import math

import torch

from r4b_kernels.decode_attention import (
    DEFAULT_BLOCK_N,
    _capturing,
    _merge_kernel,
    _next_pow2,
    default_num_splits,
    make_workspace,
    supports,
)
from r4b_kernels.triton_runtime import (
    TRITON_IMPORT_ERROR,
    interpretable_jit_functions,
    use_interpreter,
    wrap_kernel,
)

if TRITON_IMPORT_ERROR is None:  # Triton is optional: the SDPA path works without it
    import triton.language as tl
else:
    tl = None

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
# Kernel (wrapped by ``triton_runtime.wrap_kernel``, as in decode_attention.py)
# --------------------------------------------------------------------------------------------------


def _paged_split_kernel(
    Q, K, V, BLOCK_TABLE, SEQ_LENS, OUT, O_PART, LSE_PART,
    qk_scale,  # scale * log2(e): scores live in base 2
    max_len, num_blocks, num_splits,  # max_len = M * P, the longest length the table describes
    stride_qb, stride_qh, stride_qd,
    stride_kblk, stride_kslot, stride_kh,
    stride_vblk, stride_vslot, stride_vh,
    stride_tb, stride_tm,
    stride_ob, stride_oh, stride_od,
    G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    WRITE_OUT: tl.constexpr, IEEE_DOT: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_kv = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    n_q_heads = tl.num_programs(1) * G

    seq_len = tl.load(SEQ_LENS + pid_b).to(tl.int32)
    seq_len = tl.minimum(tl.maximum(seq_len, 0), max_len)  # memory safety when lengths were not validated
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = pid_s * split_len
    end = tl.minimum(start + split_len, seq_len)  # empty when start >= seq_len

    offs_g = tl.arange(0, BLOCK_G)  # [BLOCK_G] row g <-> query head pid_kv * G + g
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask_g = offs_g < G
    mask_d = offs_d < D
    heads = pid_kv * G + offs_g  # [BLOCK_G] int64
    q_ptrs = Q + pid_b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    in_dtype = Q.dtype.element_ty
    if UPCAST:
        q = q.to(tl.float32)

    table_row = BLOCK_TABLE + pid_b * stride_tb
    k_head = K + pid_kv * stride_kh
    v_head = V + pid_kv * stride_vh
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    for n0 in range(start, end, BLOCK_N):  # every tile holds >= 1 valid token, so m_new is finite
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] token positions of sequence b
        mask_n = offs_n < end
        block = tl.load(table_row + (offs_n // PAGE) * stride_tm, mask=mask_n, other=0).to(tl.int64)
        block = tl.minimum(tl.maximum(block, 0), num_blocks - 1)  # [BLOCK_N] pool block of each token
        slot = (offs_n % PAGE).to(tl.int64)  # [BLOCK_N] row inside that block
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k_rows = block * stride_kblk + slot * stride_kslot  # [BLOCK_N]
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        k = k.to(in_dtype)  # [BLOCK_N, BLOCK_D]
        if UPCAST:
            k = k.to(tl.float32)
        if IEEE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_G, BLOCK_N] fp32
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_G]
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_G, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = block * stride_vblk + slot * stride_vslot
        v = tl.load(v_head + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = v.to(in_dtype)  # [BLOCK_N, BLOCK_D]
        if IEEE_DOT:
            if UPCAST:
                pv = tl.dot(p.to(in_dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(in_dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    nonempty = l_i > 0.0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]  # [BLOCK_G, BLOCK_D]; 0 for an empty split
    row_mask = mask_g[:, None] & mask_d[None, :]
    if WRITE_OUT:
        out_ptrs = OUT + pid_b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(out_ptrs, o.to(OUT.dtype.element_ty), mask=row_mask)
    else:
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))  # [BLOCK_G]
        part = (pid_b * n_q_heads + heads) * num_splits + pid_s  # [BLOCK_G] row of O_part / lse_part
        tl.store(O_PART + part[:, None] * D + offs_d[None, :], o, mask=row_mask)
        tl.store(LSE_PART + part, lse, mask=mask_g)


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
    B, Hq, D = q.shape
    NB, P, Hkv, _ = k_pool.shape
    max_len = block_table.shape[1] * P
    if not isinstance(block_n, int) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"paged_decode_attention: block_n must be a power of two >= 16, got {block_n!r}.")
    if num_splits is None:
        num_splits = default_num_splits(B, Hkv, max_len, q.device, block_n)
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1:
        raise ValueError(f"paged_decode_attention: num_splits must be a positive int or None, got {num_splits!r}.")
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"paged_decode_attention: out must be {tuple(q.shape)} {q.dtype} on {q.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}."
        )
    if check_seq_lens and not torch.compiler.is_compiling() and not _capturing(q.device):
        _check_lengths_and_blocks(block_table, seq_lens, NB, P)  # host sync

    if num_splits > 1:
        if workspace is None:
            workspace = make_workspace(q, num_splits)
        o_part, lse_part = workspace
        if (o_part.shape != (B, Hq, num_splits, D) or lse_part.shape != (B, Hq, num_splits)
                or o_part.dtype != torch.float32 or lse_part.dtype != torch.float32
                or not o_part.is_contiguous() or not lse_part.is_contiguous()
                or o_part.device != q.device or lse_part.device != q.device):
            raise ValueError(
                f"paged_decode_attention: workspace must be contiguous fp32 ({(B, Hq, num_splits, D)}, "
                f"{(B, Hq, num_splits)}) on {q.device}; use make_workspace(q, num_splits)."
            )
    else:
        o_part, lse_part = out, out  # unused by the kernel (WRITE_OUT)

    interpret = use_interpreter(q.device)
    split_kernel = wrap_kernel(_paged_split_kernel, interpret)
    merge_kernel = wrap_kernel(_merge_kernel, interpret)
    G = Hq // Hkv
    block_g, block_d = max(16, _next_pow2(G)), max(16, _next_pow2(D))
    upcast = interpret and q.dtype == torch.bfloat16
    with interpretable_jit_functions() if interpret else contextlib.nullcontext():
        split_kernel[(B, Hkv, num_splits)](
            q, k_pool, v_pool, block_table, seq_lens, out, o_part, lse_part,
            float(scale) * math.log2(math.e),
            max_len, NB, num_splits,
            q.stride(0), q.stride(1), q.stride(2),
            k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
            v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
            block_table.stride(0), block_table.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            G=G, D=D, PAGE=P, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n,
            WRITE_OUT=num_splits == 1, IEEE_DOT=q.dtype == torch.float32 or upcast, UPCAST=upcast,
            num_warps=num_warps, num_stages=num_stages,
        )
        if num_splits > 1:
            block_s = _next_pow2(num_splits)
            merge_kernel[(B, Hq)](
                o_part, lse_part, out,
                num_splits,
                out.stride(0), out.stride(1), out.stride(2),
                D=D, BLOCK_D=block_d, BLOCK_S=block_s, CHUNK=min(block_s, 16),
                num_warps=4,
            )
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
