"""Prefill chunks of several sequences packed into one row of one forward (varlen prefill over the paged pool).

Notation: k sequences; sequence i's chunk is its positions [start_i, end_i), T_i = end_i - start_i tokens;
T = sum T_i; the chunks are laid end to end in one row, chunk i at token offsets [o_i, o_i + T_i).
Hq query heads, H_kv key/value heads, D head_dim, bs block size.

    input         [1, T]          token ids (or embeddings [1, T, C]) of every chunk, in order
    positions     [1, T]          each token's position in its own sequence (start_i .. end_i - 1)
    slots         [1, T]          where its K/V go: its own block table, as in ``PagedBatch.plan``
    attention     per chunk       q[:, :, o_i:o_i + T_i] against sequence i's keys [0, end_i): causal over
                                  positions; a chunk never sees another sequence's keys

Why: a short prompt's prefill runs its linears over a few dozen rows, where a CPU GEMM is far from its
peak and the lm_head's weights are read once per forward for one row of logits; k prompts in one forward
read every weight once for all of them (measured, small preset, 2 cores: 8 x 60 tokens in one forward
1.5 ms per token, one at a time 2.4 ms per token).

Attention runs chunk by chunk (``packed_attention``, one SDPA call each, the same call a chunk alone
gets from ``PagedBatch``), not as one masked SDPA over every key: that would cost k times the attention
FLOPs (the CPU kernel does not skip masked tiles). Only the explicit path (``output_attentions`` or a
``hook_pattern`` hook) reads all keys at once through ``read`` with the block-diagonal causal mask; its
probabilities are [1, Hq, T, S], S = the keys of every sequence laid end to end.

Each chunk's attention is the one it gets alone; its linears run over T rows instead of T_i, which a
GEMM may round differently (the engine's exact mode prefills one prompt per forward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from r4b_core.models.attention import attention
from r4b_core.models.cache_interface import AttentionLayout
from r4b_core.models.kv_cache import CacheOverflowError
from r4b_core.models.paged_kv_cache import PagedBatch, PagedKVCache, blocks_for_tokens, padded_block_table


class PackedPrefill(PagedBatch):
    """The model-facing cache of one packed forward (``AttentionCache``): ``block_tables[i]`` lists sequence
    i's blocks, ``starts[i]`` the positions it has stored, ``ends[i]`` the position its chunk ends at."""

    def __init__(self, pool: PagedKVCache, block_tables: Sequence[Sequence[int]], starts: Sequence[int],
                 ends: Sequence[int]) -> None:
        if not block_tables or not len(block_tables) == len(starts) == len(ends):
            raise ValueError(f"PackedPrefill: {len(block_tables)} block tables, {len(starts)} starts, "
                             f"{len(ends)} ends; give one of each per sequence.")
        bs = pool.block_size
        for i, (blocks, start, end) in enumerate(zip(block_tables, starts, ends)):
            if not 0 <= start < end:
                raise ValueError(f"PackedPrefill: sequence {i}'s chunk [{start}, {end}) holds no token.")
            if blocks_for_tokens(end, bs) > len(blocks):
                held = f"{len(blocks)} block holds" if len(blocks) == 1 else f"{len(blocks)} blocks hold"
                raise CacheOverflowError(f"PackedPrefill: sequence {i} would hold {end} tokens but its {held} "
                                         f"{len(blocks) * bs}; allocate blocks before the forward.")
        device = pool.k.device
        table = padded_block_table(block_tables, max(len(t) for t in block_tables), device)
        super().__init__(pool, table, torch.tensor(list(ends), dtype=torch.int32, device=device),
                         [int(e) for e in ends])
        self.starts, self.ends = [int(s) for s in starts], [int(e) for e in ends]
        self.offsets = [0]  # token offset of each chunk in the row, and the total last
        for start, end in zip(self.starts, self.ends):
            self.offsets.append(self.offsets[-1] + end - start)
        # the blocks of each sequence's keys [0, end_i), one index per sequence (the chunk's attention reads them)
        self._key_blocks = [table[i, :blocks_for_tokens(end, bs)] for i, end in enumerate(self.ends)]
        self._full_read: tuple[torch.Tensor, torch.Tensor] | None = None  # (key slots [S], mask) of the explicit path

    @property
    def batch_size(self) -> int:
        return 1  # one packed row

    @property
    def num_tokens(self) -> int:
        """T: the tokens of every chunk."""
        return self.offsets[-1]

    def last_token_indices(self) -> torch.Tensor:
        """[k] offset of each chunk's last token in the row (``logits_to_keep`` for one logit row each)."""
        return torch.tensor(self.offsets[1:], dtype=torch.int64, device=self.block_table.device) - 1

    # ------------------------------------------------------------------------------------------
    # the AttentionCache interface

    def plan(self, attention_mask: torch.Tensor | None, n_new: int) -> AttentionLayout:
        """positions and slots [1, T] of every chunk's tokens, each in its own sequence."""
        if attention_mask is not None:
            raise ValueError("a packed prefill takes unpadded chunks: pass attention_mask=None.")
        if n_new != self.num_tokens:
            raise ValueError(f"PackedPrefill: the forward has {n_new} new tokens but the chunks hold "
                             f"{self.num_tokens}; feed the chunks' tokens end to end.")
        device, bs = self.block_table.device, self.pool.block_size
        positions = torch.cat([torch.arange(s, e, device=device) for s, e in zip(self.starts, self.ends)])  # [T]
        row = torch.repeat_interleave(torch.arange(len(self.ends), device=device),
                                      torch.tensor([e - s for s, e in zip(self.starts, self.ends)], device=device))
        blocks = self.block_table[row, torch.div(positions, bs, rounding_mode="floor")]  # [T]
        slots = blocks * bs + positions % bs  # [T] flat slot in [N * bs]
        return AttentionLayout(positions=positions[None], slots=slots[None], kv_len=sum(self.ends),
                               seq_lens=self.seq_lens.clone(), packed=True)

    def packed_attention(self, layer: int, q: torch.Tensor, layout: AttentionLayout, scale: float) -> torch.Tensor:
        """q [1, Hq, T, D] -> [1, Hq, T, D]: each chunk's queries against its own sequence's keys."""
        out, scratch = [], not torch.compiler.is_compiling()  # chunk i's K/V are used up before chunk i + 1's gather
        for i, (start, end) in enumerate(zip(self.starts, self.ends)):
            q_i = q[:, :, self.offsets[i]:self.offsets[i + 1]]  # [1, Hq, T_i, D]
            k_i, v_i = (x.view(1, -1, *x.shape[2:])[:, :end].transpose(1, 2).to(q.dtype)  # [1, H_kv, end_i, D]
                        for x in self.pool.gather_blocks(layer, self._key_blocks[i], scratch))  # [n_i, bs, H_kv, D]
            mask = None
            if start:  # after stored tokens: causal over positions
                key_pos = torch.arange(end, device=q.device)  # [end_i]
                mask = (key_pos[None, :] <= torch.arange(start, end, device=q.device)[:, None])[None, None]
            out.append(attention(q_i, k_i, v_i, mask, is_causal=mask is None, scale=scale))
        return torch.cat(out, dim=2)

    def read(self, layer: int, layout: AttentionLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The explicit path: every sequence's keys [1, H_kv, S, D] end to end (each its blocks covering
        [0, end_i), trimmed to end_i) and the block-diagonal causal mask [1, 1, T, S]."""
        if self._full_read is None:
            device = self.block_table.device
            slots = torch.cat([b[:, None] * self.pool.block_size + torch.arange(self.pool.block_size, device=device)
                               for b in self._key_blocks])  # [sum_i n_i, bs] -> rows of slots
            keep = torch.cat([torch.arange(len(b) * self.pool.block_size, device=device) < end
                              for b, end in zip(self._key_blocks, self.ends)])  # [sum_i n_i * bs]
            key_slots = slots.reshape(-1)[keep]  # [S]
            key_seq = torch.cat([torch.full((end,), i, device=device) for i, end in enumerate(self.ends)])  # [S]
            key_pos = torch.cat([torch.arange(end, device=device) for end in self.ends])  # [S]
            query_seq = torch.cat([torch.full((e - s,), i, device=device)
                                   for i, (s, e) in enumerate(zip(self.starts, self.ends))])  # [T]
            query_pos = layout.positions[0]  # [T]
            mask = (key_seq[None] == query_seq[:, None]) & (key_pos[None] <= query_pos[:, None])  # [T, S]
            self._full_read = (key_slots, mask[None, None])
        key_slots, mask = self._full_read
        k, v = (pool.view(-1, *pool.shape[2:])[key_slots][None].transpose(1, 2)  # [1, H_kv, S, D]
                for pool in (self.pool.k[layer], self.pool.v[layer]))
        return k, v, mask

    def decode_attention(self, layer: int, q: torch.Tensor, layout: AttentionLayout, scale: float) -> torch.Tensor:
        raise NotImplementedError("a packed prefill has no decode step; decode through PagedKVCache.batch.")

    def commit(self, layout: AttentionLayout) -> None:
        self.host_lens = list(self.ends)  # seq_lens already hold the ends
