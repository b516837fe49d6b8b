"""The decode-attention kernel as the custom op ``torch.ops.r4b.decode_attention`` (torch.library).

A custom op is opaque to torch.compile: the compiled decode step (``fullgraph=True``) calls it without a
graph break, its fake implementation gives the output's shape and dtype, and it is capturable in CUDA
graphs because the call makes no host sync (lengths are trusted: ``check_seq_lens=False``, clamped to
[0, S] in the kernel). The kernel itself, and the eager ``decode_attention``, are in
``decode_attention.py``.
"""

from __future__ import annotations

import torch

from r4b_kernels.decode_attention import decode_attention, default_num_splits, supports

__all__ = ["decode_attention_op"]


def _op_impl(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
             scale: float, num_splits: int) -> torch.Tensor:
    return decode_attention(q, k_cache, v_cache, seq_lens, scale, num_splits, check_seq_lens=False)


def _op_fake(q, k_cache, v_cache, seq_lens, scale, num_splits):
    return q.new_empty(q.shape)  # contiguous [B, Hq, D], like the real output


def _register_op():
    """torch.ops.r4b.decode_attention, registered once per process (a re-imported module reuses it)."""
    if not hasattr(torch.library, "custom_op"):  # pragma: no cover  (torch < 2.4)
        return None
    try:
        return torch.ops.r4b.decode_attention
    except (AttributeError, RuntimeError):
        op = torch.library.custom_op("r4b::decode_attention", mutates_args=())(_op_impl)
        op.register_fake(_op_fake)
        return torch.ops.r4b.decode_attention


_decode_op = _register_op()


def decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """``decode_attention`` as the custom op ``torch.ops.r4b.decode_attention``: opaque to torch.compile
    (no graph break, ``fullgraph=True`` works, capturable in CUDA graphs) and free of host syncs
    (``check_seq_lens=False``: lengths are trusted, clamped to [0, S] in the kernel). ``num_splits`` None
    is resolved here from shapes only. Shapes/dtypes are still validated (ValueError)."""
    reason = supports(q, k_cache, v_cache, seq_lens)
    if reason is not None:
        raise ValueError(f"decode_attention: {reason}.")
    if num_splits is None:
        num_splits = default_num_splits(q.shape[0], k_cache.shape[1], k_cache.shape[2], q.device)
    if _decode_op is None:  # pragma: no cover
        return _op_impl(q, k_cache, v_cache, seq_lens, float(scale), int(num_splits))
    return _decode_op(q, k_cache, v_cache, seq_lens, float(scale), int(num_splits))
