"""Plain-PyTorch reference for single-token decode attention against a KV cache (ground truth for tests).

Notation:
    B  sequences          Hq query heads        Hkv key/value heads     G = Hq // Hkv (GQA group)
    S  cache slots        D  head_dim           seq_lens[b]: valid slots of sequence b, keys in [0, seq_lens[b])

    out[b, h] = softmax_s(scale * q[b, h] . k[b, h // G, s]  for s < seq_lens[b]) @ v[b, h // G, :seq_lens[b]]

Everything is computed in fp32 whatever the input dtypes; the result is cast to q's dtype. Slots at or
past ``seq_lens[b]`` are never used, not even multiplied by zero, so they may hold anything (NaN included).
Query head h reads KV head h // G, as transformers' ``repeat_kv`` and SDPA's ``enable_gqa`` do.

Paged cache (``block_table=``, ``gather_paged_kv``): a pool [NB, P, Hkv, D] of blocks of P tokens and a
block table [B, M]; sequence b's token t is pool[block_table[b, t // P], t % P]. The reference gathers
each sequence's blocks into a contiguous [B, Hkv, S, D] cache and attends as above: one reference for
both layouts, as there is one kernel (r4b_kernels/split_kv.py).
"""

from __future__ import annotations

import torch


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Hq, D], k_cache/v_cache [B, Hkv, S, D], seq_lens [B] int (each in [1, S]) -> [B, Hq, D] (q.dtype).

    With ``block_table`` [B, M], k_cache/v_cache are block pools [NB, P, Hkv, D] and seq_lens lie in
    [1, M * P]: each sequence's blocks are gathered (``gather_paged_kv``), then attended as above.
    """
    if block_table is not None:
        if v_cache.shape != k_cache.shape:
            raise ValueError(f"v_pool {tuple(v_cache.shape)} differs from k_pool {tuple(k_cache.shape)}.")
        num_tokens = int(seq_lens.max())  # host read: this is the ground truth, not a hot path
        k_cache = gather_paged_kv(k_cache, block_table, num_tokens)
        v_cache = gather_paged_kv(v_cache, block_table, num_tokens)
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


def gather_paged_kv(pool: torch.Tensor, block_table: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """pool [NB, P, Hkv, D], block_table [B, M] int -> [B, Hkv, num_tokens, D], each sequence's first
    ``num_tokens`` (default M * P) token slots in order (a fresh copy, returned as a permuted view of it:
    not contiguous; callers may modify it in place).

    Table entries are clamped to [0, NB), so unused entries (-1 or anything) gather some block: slots past
    a sequence's length hold whatever that block holds and must be masked by the caller.
    """
    if pool.ndim != 4 or block_table.ndim != 2:
        raise ValueError(
            f"expected pool [num_blocks, block_size, Hkv, D] and block_table [B, max_blocks_per_seq], got "
            f"pool {tuple(pool.shape)}, block_table {tuple(block_table.shape)}."
        )
    NB, P, Hkv, D = pool.shape
    B, M = block_table.shape
    num_tokens = M * P if num_tokens is None else num_tokens
    if not 0 < num_tokens <= M * P:
        raise ValueError(f"num_tokens must lie in [1, {M} * {P}] (the block table's reach), got {num_tokens}.")
    return gather_paged_tokens(pool, block_table, num_tokens).permute(0, 2, 1, 3)  # [B, Hkv, num_tokens, D]


def gather_paged_tokens(pool: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``gather_paged_kv`` before its permute: [B, num_tokens, Hkv, D], a fresh copy (contiguous when
    num_tokens is a multiple of the block size)."""
    NB, P, Hkv, D = pool.shape
    B = block_table.shape[0]
    n_blocks = -(-num_tokens // P)
    ids = block_table[:, :n_blocks].to(device=pool.device, dtype=torch.long).clamp(0, NB - 1)  # [B, n_blocks]
    tokens = pool.index_select(0, ids.reshape(-1))  # [B * n_blocks, P, Hkv, D], a copy (faster than pool[ids])
    return tokens.reshape(B, n_blocks * P, Hkv, D)[:, :num_tokens]  # [B, num_tokens, Hkv, D]

