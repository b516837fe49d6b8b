"""One attention signature for the decoder; backends live behind it.

Notation:
    B  batch            T  query tokens        S  key/value tokens
    Hq query heads      Hkv key/value heads    D  head_dim         G = Hq // Hkv (GQA group)

``attention(q, k, v, mask, is_causal, scale, dropout_p)`` takes q [B, Hq, T, D], k and v
[B, Hkv, S, D] and returns [B, Hq, T, D]. ``mask`` is boolean [B, 1, T, S] (True = may attend) or
None; ``is_causal`` is only used when ``mask`` is None and T == S.

The SDPA path below is the reference. Other backends (the Triton split-KV decode kernel) are added
here and tested against it on identical inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
