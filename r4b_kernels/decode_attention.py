"""Split-KV ("flash-decoding") GQA decode attention in Triton: one new query token per sequence.

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
    k_cache  [B, Hkv, S, D]      a layer's view of KVCache.k; any strides except stride(-1) == 1
    v_cache  [B, Hkv, S, D]      same shape and dtype as k_cache
    seq_lens [B]                 int32/int64, 1 <= L_b <= S
    out      [B, Hq, D]          q's dtype (optional preallocated ``out=``, any strides)
    O_part   [B, Hq, NS, D]      fp32 workspace: each split's normalised partial output
    lse_part [B, Hq, NS]         fp32 workspace: each split's log2-sum-exp of its scaled scores

Grid:
    stage 1 ``_split_kernel``:  (B, Hkv, NS), one program per (sequence, KV head, split)
    stage 2 ``_merge_kernel``:  (B, Hq), one program per (sequence, query head); skipped when NS == 1
                                (stage 1 then writes ``out`` directly)

Algorithm:
    Stage 1. Program (b, j, i) loads the G query heads that share KV head j as one [BLOCK_G, BLOCK_D]
    tile, so each K/V tile is read once per group, not once per query head. Sequence b is cut into NS
    splits of ``split_len = roundup(cdiv(L_b, NS), BLOCK_N)`` slots (per sequence, in the kernel, so a
    ragged batch needs no host sync); split i covers [i * split_len, min((i + 1) * split_len, L_b)).
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

Entry points:
    decode_attention(...)       eager call; validates inputs (ValueError), optional out= / workspace=
    decode_attention_op(...)    in ``decode_op.py``: the same as the custom op
                                ``torch.ops.r4b.decode_attention`` (torch.compile, CUDA graphs)
    supports(q, k_cache, ...)   None or why these tensors are unsupported (shapes, dtypes, layout)
    is_available(device), unavailable_reason(device)   (from ``triton_runtime.py``) Triton importable
                                and a device it can run on
    default_num_splits(...), make_workspace(q, num_splits)
"""

from __future__ import annotations

import contextlib
import math

import torch

from r4b_kernels.triton_runtime import (
    TRITON_IMPORT_ERROR,
    interpret_env,
    interpretable_jit_functions,
    is_available,
    unavailable_reason,
    use_interpreter,
    wrap_kernel,
)

if TRITON_IMPORT_ERROR is None:  # Triton is optional: the SDPA path works without it
    import triton.language as tl
else:
    tl = None

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_HEAD_DIM = 256
_MAX_GROUP = 64  # BLOCK_G <= 64 rows of queries per tile
_MAX_SPLITS = 64
_INTERPRET_SPLITS = 4
_PROGRAMS_PER_SM = 4  # ~ how many (bf16, D=128) split programs fit on one SM at once
DEFAULT_BLOCK_N = 64

__all__ = ["decode_attention", "default_num_splits", "is_available", "make_workspace", "supports",
           "unavailable_reason"]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


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


