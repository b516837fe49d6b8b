"""The attention of every layer, decoder and vision tower alike, and its backends.

Notation:
    B  batch            T  query tokens (this forward's new tokens)    S  key/value tokens (cache slots)
    Hq query heads      Hkv key/value heads    D  head_dim             G = Hq // Hkv (GQA group)
    q [B, Hq, T, D]; k, v [B, Hkv, T or S, D]; probabilities [B, Hq, T, S]; mask bool [B, 1, T, S]
    (True = may attend) or None (plain causal, or everything for bidirectional attention)

The entry, ``compute_attention(q, k, v, ...)`` -> [B, Hq, T, D], is the one call a layer makes after
projecting, norming and rotating its heads. In order:
    1. with a cache: write this forward's k, v into it (``cache.write``)
    2. a decode step (one token per sequence through a cache) whose probabilities nobody asked for:
       the cache's fused ``decode_attention`` (SDPA over a bucketed span, or the Triton kernel) -> done;
       a packed prefill (``layout.packed``: several sequences' chunks in one row) likewise goes to the
       cache's ``packed_attention`` (one SDPA call per chunk) -> done
    3. with a cache: the keys/values and mask to attend to come from ``cache.read``
    4. nobody asked for the probabilities: ``attention`` (SDPA, fused) -> done
    5. explicit: ``attention_probs`` -> the ``hook_pattern`` hook -> the ``AttentionRecorder`` -> ``attend``
The cache interface (plan / write / read / decode_attention / commit) is in r4b_core/models/cache_interface.py.

``attention(q, k, v, mask, is_causal, scale, dropout_p)`` is the SDPA reference path with grouped K/V
heads; ``is_causal`` is only used when ``mask`` is None (query t sees keys [0, S - T + t]).

``decode_attention(q, k_cache, v_cache, seq_lens, scale, backend)`` is the single-token decode step
against a layer of the KV cache: q [B, Hq, D], k_cache/v_cache [B, Hkv, S, D], seq_lens [B] (valid
slots per sequence, the new token included). Backends:
    "sdpa"    the reference: SDPA over the S slots given with a length mask (static shapes)
    "triton"  r4b_kernels' split-KV GQA flash-decoding kernel (reads only seq_lens[b] slots)
The backend is chosen by argument, never at import time: ``resolve_decode_backend`` (from
r4b_kernels/backend.py, the rules shared with the paged cache) turns "auto", "sdpa" or "triton" into a
concrete one for a device/dtype/head size; "auto" picks Triton on CUDA when
the kernel supports the shape (falling back to SDPA with a one-line notice when it does not) and
SDPA on every other device; a forced "triton" that cannot run raises (on the CPU it runs under
TRITON_INTERPRET=1, which is how the tests exercise it).

The explicit path, ``attention_probs`` then ``attend``, materialises the probabilities [B, Hq, T, S]
as transformers' eager attention does (scores in the input dtype, softmax in fp32, cast back). It runs
only for a layer whose probabilities are asked for (``output_attentions=True``, or a hook on that
layer's ``hook_pattern``); an ``AttentionRecorder`` collects them during one forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from r4b_core.models.cache_interface import AttentionCache, AttentionLayout, AttentionRecorder
from r4b_kernels.backend import BackendUnavailableError, resolve_decode_backend  # no Triton import

__all__ = ["BackendUnavailableError", "attend", "attention", "attention_probs", "compute_attention",
           "decode_attention", "resolve_decode_backend"]

# SDPA learned `enable_gqa` in torch 2.5; before that K/V heads are expanded explicitly.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped K/V heads (SDPA reference backend)."""
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    gqa = n_heads != n_kv_heads
    if gqa and not _SDPA_HAS_GQA:
        group = n_heads // n_kv_heads
        k = k.repeat_interleave(group, dim=1)  # [B, Hq, S, D]
        v = v.repeat_interleave(group, dim=1)
        gqa = False
    kwargs = {"enable_gqa": True} if gqa else {}
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal and mask is None, scale=scale, **kwargs
    )


def _repeat_kv_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hq, S, D]: query head h reads key/value head h // (Hq / Hkv)."""
    return x if x.shape[1] == n_heads else x.repeat_interleave(n_heads // x.shape[1], dim=1)


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float
) -> torch.Tensor:
    """Softmax(q k^T * scale) [B, Hq, T, S] with masked keys at probability 0.

    ``mask`` as in ``attention`` (bool [B, 1, T, S], True = may attend); with None and ``is_causal``
    query t sees keys [0, S - T + t]. Rows must keep at least one key (the models' masks always do).
    """
    T, S = q.shape[2], k.shape[2]
    scores = torch.matmul(q, _repeat_kv_heads(k, q.shape[1]).transpose(2, 3)) * scale  # [B, Hq, T, S]
    if mask is None and is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # [T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)


def attend(probs: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """probs [B, Hq, T, S] @ v [B, Hkv, S, D] -> [B, Hq, T, D] (dropout on the probabilities, as SDPA)."""
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, _repeat_kv_heads(v, probs.shape[1]).to(probs.dtype))


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, scale: float, backend: str
) -> torch.Tensor:
    """One query token per sequence against the cache: q [B, Hq, D] -> [B, Hq, D]."""
    if backend == "triton":
        from r4b_kernels.decode_op import decode_attention_op  # a custom op: no host sync, compile-safe

        return decode_attention_op(q, k_cache, v_cache, seq_lens, scale)
    valid = torch.arange(k_cache.shape[2], device=q.device)[None, :] < seq_lens[:, None]  # [B, S]
    out = attention(q[:, :, None], k_cache.to(q.dtype), v_cache.to(q.dtype), valid[:, None, None, :],
                    is_causal=False, scale=scale)  # [B, Hq, 1, D]
    return out[:, :, 0]


def compute_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    pattern_hook: nn.Module,
    recorder: AttentionRecorder | None = None,
    dropout_p: float = 0.0,
    layout: AttentionLayout | None = None,
    cache: AttentionCache | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """One layer's attention: q [B, Hq, T, D], this forward's k, v [B, Hkv, T, D] -> [B, Hq, T, D].

    ``pattern_hook``: the layer's ``hook_pattern`` (a hook there, or a ``recorder``, selects the explicit
    softmax). ``layout``: this forward's mask (and, with ``cache``, where the tokens go). ``layer``: the
    cache's layer index. The steps are listed in the module docstring.
    """
    mask = layout.mask if layout is not None else None
    explicit = recorder is not None or pattern_hook.has_hooks
    if cache is not None:
        cache.write(layer, k, v, layout)
        if layout.decode and not explicit:
            return cache.decode_attention(layer, q[:, :, 0], layout, scale)[:, :, None]  # [B, Hq, 1, D]
        if layout.packed and not explicit:
            return cache.packed_attention(layer, q, layout, scale)  # [1, Hq, T, D]
        k, v, mask = cache.read(layer, layout)  # [B, Hkv, S, D] x 2, [B, 1, T, S] or None
        k, v = k.to(q.dtype), v.to(q.dtype)
    if not explicit:
        return attention(q, k, v, mask, is_causal=causal, scale=scale, dropout_p=dropout_p)
    probs = pattern_hook(attention_probs(q, k, mask, is_causal=causal, scale=scale))  # [B, Hq, T, S]
    if recorder is not None:
        recorder.add(probs)
    return attend(probs, v, dropout_p)
