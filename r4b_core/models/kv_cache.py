"""The static (contiguous) KV cache: one implementation of ``AttentionCache``.

Notation: L layers, B sequences, T new tokens of this forward, S key/value slots attended to,
H_kv key/value heads, Hq query heads, D head_dim.

The cache interface the model attends through (``AttentionCache``, ``AttentionLayout``) is in
r4b_core/models/cache_interface.py; this module is its static implementation.

The static cache (``KVCache``), layout chosen for the split-KV decode kernel:

    k, v      [L, B, H_kv, capacity, D]   contiguous; one tensor each for all layers
    seq_lens  [B] int32                   tokens stored per sequence, on the cache's device

For one (layer, sequence, kv head) the capacity x D block is contiguous, so a decode kernel that gives
each program one KV head and a range of slots reads K and V as dense, coalesced tiles, and the query
heads that share that KV head (GQA) are served from one read. ``seq_lens`` plays the role of
flash-decoding's ``cache_seqlens``: sequence b's keys live in slots ``[0, seq_lens[b])``, left-aligned,
whatever padding its prompt had. A token's slot index is therefore also its RoPE position (R-4B uses 1-D
positions), and sequences of different lengths share one batch without padding inside the cache.

Decode cost follows the context, not the capacity: the SDPA decode step reads only the first ``span``
slots, ``span = decode_span(longest sequence)`` = the next power of two >= the longest length, at least
``MIN_DECODE_SPAN`` and at most the capacity, so a compiled decode step has one graph per span (at most
log2(capacity / 256) + 1 of them: 7 for a 12,000-slot cache) and never reads the reserved room. The longest
length is tracked on the host (``_HostLengths``, an upper bound, exact after every prefill, shared by row
views), so a decode step needs no device sync for it. The Triton backend stops at each sequence's length
itself and always gets the whole capacity (one graph, fixed CUDA-graph addresses).

``decode_backend`` ("sdpa" or "triton", resolved from the requested backend when the cache is made) is
the attention kernel of the single-token decode step; see r4b_core/models/attention.py. Writes that would
pass ``capacity`` raise ``CacheOverflowError`` before anything is written (checked in eager mode; inside
``torch.compile`` the caller — ``generate``, via ``reserve_decode`` — has already checked, since a host-side
check would break the graph).
"""

from __future__ import annotations

import torch

from r4b_core.config import TextConfig
from r4b_core.models.attention import decode_attention, resolve_decode_backend
from r4b_core.models.cache_interface import AttentionLayout, new_token_offsets

MIN_DECODE_SPAN = 256  # the shortest span of slots a decode step reads (fewer distinct shapes below it)


class CacheOverflowError(ValueError):
    """A write would pass the cache's capacity."""


def decode_span(longest: int, capacity: int) -> int:
    """Slots a decode step reads when the longest sequence holds ``longest`` tokens: the next power of
    two, at least MIN_DECODE_SPAN, at most ``capacity``."""
    return min(capacity, max(MIN_DECODE_SPAN, 1 << max(longest - 1, 0).bit_length()))


class _HostLengths:
    """An upper bound of max(seq_lens) known on the host (exact after every prefill); shared by row views."""

    def __init__(self) -> None:
        self.longest = 0


