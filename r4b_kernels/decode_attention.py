"""Split-KV ("flash-decoding") GQA decode attention in Triton over a contiguous KV cache: one new query
token per sequence.

The kernels, the algorithm, the split heuristic, precision and the launch defaults are in ``split_kv.py``
(read its docstring first); this module is the contiguous cache's entry point and input checks. The
paged cache's is ``paged_decode_attention.py``: the same kernel, reading K/V through a block table.

Shapes:
    q        [B, Hq, D]          already RoPE'd; any strides
    k_cache  [B, Hkv, S, D]      a layer's view of KVCache.k; any strides except stride(-1) == 1
    v_cache  [B, Hkv, S, D]      same shape and dtype as k_cache
    seq_lens [B]                 int32/int64, 1 <= L_b <= S: sequence b's keys are slots [0, L_b)
    out      [B, Hq, D]          q's dtype (optional preallocated ``out=``, any strides)

Entry points:
    decode_attention(...)       eager call; validates inputs (ValueError), optional out= / workspace=
    decode_attention_op(...)    in ``decode_op.py``: the same as the custom op
                                ``torch.ops.r4b.decode_attention`` (torch.compile, CUDA graphs)
    supports(q, k_cache, ...)   None or why these tensors are unsupported (shapes, dtypes, layout)
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
           "supports", "unavailable_reason"]


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
    size and launch options (see split_kv.py for the defaults).
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
    B, Hkv, S, _ = k_cache.shape
    # one block of S rows per sequence: row (block b, slot t) of KV head h is k_cache[b, h, t]
    rows = CacheRows(k_cache, v_cache, (k_cache.stride(0), k_cache.stride(2), k_cache.stride(1)),
                     (v_cache.stride(0), v_cache.stride(2), v_cache.stride(1)), Hkv, S, B)
    num_splits, out, o_part, lse_part = check_launch("decode_attention", q, rows, num_splits, out, workspace,
                                                     block_n)
    if check_seq_lens and not torch.compiler.is_compiling() and not capturing(q.device):
        lo, hi = int(seq_lens.min()), int(seq_lens.max())  # host sync
        if lo < 1 or hi > S:
            raise ValueError(f"decode_attention: seq_lens must lie in [1, S = {S}], got min {lo}, max {hi}.")
    launch(q, rows, seq_lens, scale, num_splits, out, o_part, lse_part, block_n, num_warps, num_stages)
    return out
