"""Which decode-attention backend runs: "auto", "sdpa" or "triton" resolved once for a device, dtype and
head geometry, outside compiled code.

One rule set for both caches: the contiguous one (r4b_core/models/attention.py's ``decode_attention``)
and the paged op (``decode_op.paged_decode_attention_op``); the paged kernel takes exactly the head
geometries the contiguous one does (it is the same kernel, ``split_kv.py``).
    "auto"    Triton on a CUDA device when the kernel handles the shapes, else SDPA (a one-line warning
              on CUDA, silently elsewhere: the CPU interpreter runs the kernel only when forced)
    "triton"  Triton, or ``BackendUnavailableError`` naming why it cannot run (on the CPU it runs under
              TRITON_INTERPRET=1, which is how the tests exercise it)
    "sdpa"    the PyTorch path

This module imports no Triton: the kernel module is imported on the first resolution that needs it.
"""

from __future__ import annotations

import warnings

import torch

BACKENDS = ("auto", "sdpa", "triton")

__all__ = ["BACKENDS", "BackendUnavailableError", "resolve_decode_backend", "triton_problem"]


class BackendUnavailableError(ValueError):
    """A forced attention backend cannot run here (no Triton, not a CUDA device, unsupported shape)."""


def triton_problem(device: torch.device, dtype: torch.dtype, head_dim: int, n_heads: int, n_kv_heads: int) -> str | None:
    """Why the Triton decode kernel cannot run here, or None when it can."""
    from r4b_kernels import decode_attention as kernel  # imports without triton; reports it below

    reason = kernel.unavailable_reason(device)
    if reason is not None:
        return reason
    probe_q = torch.empty(1, n_heads, head_dim, dtype=dtype, device="meta")
    probe_k = torch.empty(1, n_kv_heads, 1, head_dim, dtype=dtype, device="meta")
    return kernel.supports(probe_q, probe_k)


def resolve_decode_backend(
    backend: str, device: torch.device | str, dtype: torch.dtype, head_dim: int, n_heads: int, n_kv_heads: int
) -> str:
    """'sdpa' or 'triton' for the decode step on this device/dtype/head geometry (rules in the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    device = torch.device(device)
    if backend == "sdpa" or (backend == "auto" and device.type != "cuda"):
        return "sdpa"
    problem = triton_problem(device, dtype, head_dim, n_heads, n_kv_heads)
    if problem is None:
        return "triton"
    if backend == "triton":
        raise BackendUnavailableError(f"attention backend 'triton' was requested but cannot run: {problem}.")
    warnings.warn(f"r4b: Triton decode attention unavailable ({problem}); using SDPA.", stacklevel=3)
    return "sdpa"
