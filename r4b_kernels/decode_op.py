"""The decode-attention kernels as custom ops (torch.library), and the paged op's dispatch.

``torch.ops.r4b.decode_attention`` wraps the kernel on a contiguous cache; ``torch.ops.r4b.paged_decode_attention``
on a paged one (``decode_attention(..., block_table=)``). ``paged_decode_attention_op(..., backend)`` picks the
paged kernel on CUDA and the gather-then-SDPA path (``paged_decode_attention_sdpa``) elsewhere, with the
rules of ``backend.resolve_decode_backend`` (shared with the contiguous cache): "auto" = Triton on CUDA
when it can run these shapes, else SDPA (a one-line notice on CUDA); "triton" forced raises when it
cannot run (on the CPU it runs under TRITON_INTERPRET=1); "sdpa" always the PyTorch path.

A custom op is opaque to torch.compile: the compiled decode step (``fullgraph=True``) calls it without a
graph break, its fake implementation gives the output's shape and dtype, and it is capturable in CUDA
graphs because the call makes no host sync (lengths are trusted: ``check_seq_lens=False``, clamped to
[0, S] in the kernel). The kernel itself, and the eager ``decode_attention``, are in
``decode_attention.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from r4b_kernels.backend import BACKENDS, resolve_decode_backend
from r4b_kernels.decode_attention import decode_attention, default_num_splits, supports, supports_paged
from r4b_kernels.reference import gather_paged_tokens

__all__ = ["decode_attention_op", "paged_decode_attention_op", "paged_decode_attention_sdpa"]


def _op_impl(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
             scale: float, num_splits: int) -> torch.Tensor:
    return decode_attention(q, k_cache, v_cache, seq_lens, scale, num_splits, check_seq_lens=False)


def _fake(q: torch.Tensor, *args) -> torch.Tensor:
    """Both ops' fake implementation: a contiguous [B, Hq, D] in q's dtype, like the real output."""
    return q.new_empty(q.shape)


def _register_op(name: str, impl):
    """torch.ops.r4b.<name> for ``impl``, registered once per process (a re-imported module reuses it)."""
    if not hasattr(torch.library, "custom_op"):  # pragma: no cover  (torch < 2.4)
        return None
    try:
        return getattr(torch.ops.r4b, name)
    except (AttributeError, RuntimeError):
        op = torch.library.custom_op(f"r4b::{name}", mutates_args=())(impl)
        op.register_fake(_fake)
        return getattr(torch.ops.r4b, name)


_decode_op = _register_op("decode_attention", _op_impl)


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


# --------------------------------------------------------------------------------------------------
# Paged cache: the custom op, the SDPA path and the dispatch between them
# --------------------------------------------------------------------------------------------------


def _paged_impl(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                seq_lens: torch.Tensor, scale: float, num_splits: int) -> torch.Tensor:
    return decode_attention(q, k_pool, v_pool, seq_lens, scale, num_splits, block_table=block_table,
                            check_seq_lens=False)


_paged_op = _register_op("paged_decode_attention", _paged_impl)
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)  # SDPA's enable_gqa


def paged_decode_attention_sdpa(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The PyTorch path of the paged op (the CPU default): gather every block the table lists, then SDPA in
    q's dtype with a length mask. Static shapes, no host sync. Its cost follows the table's width M * P,
    not the lengths: callers pass a table sliced to (a bucket of) the batch's longest sequence.

    Gathered slots past a length are zeroed in the fresh copy: a recycled block may hold anything, NaN
    included, and SDPA adds -inf to a masked score, so a NaN key or value there would make the output NaN.
    (Redirecting unused entries to a known-finite block does not suffice: a sequence shorter than one
    block has none.) On the CPU this op costs about 3x SDPA over a contiguous cache of the same length
    (two gathers and two zeroing passes besides SDPA's own read).
    """
    Hq = q.shape[1]
    S = block_table.shape[1] * k_pool.shape[1]
    valid = torch.arange(S, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]  # [B, S]
    invalid = ~valid[:, :, None, None]  # [B, S, 1, 1]
    # [B, S, Hkv, D] fresh copies, zeroed in place past each length, then viewed as [B, Hkv, S, D]
    k = gather_paged_tokens(k_pool, block_table, S).to(q.dtype).masked_fill_(invalid, 0.0).transpose(1, 2)
    v = gather_paged_tokens(v_pool, block_table, S).to(q.dtype).masked_fill_(invalid, 0.0).transpose(1, 2)
    gqa = {}
    if k.shape[1] != Hq:  # query head h reads KV head h // G
        if _SDPA_HAS_GQA:
            gqa = {"enable_gqa": True}
        else:  # pragma: no cover  (torch < 2.5)
            k = k.repeat_interleave(Hq // k.shape[1], dim=1)  # [B, Hq, S, D]
            v = v.repeat_interleave(Hq // v.shape[1], dim=1)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=valid[:, None, None, :], scale=scale,
                                         **gqa)  # [B, Hq, 1, D]
    return out[:, :, 0]  # [B, Hq, D]


def paged_decode_attention_op(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    backend: str = "auto",
    num_splits: int | None = None,
) -> torch.Tensor:
    """One query token per sequence against a paged cache: q [B, Hq, D], k_pool/v_pool [NB, P, Hkv, D],
    block_table [B, M], seq_lens [B] -> [B, Hq, D] (q's dtype).

    ``backend`` "triton" runs the custom op ``torch.ops.r4b.paged_decode_attention`` (opaque to
    torch.compile, no host sync, CUDA-graph capturable; lengths trusted, clamped in the kernel); "sdpa"
    runs ``paged_decode_attention_sdpa``; "auto" resolves with ``backend.resolve_decode_backend`` on each call
    (inside a compiled step pass the resolved one). Shapes/dtypes are validated (ValueError).
    """
    if backend == "auto":
        backend = resolve_decode_backend(backend, q.device, q.dtype, q.shape[2], q.shape[1], k_pool.shape[2])
    if backend == "sdpa":
        return paged_decode_attention_sdpa(q, k_pool, v_pool, block_table, seq_lens, scale)
    if backend != "triton":
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    reason = supports_paged(q, k_pool, v_pool, block_table, seq_lens)
    if reason is not None:
        raise ValueError(f"paged_decode_attention: {reason}.")
    if num_splits is None:
        num_splits = default_num_splits(q.shape[0], k_pool.shape[2], block_table.shape[1] * k_pool.shape[1], q.device)
    if _paged_op is None:  # pragma: no cover
        return _paged_impl(q, k_pool, v_pool, block_table, seq_lens, float(scale), int(num_splits))
    return _paged_op(q, k_pool, v_pool, block_table, seq_lens, float(scale), int(num_splits))
