"""A paged key/value cache: one pool of fixed-size blocks shared by every sequence (vLLM's PagedAttention).

Layout (one tensor each for K and V, all layers):

    k, v           [L, N, bs, H_kv, D]   N blocks of bs token slots; block 0 is the null block
    block table    [B, n] int32          sequence b's token at position p lives in block table[b, p // bs],
                                         slot p % bs; a table is padded with the null block

L layers, N blocks, bs = block_size, H_kv key/value heads, D head_dim. A block holds bs consecutive
positions of one sequence for every layer, so a sequence's memory grows a block at a time and goes
back to the pool when it ends; nothing is reserved for tokens not generated yet. (bs, H_kv, D) per
block is vLLM's flash layout: a token's K for all heads is one contiguous row, and a block is one
contiguous [bs, H_kv, D] tile per layer, so a decode kernel reading through the block table (D1's
paged Triton kernel) gets dense tiles, and the CPU path gathers whole blocks with one index_select.

Who owns what: this module holds the storage and turns block tables into a cache the model can run
(``PagedKVCache.batch``); which blocks a sequence gets, sharing of cached prefix blocks and eviction are
the caller's (r4b_core/serve/block_pool.py). The null block (0) is never handed out: padding rows of a
bucketed batch write into it and attend to it only, so it holds finite junk, never another sequence's data.

``PagedBatch`` is what a forward sees: it satisfies the model's cache interface (``AttentionCache`` in
r4b_core/models/kv_cache.py: plan / write / read / decode_attention / commit). ``plan`` maps each new
token's position to its flat slot ``block * bs + offset``; ``write`` scatters the new K/V there; ``read``
gathers the used blocks into [B, H_kv, S, D] (a copy of the used blocks only, never the reserved room);
``decode_attention`` runs D1's paged Triton kernel in place on CUDA, or gathers the span and runs SDPA
(into the pool's one reused scratch buffer: fresh multi-MiB copies each layer were page-faulted in anew every
step, which made a CPU decode step 1.8x slower at 2k-8k tokens).
The span a decode step attends over is ``capacity``, the slots of the padded block table: the caller
rounds it up to a bucket, so the decode step sees few distinct shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from r4b_core.config import TextConfig
from r4b_core.models.attention import decode_attention, resolve_decode_backend
from r4b_core.models.kv_cache import AttentionLayout, CacheOverflowError

NULL_BLOCK = 0
DEFAULT_BLOCK_SIZE = 16


def kv_bytes_per_token(config: TextConfig, dtype: torch.dtype) -> int:
    """Bytes one token's K and V take over all layers: 2 * L * H_kv * D * itemsize."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize


