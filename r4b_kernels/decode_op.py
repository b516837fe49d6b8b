"""The decode-attention kernels as custom ops (torch.library), and the paged op's dispatch.

``torch.ops.r4b.decode_attention`` wraps the contiguous-cache kernel; ``torch.ops.r4b.paged_decode_attention``
the paged one (``paged_decode_attention.py``). ``paged_decode_attention_op(..., backend)`` picks the
paged kernel on CUDA and the gather-then-SDPA path (``paged_decode_attention_sdpa``) elsewhere, with the
rules of r4b_core/models/attention.py's ``resolve_decode_backend``: "auto" = Triton on CUDA when it can
run these shapes, else SDPA (a one-line notice on CUDA); "triton" forced raises when it cannot run (on
the CPU it runs under TRITON_INTERPRET=1); "sdpa" always the PyTorch path.

A custom op is opaque to torch.compile: the compiled decode step (``fullgraph=True``) calls it without a
graph break, its fake implementation gives the output's shape and dtype, and it is capturable in CUDA
graphs because the call makes no host sync (lengths are trusted: ``check_seq_lens=False``, clamped to
[0, S] in the kernel). The kernel itself, and the eager ``decode_attention``, are in
``decode_attention.py``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from r4b_kernels.decode_attention import decode_attention, default_num_splits, supports
from r4b_kernels.paged_decode_attention import paged_decode_attention, supports_paged
from r4b_kernels.reference import gather_paged_tokens
from r4b_kernels.triton_runtime import unavailable_reason

__all__ = ["decode_attention_op", "paged_decode_attention_op", "paged_decode_attention_sdpa",
           "resolve_paged_backend"]


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


# --------------------------------------------------------------------------------------------------
# Paged cache: the custom op, the SDPA path and the dispatch between them
# --------------------------------------------------------------------------------------------------


def _paged_impl(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                seq_lens: torch.Tensor, scale: float, num_splits: int) -> torch.Tensor:
    return paged_decode_attention(q, k_pool, v_pool, block_table, seq_lens, scale, num_splits, check_seq_lens=False)


def _paged_fake(q, k_pool, v_pool, block_table, seq_lens, scale, num_splits):
    return q.new_empty(q.shape)


def _register_paged_op():
    """torch.ops.r4b.paged_decode_attention, registered once per process."""
    if not hasattr(torch.library, "custom_op"):  # pragma: no cover  (torch < 2.4)
        return None
    try:
        return torch.ops.r4b.paged_decode_attention
    except (AttributeError, RuntimeError):
        op = torch.library.custom_op("r4b::paged_decode_attention", mutates_args=())(_paged_impl)
        op.register_fake(_paged_fake)
        return torch.ops.r4b.paged_decode_attention


_paged_op = _register_paged_op()
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)  # SDPA's enable_gqa


class PagedBackendError(ValueError):
    """The forced "triton" backend cannot run the paged op here."""


def resolve_paged_backend(backend: str, device: torch.device | str, dtype: torch.dtype, head_dim: int, n_heads: int,
                          n_kv_heads: int) -> str:
    """"triton" or "sdpa" for the paged decode step on this device/dtype/head geometry (call it once, outside
    compiled code; the same signature and rules as r4b_core.models.attention.resolve_decode_backend).

    "auto": Triton on a CUDA device when the kernel handles the shapes, else "sdpa" (with a one-line
    warning on CUDA, silently elsewhere); "triton": raises PagedBackendError when it cannot run (on the
    CPU it runs under TRITON_INTERPRET=1); "sdpa": "sdpa".
    """
    if backend not in ("auto", "sdpa", "triton"):
        raise ValueError(f"unknown paged attention backend {backend!r}; choose one of auto, sdpa, triton.")
    device = torch.device(device)
    if backend == "sdpa" or (backend == "auto" and device.type != "cuda"):
        return "sdpa"
    probe_q = torch.empty(1, n_heads, head_dim, dtype=dtype, device="meta")
    probe_pool = torch.empty(1, 1, n_kv_heads, head_dim, dtype=dtype, device="meta")
    problem = unavailable_reason(device) or supports_paged(probe_q, probe_pool)
    if problem is None:
        return "triton"
    if backend == "triton":
        raise PagedBackendError(f"paged attention backend 'triton' was requested but cannot run: {problem}.")
    warnings.warn(f"r4b: Triton paged decode attention unavailable ({problem}); using SDPA.", stacklevel=3)
    return "sdpa"


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
    runs ``paged_decode_attention_sdpa``; "auto" resolves with ``resolve_paged_backend`` on each call
    (inside a compiled step pass the resolved one). Shapes/dtypes are validated (ValueError).
    """
    if backend == "auto":
        backend = resolve_paged_backend(backend, q.device, q.dtype, q.shape[2], q.shape[1], k_pool.shape[2])
    if backend == "sdpa":
        return paged_decode_attention_sdpa(q, k_pool, v_pool, block_table, seq_lens, scale)
    if backend != "triton":
        raise ValueError(f"unknown paged attention backend {backend!r}; choose one of auto, sdpa, triton.")
    reason = supports_paged(q, k_pool, v_pool, block_table, seq_lens)
    if reason is not None:
        raise ValueError(f"paged_decode_attention: {reason}.")
    if num_splits is None:
        num_splits = default_num_splits(q.shape[0], k_pool.shape[2], block_table.shape[1] * k_pool.shape[1], q.device)
    if _paged_op is None:  # pragma: no cover
        return _paged_impl(q, k_pool, v_pool, block_table, seq_lens, float(scale), int(num_splits))
    return _paged_op(q, k_pool, v_pool, block_table, seq_lens, float(scale), int(num_splits))