def default_num_splits(batch: int, n_kv_heads: int, capacity: int, device: torch.device | str,
                       block_n: int = DEFAULT_BLOCK_N) -> int:
    """Splits of the sequence axis for a launch: from the SM count and the capacity S (not seq_lens).

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


def _capturing(device: torch.device) -> bool:
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
    Q, K, V, SEQ_LENS, OUT, O_PART, LSE_PART,
    qk_scale,  # scale * log2(e): scores live in base 2
    S, num_splits,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_od,
    G: tl.constexpr, D: tl.constexpr,
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
    seq_len = tl.minimum(tl.maximum(seq_len, 0), S)  # memory safety when lengths were not validated
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

    k_base = K + pid_b * stride_kb + pid_kv * stride_kh
    v_base = V + pid_b * stride_vb + pid_kv * stride_vh
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max (base 2)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)  # running sum of p @ V

    for n0 in range(start, end, BLOCK_N):  # every tile holds >= 1 valid slot, so m_new is finite
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        mask_n = offs_n < end
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
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
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
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
# Host entry point
# --------------------------------------------------------------------------------------------------


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
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
    """Attention of one query token per sequence over its first ``seq_lens[b]`` cache slots.

    q [B, Hq, D], k_cache/v_cache [B, Hkv, S, D] (stride(-1) == 1), seq_lens [B] int32/int64 in
    [1, S], scale a float -> [B, Hq, D] in q's dtype (written into ``out`` when given: [B, Hq, D],
    q's dtype, any strides). ``num_splits`` None picks ``default_num_splits``; ``workspace`` is an
    optional preallocated ``make_workspace(q, num_splits)`` pair (only used when num_splits > 1).
    ``block_n`` (power of two >= 16), ``num_warps`` and ``num_stages`` are the split kernel's tile
    size and launch options (see the module docstring for the defaults).
    ``check_seq_lens`` validates 1 <= seq_lens <= S on the host, which syncs with the device: pass
    False on hot paths and inside CUDA graphs (the kernel then clamps lengths to [0, S] for memory
    safety, and a length-0 sequence yields zeros); it is skipped while compiling or capturing a CUDA graph.
    Raises ValueError for unsupported inputs.
    """
    if TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"Triton is not available: {TRITON_IMPORT_ERROR!r}")
    reason = supports(q, k_cache, v_cache, seq_lens)
    if reason is not None:
        raise ValueError(f"decode_attention: {reason}.")
    B, Hq, D = q.shape
    _, Hkv, S, _ = k_cache.shape
    G = Hq // Hkv
    if not isinstance(block_n, int) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"decode_attention: block_n must be a power of two >= 16, got {block_n!r}.")
    if num_splits is None:
        num_splits = default_num_splits(B, Hkv, S, q.device, block_n)
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1:
        raise ValueError(f"decode_attention: num_splits must be a positive int or None, got {num_splits!r}.")
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"decode_attention: out must be {tuple(q.shape)} {q.dtype} on {q.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}."
        )
    if check_seq_lens and not torch.compiler.is_compiling() and not _capturing(q.device):
        lo, hi = int(seq_lens.min()), int(seq_lens.max())  # host sync
        if lo < 1 or hi > S:
            raise ValueError(f"decode_attention: seq_lens must lie in [1, S = {S}], got min {lo}, max {hi}.")

    if num_splits > 1:
        if workspace is None:
            workspace = make_workspace(q, num_splits)
        o_part, lse_part = workspace
        if (o_part.shape != (B, Hq, num_splits, D) or lse_part.shape != (B, Hq, num_splits)
                or o_part.dtype != torch.float32 or lse_part.dtype != torch.float32
                or not o_part.is_contiguous() or not lse_part.is_contiguous()
                or o_part.device != q.device or lse_part.device != q.device):
            raise ValueError(
                f"decode_attention: workspace must be contiguous fp32 ({(B, Hq, num_splits, D)}, "
                f"{(B, Hq, num_splits)}) on {q.device}; use make_workspace(q, num_splits)."
            )
    else:
        o_part, lse_part = out, out  # unused by the kernel (WRITE_OUT)

    interpret = use_interpreter(q.device)
    split_kernel, merge_kernel = wrap_kernel(_split_kernel, interpret), wrap_kernel(_merge_kernel, interpret)
    launch = {"num_warps": num_warps, "num_stages": num_stages}

    with interpretable_jit_functions() if interpret else contextlib.nullcontext():
        _launch(split_kernel, merge_kernel, interpret, q, k_cache, v_cache, seq_lens, scale, num_splits, out, o_part,
                lse_part, G, block_n, launch)
    return out


def _launch(split_kernel, merge_kernel, interpret, q, k_cache, v_cache, seq_lens, scale, num_splits, out, o_part,
            lse_part, G, block_n, launch) -> None:
    B, Hq, D = q.shape
    _, Hkv, S, _ = k_cache.shape
    block_g = max(16, _next_pow2(G))
    block_d = max(16, _next_pow2(D))
    upcast = interpret and q.dtype == torch.bfloat16
    split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, seq_lens, out, o_part, lse_part,
        float(scale) * math.log2(math.e),
        S, num_splits,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        G=G, D=D, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n,
        WRITE_OUT=num_splits == 1, IEEE_DOT=q.dtype == torch.float32 or upcast, UPCAST=upcast,
        **launch,
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
