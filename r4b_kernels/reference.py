"""Plain-PyTorch reference for single-token decode attention against a KV cache (ground truth for tests).

Notation:
    B  sequences          Hq query heads        Hkv key/value heads     G = Hq // Hkv (GQA group)
    S  cache slots        D  head_dim           seq_lens[b]: valid slots of sequence b, keys in [0, seq_lens[b])

    out[b, h] = softmax_s(scale * q[b, h] . k[b, h // G, s]  for s < seq_lens[b]) @ v[b, h // G, :seq_lens[b]]

Everything is computed in fp32 whatever the input dtypes; the result is cast to q's dtype. Slots at or
past ``seq_lens[b]`` are never used, not even multiplied by zero, so they may hold anything (NaN included).
Query head h reads KV head h // G, as transformers' ``repeat_kv`` and SDPA's ``enable_gqa`` do.
"""

from __future__ import annotations

import torch


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [B, Hq, D], k_cache/v_cache [B, Hkv, S, D], seq_lens [B] int (each in [1, S]) -> [B, Hq, D] (q.dtype)."""
    if q.ndim != 3 or k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"expected q [B, Hq, D] and k_cache = v_cache [B, Hkv, S, D], got q {tuple(q.shape)}, "
            f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}."
        )
    B, Hq, D = q.shape
    _, Hkv, S, _ = k_cache.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D or Hq % Hkv != 0:
        raise ValueError(
            f"q {tuple(q.shape)} does not match k_cache {tuple(k_cache.shape)}: need the same B and D "
            f"and Hq a multiple of Hkv."
        )
    if seq_lens.shape != (B,):
        raise ValueError(f"seq_lens must have shape ({B},), got {tuple(seq_lens.shape)}.")
    G = Hq // Hkv
    lens = seq_lens.to(device=q.device, dtype=torch.long)
    valid = torch.arange(S, device=q.device)[None, :] < lens[:, None]  # [B, S]
    qf = q.float().reshape(B, Hkv, G, D)  # head h = kv_head * G + g
    kf = torch.where(valid[:, None, :, None], k_cache.float(), 0.0)  # [B, Hkv, S, D]; unused slots -> 0
    vf = torch.where(valid[:, None, :, None], v_cache.float(), 0.0)
    scores = torch.einsum("bhgd,bhsd->bhgs", qf, kf) * scale  # [B, Hkv, G, S]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # fp32
    out = torch.einsum("bhgs,bhsd->bhgd", probs, vf)  # [B, Hkv, G, D]
    return out.reshape(B, Hq, D).to(q.dtype)
