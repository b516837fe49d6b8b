"""The split-KV ("flash-decoding") GQA decode kernels in Triton, shared by the contiguous and the paged cache.

Notation:
    B    sequences in the batch             S    cache slots per sequence (capacity)
    Hq   query heads                        Hkv  key/value heads
    G    = Hq // Hkv, query heads per KV head (GQA group); query head h reads KV head h // G
    D    head_dim (any 1..256; 64, 72, 128 in R-4B)
    NS   number of splits of the sequence axis (``num_splits``)
    L_b  = seq_lens[b], valid slots of sequence b: its keys are slots [0, L_b)
    BLOCK_G = max(16, next_pow2(G))   query rows of a tile (G real rows, the rest masked)
    BLOCK_D = max(16, next_pow2(D))   head_dim padded with masked loads (72 -> 128)
    BLOCK_N                            key/value slots per tile (64 by default)

Shapes:
    q        [B, Hq, D]          already RoPE'd; any strides
    K, V     a cache read as blocks of rows: token t of sequence b is row (block, slot) with, for
             the contiguous cache [B, Hkv, S, D]: block = b, slot = t (one block of S rows per sequence);
             the paged pool [NB, P, Hkv, D]: block = block_table[b, t // P], slot = t % P
             (``decode_attention(..., block_table=)``); a row is one contiguous D-vector (stride(-1) == 1)
    seq_lens [B]                 int32/int64, 1 <= L_b <= S
    out      [B, Hq, D]          q's dtype (optional preallocated ``out=``, any strides)
    O_part   [B, Hq, NS, D]      fp32 workspace: each split's normalised partial output
    lse_part [B, Hq, NS]         fp32 workspace: each split's log2-sum-exp of its scaled scores

A contiguous cache is a paged one with one block of S slots per sequence and the block table
arange(B)[:, None]; the kernel takes that case as ``PAGED=False`` (a constexpr), so that it loads no
table and divides by no block size: one kernel body, two specialisations.

Grid:
    stage 1 ``_split_kernel``:  (B, Hkv, NS), one program per (sequence, KV head, split)
    stage 2 ``_merge_kernel``:  (B, Hq), one program per (sequence, query head); skipped when NS == 1
                                (stage 1 then writes ``out`` directly)

Algorithm:
    Stage 1. Program (b, j, i) loads the G query heads that share KV head j as one [BLOCK_G, BLOCK_D]
    tile, so each K/V tile is read once per group, not once per query head. Sequence b is cut into NS
    splits of ``split_len = roundup(cdiv(L_b, NS), BLOCK_N)`` slots (per sequence, in the kernel, so a
    ragged batch needs no host sync); split i covers [i * split_len, min((i + 1) * split_len, L_b)).
    (Paged: L_b <= M * P, and each BLOCK_N-token tile looks up its tokens' blocks in the table, a
    small gather that stays in L1, so tiles may span block boundaries and P need not relate to BLOCK_N;
    block ids are clamped to [0, NB) for memory safety when inputs were not validated.)
    Over that range it runs the online softmax in fp32, in base 2 (scores scaled by scale * log2(e)):

        s   = (Q @ K_tile^T) * scale * log2(e)          [BLOCK_G, BLOCK_N]   tl.dot, masked slots -inf
        m'  = max(m, rowmax(s));  p = exp2(s - m');  a = exp2(m - m')
        l   = a * l + rowsum(p);  acc = a * acc + p @ V_tile                 [BLOCK_G, BLOCK_D]

    and writes O_i = acc / l and lse_i = m + log2(l). A split that starts at or past L_b (short
    sequences in a ragged batch, or more splits than blocks) runs no iteration and writes the neutral
    partial O_i = 0, lse_i = -inf.
    Stage 2. For each (b, h): lse_max = max_i lse_i, w_i = exp2(lse_i - lse_max) (0 for neutral
    splits), out = sum_i w_i O_i / sum_i w_i, cast to q's dtype. Split 0 always holds slot 0, so
    lse_max is finite whenever L_b >= 1.

Precision: accumulation, softmax and the merge are fp32. fp32 inputs use ``tl.dot(...,
input_precision="ieee")`` (no TF32); bf16/fp16 inputs use tensor-core dots with fp32 accumulation, the
probabilities cast to the input dtype for P @ V (as FlashAttention does). K/V tiles are converted to
q's dtype after loading, so a bf16 cache with an fp32 query behaves like ``k.to(q.dtype)``.

Splits: ``num_splits=None`` picks ``default_num_splits``: on a GPU about four programs per SM
(B * Hkv * NS ~ 4 * SMs), no more than one split per two BLOCK_N tiles of the capacity S, at most 64;
it depends only on shapes (S, not seq_lens), so it is stable under CUDA graphs. Under the interpreter
(CPU) it is a small fixed number.

Launch defaults (BLOCK_N = 64, 4 warps, 2 pipeline stages), from compiling for sm_80/sm_90 without a
GPU (not yet timed on one): bf16, G = 4, D = 128 uses 80 registers, no spills, 38 KiB of shared memory
(cp.async double buffering of the K/V tiles), so about 5 programs fit on an H100/H200 SM; fp32 uses 95
registers and 76 KiB. Triton's default of 3 stages would need 140 KiB for fp32, more than consumer GPUs
have. K/V rows are loaded with 16-byte vectors only when D is a multiple of 16 (Triton specialises
strides divisible by 16), so D = 72 works but loads narrower.

Interpreter: CPU tensors (or TRITON_INTERPRET=1) run the kernels under the Triton interpreter; how
they are wrapped per mode is in ``triton_runtime.py``. The interpreter cannot do bf16 arithmetic (it
stores bf16 as uint16 and its tl.dot multiplies the bit patterns), so there the bf16 dot operands are
upcast to fp32 after the same roundings as on the GPU (``UPCAST``); the bf16 tensor-core path itself
only runs on a GPU.

Host side: ``check_launch`` checks the launch options shared by both entry points (block_n,
num_splits, out=, workspace=) and ``launch`` runs both stages. The entry points with their input checks
are in ``decode_attention.py`` (one entry, ``block_table=`` for the paged cache).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from r4b_kernels.triton_runtime import (
    TRITON_IMPORT_ERROR,
    interpret_env,
    interpretable_jit_functions,
    use_interpreter,
    wrap_kernel,
)

if TRITON_IMPORT_ERROR is None:  # Triton is optional: the SDPA path works without it
    import triton.language as tl
else:
    tl = None

_MAX_SPLITS = 64
_INTERPRET_SPLITS = 4
_PROGRAMS_PER_SM = 4  # ~ how many (bf16, D=128) split programs fit on one SM at once
DEFAULT_BLOCK_N = 64

__all__ = ["DEFAULT_BLOCK_N", "CacheRows", "capturing", "check_launch", "default_num_splits", "launch",
           "make_workspace"]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def default_num_splits(batch: int, n_kv_heads: int, capacity: int, device: torch.device | str,
                       block_n: int = DEFAULT_BLOCK_N) -> int:
    """Splits of the sequence axis for a launch: from the SM count and the capacity (S or M * P, not
    seq_lens).

    GPU: about four programs per SM (B * Hkv * NS ~ 4 * SMs), at least two BLOCK_N tiles per split
    (so each split amortises writing its partial), at most ``_MAX_SPLITS``. Interpreter: a small fixed
    number (enough to exercise the merge).
    """
    device = torch.device(device)
    max_by_len = max(1, math.ceil(capacity / (2 * block_n)))
    if device.type != "cuda" or interpret_env():
        return max(1, min(_INTERPRET_SPLITS, max_by_len))
    sms = _sm_count(device)
    want = max(1, math.ceil(_PROGRAMS_PER_SM * sms / max(1, batch * n_kv_heads)))
    return max(1, min(want, max_by_len, _MAX_SPLITS))


_SM_COUNTS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def capturing(device: torch.device) -> bool:
    """Inside a CUDA graph capture (where a host sync would fail)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def make_workspace(q: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty fp32 workspace for ``num_splits`` > 1: (O_part [B, Hq, NS, D], lse_part [B, Hq, NS])."""
    B, Hq, D = q.shape
    return (torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device),
            torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device))


# --------------------------------------------------------------------------------------------------
# Kernels. Plain functions, wrapped by ``triton_runtime.wrap_kernel`` as compiled (triton.jit) or interpreted
# (InterpretedFunction) at the first launch of each mode. Besides Triton's own library (tl.max, tl.sum,
# tl.cdiv, ...: see ``triton_runtime.interpretable_jit_functions``) they call no jitted function.
# --------------------------------------------------------------------------------------------------


def _split_kernel(
    Q, K, V, BLOCK_TABLE, SEQ_LENS, OUT, O_PART, LSE_PART,
    qk_scale,  # scale * log2(e): scores live in base 2
    max_len, num_blocks, num_splits,  # max_len: S, or M * P for a block table of width M
    stride_qb, stride_qh, stride_qd,
    stride_kblk, stride_kslot, stride_kh,  # row (block, slot) of KV head h: block * stride_kblk + ...
    stride_vblk, stride_vslot, stride_vh,
    stride_tb, stride_tm,  # the block table's (unused when not PAGED)
    stride_ob, stride_oh, stride_od,
    G: tl.constexpr, D: tl.constexpr,
    PAGED: tl.constexpr,  # False: the contiguous cache, block = sequence, slot = token (no table read)
    PAGE: tl.constexpr,  # PAGED: tokens per block, P
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    WRITE_OUT: tl.constexpr,  # NS == 1: write the final output directly, no workspace
    IEEE_DOT: tl.constexpr,  # fp32 inputs: exact fp32 dots, no TF32
    UPCAST: tl.constexpr,  # interpreter + bf16: it cannot do bf16 arithmetic, so dot operands go to fp32
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
    in_dtype = Q.dtype.element_ty  # the dot operands' dtype (K/V are converted to it, like k.to(q.dtype))
    if UPCAST:
        q = q.to(tl.float32)

    if PAGED:
        table_row = BLOCK_TABLE + pid_b * stride_tb
        k_base = K + pid_kv * stride_kh
        v_base = V + pid_kv * stride_vh
    else:  # sequence b's rows are block b
        k_base = K + pid_b * stride_kblk + pid_kv * stride_kh
        v_base = V + pid_b * stride_vblk + pid_kv * stride_vh
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max (base 2)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)  # running sum of p @ V

    for n0 in range(start, end, BLOCK_N):  # every tile holds >= 1 valid slot, so m_new is finite
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] token positions of sequence b
        mask_n = offs_n < end
        if PAGED:
            block = tl.load(table_row + (offs_n // PAGE) * stride_tm, mask=mask_n, other=0).to(tl.int64)
            block = tl.minimum(tl.maximum(block, 0), num_blocks - 1)  # [BLOCK_N] pool block of each token
            slot = (offs_n % PAGE).to(tl.int64)  # [BLOCK_N] row inside that block
            k_rows = block * stride_kblk + slot * stride_kslot  # [BLOCK_N]
            v_rows = block * stride_vblk + slot * stride_vslot
        else:
            k_rows = offs_n * stride_kslot  # [BLOCK_N]
            v_rows = offs_n * stride_vslot
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
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
        v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = v.to(in_dtype)  # [BLOCK_N, BLOCK_D]
        if IEEE_DOT:
            if UPCAST:  # same rounding of p as the GPU's bf16 P @ V, then exact fp32 products
                pv = tl.dot(p.to(in_dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(in_dtype), v)  # tensor cores, fp32 accumulation
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


def _merge_kernel(
    O_PART, LSE_PART, OUT,
    num_splits,
    stride_ob, stride_oh, stride_od,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    row = (pid_b * tl.num_programs(1) + pid_h) * num_splits  # first split of (b, h)

    offs_s = tl.arange(0, BLOCK_S)  # [BLOCK_S] >= num_splits
    lse = tl.load(LSE_PART + row + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # all neutral (L_b = 0): weights 0
    den = tl.sum(tl.exp2(lse - lse_max), 0)

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, CHUNK):
        offs_c = s0 + tl.arange(0, CHUNK)  # [CHUNK]
        mask_c = offs_c < num_splits
        w = tl.exp2(tl.load(LSE_PART + row + offs_c, mask=mask_c, other=float("-inf")) - lse_max)
        o = tl.load(O_PART + (row + offs_c)[:, None] * D + offs_d[None, :],
                    mask=mask_c[:, None] & mask_d[None, :], other=0.0)  # [CHUNK, BLOCK_D]
        acc += tl.sum(w[:, None] * o, 0)
    out = acc / tl.where(den > 0.0, den, 1.0)
    out_ptrs = OUT + pid_b * stride_ob + pid_h * stride_oh + offs_d * stride_od
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=mask_d)


# --------------------------------------------------------------------------------------------------
# Host side, shared by both layouts
# --------------------------------------------------------------------------------------------------


class CacheRows(NamedTuple):
    """Where the kernel finds the K/V rows: the tensors, their (block, slot, head) strides, the longest
    length they hold (S or M * P), the block count, and the block table with its block size P (None:
    the contiguous cache, block = sequence)."""

    k: torch.Tensor
    v: torch.Tensor
    k_strides: tuple[int, int, int]
    v_strides: tuple[int, int, int]
    n_kv_heads: int
    max_len: int
    num_blocks: int
    block_table: torch.Tensor | None = None
    block_size: int = 1


def check_launch(name: str, q: torch.Tensor, rows: CacheRows, num_splits: int | None, out: torch.Tensor | None,
                 workspace: tuple[torch.Tensor, torch.Tensor] | None,
                 block_n: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The launch options of entry point ``name`` checked and filled in: (num_splits, out, O_part, lse_part).

    ``num_splits`` None picks ``default_num_splits`` for a capacity of ``rows.max_len`` (shapes only,
    stable under CUDA graphs); ``out`` None allocates [B, Hq, D] in q's dtype; ``workspace`` None
    allocates ``make_workspace`` when NS > 1. Raises ValueError naming the option and what it must be.
    """
    B, Hq, D = q.shape
    if not isinstance(block_n, int) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"{name}: block_n must be a power of two >= 16, got {block_n!r}.")
    if num_splits is None:
        num_splits = default_num_splits(B, rows.n_kv_heads, rows.max_len, q.device, block_n)
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1:
        raise ValueError(f"{name}: num_splits must be a positive int or None, got {num_splits!r}.")
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"{name}: out must be {tuple(q.shape)} {q.dtype} on {q.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}."
        )
    if num_splits == 1:
        return num_splits, out, out, out  # no workspace: the kernel writes out directly (WRITE_OUT)
    if workspace is None:
        workspace = make_workspace(q, num_splits)
    o_part, lse_part = workspace
    if (o_part.shape != (B, Hq, num_splits, D) or lse_part.shape != (B, Hq, num_splits)
            or o_part.dtype != torch.float32 or lse_part.dtype != torch.float32
            or not o_part.is_contiguous() or not lse_part.is_contiguous()
            or o_part.device != q.device or lse_part.device != q.device):
        raise ValueError(
            f"{name}: workspace must be contiguous fp32 ({(B, Hq, num_splits, D)}, "
            f"{(B, Hq, num_splits)}) on {q.device}; use make_workspace(q, num_splits)."
        )
    return num_splits, out, o_part, lse_part