def blocks_for_tokens(n_tokens: int, block_size: int) -> int:
    """How many blocks hold ``n_tokens`` positions."""
    return -(-n_tokens // block_size)


def padded_block_table(block_tables: Sequence[Sequence[int]], n_blocks: int, device: torch.device) -> torch.Tensor:
    """[B, n_blocks] int64: row b is ``block_tables[b]`` padded with the null block."""
    table = torch.full((len(block_tables), n_blocks), NULL_BLOCK, dtype=torch.int64)
    for b, blocks in enumerate(block_tables):
        table[b, :len(blocks)] = torch.as_tensor(list(blocks), dtype=torch.int64)
    return table.to(device)


class PagedKVCache:
    """The block pool's storage: ``num_blocks`` blocks (block 0 the null block) of ``block_size`` slots."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 attention_backend: str = "auto", num_query_heads: int | None = None) -> None:
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PagedKVCache: {name} must be a positive integer, got {value!r}.")
        if num_blocks < 2:
            raise ValueError(f"PagedKVCache: num_blocks must be at least 2 (block 0 is the null block), got {num_blocks}.")
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        # zeros: a slot past a sequence's length is masked out, but a masked NaN still poisons SDPA (0 * NaN)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self._scratch: torch.Tensor | None = None  # see ``scratch``
        self.decode_backend = resolve_decode_backend(attention_backend, self.k.device, dtype, head_dim,
                                                     num_query_heads or num_kv_heads, num_kv_heads)

    @classmethod
    def for_model(cls, config: TextConfig, *, num_tokens: int | None = None, memory_gb: float | None = None,
                  block_size: int = DEFAULT_BLOCK_SIZE, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", attention_backend: str = "auto") -> "PagedKVCache":
        """A pool for a decoder config, sized by a token budget or a memory budget (exactly one of them);
        one null block is added on top of the budget."""
        if (num_tokens is None) == (memory_gb is None):
            raise ValueError("PagedKVCache.for_model: give exactly one of num_tokens or memory_gb.")
        if memory_gb is not None:
            if not (isinstance(memory_gb, (int, float)) and math.isfinite(memory_gb) and memory_gb > 0):
                raise ValueError(f"PagedKVCache: memory_gb must be a positive number, got {memory_gb!r}.")
            num_tokens = int(memory_gb * 2**30 // kv_bytes_per_token(config, dtype))
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < block_size:
            raise ValueError(f"PagedKVCache: the budget must hold at least one block of {block_size} tokens; got "
                             f"{num_tokens!r} tokens. Raise --kv-cache-tokens / --kv-cache-gb.")
        return cls(config.num_hidden_layers, num_tokens // block_size + 1, block_size, config.num_key_value_heads,
                   config.head_dim, dtype, device, attention_backend, config.num_attention_heads)

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def num_tokens(self) -> int:
        """Token slots usable by sequences (the null block excluded)."""
        return (self.num_blocks - 1) * self.block_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def scratch(self, numel: int) -> torch.Tensor:
        """A flat buffer of ``numel`` elements, the same memory on every call (grown when too small, never shrunk):
        what a decode step gathers its K/V into (so one forward at a time per pool, as the engine runs them).
        A fresh multi-MiB tensor per layer and step was mapped anew by malloc every time (small preset, 2
        threads: 32k page faults per step at batch 1 over 2,048 tokens, 119 -> 67 ms per step with the buffer
        reused; 8,192 tokens 314 -> 178 ms; batch 8 over 1,000 tokens 200 -> 111 ms)."""
        if self._scratch is None or self._scratch.numel() < numel:
            self._scratch = torch.empty(numel, dtype=self.k.dtype, device=self.k.device)
        return self._scratch[:numel]

    def gather_blocks(self, layer: int, index: torch.Tensor,
                      scratch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer's blocks ``index`` [n], copied: [n, bs, H_kv, D] each. ``scratch``: copied into
        ``scratch()``, which the next such gather overwrites (for a caller done with K and V before it gathers
        again: the decode step, a packed prefill's chunk)."""
        row = self.block_size * self.k.shape[3] * self.k.shape[4]  # bs * H_kv * D elements per block
        buffer = self.scratch(2 * index.numel() * row).view(2, index.numel(), row) if scratch else None
        out = []
        for i, pool in enumerate((self.k[layer], self.v[layer])):
            flat = pool.view(pool.shape[0], row)  # [N, bs * H_kv * D]: one row per block
            rows = flat.index_select(0, index) if buffer is None else torch.index_select(flat, 0, index, out=buffer[i])
            out.append(rows.view(index.numel(), *pool.shape[1:]))  # [n, bs, H_kv, D]
        return out[0], out[1]

    def zero_blocks(self, blocks: Sequence[int]) -> None:
        """Zero these blocks in every layer (a request whose K/V went non-finite gives them back clean)."""
        if blocks:
            index = torch.tensor(list(blocks), dtype=torch.int64, device=self.k.device)
            self.k[:, index] = 0
            self.v[:, index] = 0

    def batch(self, block_tables: Sequence[Sequence[int]], seq_lens: Sequence[int],
              capacity: int | None = None) -> "PagedBatch":
        """A cache view for one forward over these sequences: ``block_tables[b]`` lists sequence b's blocks in
        order, ``seq_lens[b]`` the positions already stored. ``capacity`` (default: what the longest table
        covers) is rounded up to whole blocks; tables are padded with the null block to that many blocks."""
        if len(block_tables) != len(seq_lens) or not block_tables:
            raise ValueError(f"PagedKVCache.batch: {len(block_tables)} block tables for {len(seq_lens)} lengths.")
        longest = max(len(t) for t in block_tables)
        n_blocks = max(longest, blocks_for_tokens(capacity, self.block_size) if capacity else 1)
        table = padded_block_table(block_tables, n_blocks, self.k.device)
        lens = torch.tensor(list(seq_lens), dtype=torch.int32)
        return PagedBatch(self, table, lens.to(self.k.device), [int(n) for n in seq_lens])


class PagedBatch:
    """The model-facing cache of one forward (``AttentionCache``, r4b_core/models/kv_cache.py); made by
    ``PagedKVCache.batch``. Sequences are unpadded (``attention_mask`` must be None): each row's new tokens
    follow its own stored ones. Its lengths are known on the host, so ``plan`` needs no device sync."""

    def __init__(self, pool: PagedKVCache, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 host_lens: list[int]) -> None:
        self.pool = pool
        self.block_table = block_table  # [B, n] int64 physical block ids
        self.seq_lens = seq_lens  # [B] int32; advanced by ``commit``
        self.host_lens = host_lens
        self.decode_backend = pool.decode_backend
        self._read_index: dict[int, torch.Tensor] = {}

    @property
    def batch_size(self) -> int:
        return self.block_table.shape[0]

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def capacity(self) -> int:
        """Slots the padded block table covers (the span a decode step attends over)."""
        return self.block_table.shape[1] * self.pool.block_size

    # ------------------------------------------------------------------------------------------
    # the AttentionCache interface

    def plan(self, attention_mask: torch.Tensor | None, n_new: int) -> AttentionLayout:
        """positions [B, T] = stored length + 0..T-1; slots [B, T] = block * block_size + offset (flat index
        into one layer's pool); the causal mask over positions for a prefill chunk after stored tokens."""
        if attention_mask is not None:
            raise ValueError("a paged KV cache batch takes unpadded sequences: pass attention_mask=None.")
        new_lens = [n + n_new for n in self.host_lens]
        if max(new_lens) > self.capacity:
            b = max(range(len(new_lens)), key=new_lens.__getitem__)
            raise CacheOverflowError(
                f"PagedKVCache overflow: sequence {b} would hold {new_lens[b]} tokens but its block table covers "
                f"{self.capacity} slots; the caller must allocate blocks before the forward.")
        device, bs = self.block_table.device, self.pool.block_size
        past = self.seq_lens.long()  # [B]
        positions = past[:, None] + torch.arange(n_new, device=device)  # [B, T]
        blocks = self.block_table.gather(1, torch.div(positions, bs, rounding_mode="floor"))  # [B, T]
        slots = blocks * bs + positions % bs  # [B, T] flat slot in [N * bs]
        lens = torch.tensor(new_lens, dtype=torch.int32, device=device)  # [B]
        if n_new == 1:
            return AttentionLayout(positions=positions, slots=slots, kv_len=self.capacity, seq_lens=lens, decode=True)
        kv_len = max(new_lens)
        if max(self.host_lens) == 0 and self.batch_size == 1:  # a fresh single prompt: plain causal
            return AttentionLayout(positions=positions, slots=slots, kv_len=kv_len, seq_lens=lens)
        key_pos = torch.arange(kv_len, device=device)  # [S]
        mask = key_pos[None, None, :] <= positions[:, :, None]  # [B, T, S]: causal over positions
        return AttentionLayout(positions=positions, mask=mask[:, None], slots=slots, kv_len=kv_len, seq_lens=lens)

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, layout: AttentionLayout) -> None:
        """k_new, v_new [B, H_kv, T, D] into their blocks at ``layout.slots`` [B, T]."""
        for pool, new in ((self.pool.k[layer], k_new), (self.pool.v[layer], v_new)):
            flat = pool.view(-1, *pool.shape[2:])  # [N * bs, H_kv, D]
            flat[layout.slots] = new.transpose(1, 2).to(flat.dtype)  # [B, T, H_kv, D]

    def gather(self, layer: int, kv_len: int, scratch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [0, kv_len) of every sequence: K and V [B, H_kv, kv_len, D] copied from their blocks
        (into the pool's scratch buffer with ``scratch``: see ``PagedKVCache.gather_blocks``)."""
        bs = self.pool.block_size
        n = blocks_for_tokens(kv_len, bs)
        index = self._read_index.get(n)
        if index is None:
            index = self._read_index[n] = self.block_table[:, :n].reshape(-1)  # [B * n]
        k, v = self.pool.gather_blocks(layer, index, scratch)  # [B * n, bs, H_kv, D] each
        return tuple(x.view(self.batch_size, n * bs, *x.shape[2:])[:, :kv_len].transpose(1, 2)  # [B, H_kv, kv_len, D]
                     for x in (k, v))

    def read(self, layer: int, layout: AttentionLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """K, V [B, H_kv, S, D] and the mask [B, 1, T, S] or None. A decode step read this way (explicit
        probabilities) covers the used positions [0, max(seq_lens)), as the static cache does."""
        kv_len, mask = layout.kv_len, layout.mask
        if layout.decode:
            kv_len = max(self.host_lens) + 1
            used = torch.arange(kv_len, device=self.block_table.device) < layout.seq_lens[:, None]  # [B, S]
            mask = used[:, None, None]  # [B, 1, 1, S]
        k, v = self.gather(layer, kv_len)
        return k, v, mask

    def decode_attention(self, layer: int, q: torch.Tensor, layout: AttentionLayout, scale: float) -> torch.Tensor:
        """The fused decode step straight from the pool: q [B, Hq, D] -> [B, Hq, D]. On "triton" D1's paged
        kernel reads the blocks in place; otherwise the span's blocks are gathered and SDPA masks by length."""
        if self.decode_backend == "triton":
            from r4b_kernels.decode_op import paged_decode_attention_op  # custom op: no host sync

            return paged_decode_attention_op(q, self.pool.k[layer], self.pool.v[layer], self.block_table,
                                             layout.seq_lens, scale, backend="triton")
        k, v = self.gather(layer, layout.kv_len, scratch=not torch.compiler.is_compiling())  # [B, H_kv, S, D]
        return decode_attention(q, k, v, layout.seq_lens, scale, "sdpa")

    def commit(self, layout: AttentionLayout) -> None:
        self.seq_lens.copy_(layout.seq_lens)
        n_new = layout.positions.shape[1]
        self.host_lens = [n + n_new for n in self.host_lens]

    def reserve_decode(self) -> None:
        """Nothing to do: the engine allocates blocks (and picks the span) before it builds the batch."""