class KVCache:
    """Preallocated K/V storage for ``num_layers`` layers and ``batch_size`` sequences (``AttentionCache``)."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        attention_backend: str = "auto",
        num_query_heads: int | None = None,
    ) -> None:
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size),
                            ("num_kv_heads", num_kv_heads), ("capacity", capacity), ("head_dim", head_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVCache: {name} must be a positive integer, got {value!r}.")
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        # zeros, not empty: slots past seq_lens are masked out but must never hold NaN/Inf.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seq_lens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        # the decode step's attention backend ("sdpa" or "triton"), fixed for the cache's lifetime so
        # that the compiled decode step sees one static choice
        self.decode_backend = resolve_decode_backend(attention_backend, self.k.device, dtype, head_dim,
                                                     num_query_heads or num_kv_heads, num_kv_heads)
        self._host = _HostLengths()
        self._reserved_span: int | None = None  # set by reserve_decode, used by the next decode step
        self._is_row_view = False

    @classmethod
    def for_model(
        cls,
        config: TextConfig,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        attention_backend: str = "auto",
    ) -> "KVCache":
        """A cache shaped for a decoder config; ``capacity`` may not exceed max_position_embeddings.

        ``attention_backend`` ("auto", "sdpa", "triton") picks the decode step's attention kernel.
        """
        if capacity > config.max_position_embeddings:
            raise ValueError(
                f"KVCache: capacity {capacity} exceeds the model's max_position_embeddings "
                f"({config.max_position_embeddings})."
            )
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads, capacity, config.head_dim,
                   dtype, device, attention_backend=attention_backend, num_query_heads=config.num_attention_heads)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        """Forget every sequence (the storage is kept; stale slots are masked by seq_lens)."""
        self.seq_lens.zero_()
        self._reserved_span = None
        if not self._is_row_view:  # a row view's siblings still hold their tokens
            self._host.longest = 0

    def set_lengths(self, n: int) -> None:
        """Every sequence holds ``n`` tokens, whatever its slots contain (warm-ups and benchmarks)."""
        if not isinstance(n, int) or not 0 <= n <= self.capacity:
            raise ValueError(f"KVCache.set_lengths: n must be an int in [0, {self.capacity}], got {n!r}.")
        self.seq_lens.fill_(n)
        self._reserved_span = None
        self._host.longest = n if not self._is_row_view else max(self._host.longest, n)

    def row(self, index: int) -> "KVCache":
        """A batch-1 cache that is a view of sequence ``index``: k/v [L, 1, H_kv, S, D] and seq_lens [1]
        share this cache's storage, so a forward through the view (e.g. prefilling one request of a
        continuously batched server) writes that row only. It keeps this cache's decode backend."""
        if not isinstance(index, int) or not 0 <= index < self.batch_size:
            raise ValueError(f"KVCache.row: index must be an int in [0, {self.batch_size}), got {index!r}.")
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)  # decode_backend, the shared host lengths, any other setting
        view.k, view.v = self.k[:, index:index + 1], self.v[:, index:index + 1]  # [L, 1, H_kv, S, D] views
        view.seq_lens = self.seq_lens[index:index + 1]  # [1] view
        view._reserved_span, view._is_row_view = None, True
        return view

    def check_capacity(self, new_lens: torch.Tensor) -> None:
        """Raise if any sequence would hold more than ``capacity`` tokens. Syncs with the device."""
        longest = int(new_lens.max())
        if longest > self.capacity:
            b = int(new_lens.argmax())
            raise CacheOverflowError(
                f"KVCache overflow: sequence {b} would hold {longest} tokens but the cache has capacity "
                f"{self.capacity}. Allocate a larger cache (prompt length + max_new_tokens)."
            )

    # ------------------------------------------------------------------------------------------
    # the AttentionCache interface

    def plan(self, attention_mask: torch.Tensor | None, n_new: int) -> AttentionLayout:
        """This forward's layout: slots [B, T] (= RoPE positions), lengths after, mask [B, 1, T, S]."""
        valid = attention_mask.bool() if attention_mask is not None else None
        past = self.seq_lens.long()  # [B]
        slots = past[:, None] + new_token_offsets(valid, self.batch_size, n_new, past.device)  # [B, T]
        new_lens = past + (valid.sum(-1) if valid is not None else n_new)  # [B]
        if n_new == 1:  # decode: decode_attention masks by seq_lens itself over a bucketed span
            return AttentionLayout(positions=slots, valid=valid, slots=slots, kv_len=self._take_decode_span(),
                                   seq_lens=new_lens, decode=True)
        self._reserved_span = None
        kv_len = int(new_lens.max())  # prefill: attend over the used part of the cache only
        if not torch.compiler.is_compiling():
            self.check_capacity(new_lens)
        self._host.longest = max(self._host.longest, kv_len)
        if valid is None and kv_len == n_new:  # an empty cache, no padding: plain causal, SDPA skips masked blocks
            return AttentionLayout(positions=slots, slots=slots, kv_len=kv_len, seq_lens=new_lens)
        key_slot = torch.arange(kv_len, device=past.device)  # [S]
        mask = key_slot[None, None, :] <= slots[:, :, None]  # [B, T, S]: causal in slot space
        if valid is not None:
            mask = mask | ~valid[:, :, None]
        return AttentionLayout(positions=slots, mask=mask[:, None], valid=valid, slots=slots, kv_len=kv_len,
                               seq_lens=new_lens)

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, layout: AttentionLayout) -> None:
        """Store new keys/values of one layer: k_new, v_new [B, H_kv, T, D] at ``layout.slots`` [B, T];
        padding tokens (``layout.valid`` False) are not stored."""
        k_layer, v_layer = self.k[layer], self.v[layer]  # [B, H_kv, S, D] views
        slots, valid = layout.slots, layout.valid
        if valid is None:
            batch_idx = torch.arange(k_new.shape[0], device=slots.device)[:, None].expand_as(slots)  # [B, T]
            # advanced indices around a slice put their dims first: target is [B, T, H_kv, D]
            k_layer[batch_idx, :, slots] = k_new.transpose(1, 2).to(k_layer.dtype)
            v_layer[batch_idx, :, slots] = v_new.transpose(1, 2).to(v_layer.dtype)
        else:
            batch_idx, tok_idx = valid.nonzero(as_tuple=True)  # N valid tokens
            k_layer[batch_idx, :, slots[batch_idx, tok_idx]] = k_new[batch_idx, :, tok_idx].to(k_layer.dtype)
            v_layer[batch_idx, :, slots[batch_idx, tok_idx]] = v_new[batch_idx, :, tok_idx].to(v_layer.dtype)

    def read(self, layer: int, layout: AttentionLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys and values [B, H_kv, S, D] (views) and the mask [B, 1, T, S] or None for one layer.

        A decode step read this way (explicit probabilities) covers the used slots [0, max(seq_lens)), as
        transformers' cache does (one host sync); otherwise S = ``layout.kv_len``."""
        kv_len, mask = layout.kv_len, layout.mask
        if layout.decode:
            kv_len = int(layout.seq_lens.max())
            used = torch.arange(kv_len, device=self.k.device) < layout.seq_lens[:, None]  # [B, S]
            mask = used[:, None, None]  # [B, 1, 1, S]
        return self.k[layer, :, :, :kv_len], self.v[layer, :, :, :kv_len], mask

    def decode_attention(self, layer: int, q: torch.Tensor, layout: AttentionLayout, scale: float) -> torch.Tensor:
        """The fused decode step of one layer: q [B, Hq, D] over the first ``layout.kv_len`` slots -> [B, Hq, D]."""
        k, v = self.k[layer, :, :, :layout.kv_len], self.v[layer, :, :, :layout.kv_len]  # [B, H_kv, S, D]
        return decode_attention(q, k, v, layout.seq_lens, scale, self.decode_backend)

    def commit(self, layout: AttentionLayout) -> None:
        """After the last layer: every sequence holds ``layout.seq_lens`` tokens."""
        self.seq_lens.copy_(layout.seq_lens)

    def reserve_decode(self) -> None:
        """Host-side part of the next decode step, done outside ``torch.compile``: check the room and pick
        the span of slots it reads (an eager decode forward does this itself in ``plan``)."""
        self._reserved_span = self._advance_for_decode()

    # ------------------------------------------------------------------------------------------

    def _take_decode_span(self) -> int:
        """The span reserved for this decode step; without a reservation: computed here (eager), or the
        whole capacity inside torch.compile (always correct, reads everything)."""
        span, self._reserved_span = self._reserved_span, None
        if span is None:
            span = self.capacity if torch.compiler.is_compiling() else self._advance_for_decode()
        return span

    def _advance_for_decode(self) -> int:
        """One more token per sequence on the host bound; the span of slots the decode step reads."""
        longest = self._host.longest + 1
        if longest > self.capacity:  # the bound may be stale (rows emptied by their owner): sync for the truth
            self.check_capacity(self.seq_lens.long() + 1)
            longest = int(self.seq_lens.max()) + 1
        self._host.longest = longest
        return self.capacity if self.decode_backend == "triton" else decode_span(longest, self.capacity)