def launch(q: torch.Tensor, rows: CacheRows, seq_lens: torch.Tensor, scale: float, num_splits: int,
           out: torch.Tensor, o_part: torch.Tensor, lse_part: torch.Tensor, block_n: int, num_warps: int,
           num_stages: int) -> None:
    """Stage 1 over (B, Hkv, NS), then stage 2 over (B, Hq) when NS > 1; inputs already checked."""
    B, Hq, D = q.shape
    G = Hq // rows.n_kv_heads
    interpret = use_interpreter(q.device)
    split_kernel, merge_kernel = wrap_kernel(_split_kernel, interpret), wrap_kernel(_merge_kernel, interpret)
    table = rows.block_table
    paged = table is not None
    block_d = max(16, _next_pow2(D))
    upcast = interpret and q.dtype == torch.bfloat16
    with interpretable_jit_functions() if interpret else contextlib.nullcontext():
        split_kernel[(B, rows.n_kv_heads, num_splits)](
            q, rows.k, rows.v, table if paged else seq_lens, seq_lens, out, o_part, lse_part,  # seq_lens:
            float(scale) * math.log2(math.e),                             # a stand-in pointer, never read
            rows.max_len, rows.num_blocks, num_splits,
            q.stride(0), q.stride(1), q.stride(2),
            *rows.k_strides, *rows.v_strides,
            *(table.stride() if paged else (0, 0)),
            out.stride(0), out.stride(1), out.stride(2),
            G=G, D=D, PAGED=paged, PAGE=rows.block_size if paged else 1, BLOCK_G=max(16, _next_pow2(G)),
            BLOCK_D=block_d, BLOCK_N=block_n,
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
