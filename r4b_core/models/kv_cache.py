"""A static, preallocated key/value cache, owned by the caller and passed into ``forward``.

Layout (chosen for the split-KV decode kernel):

    k, v      [L, B, H_kv, S, D]   contiguous; one tensor each for all layers
    seq_lens  [B] int32            tokens stored per sequence, on the cache's device

    L layers, B sequences, H_kv key/value heads, S = capacity (slots per sequence), D head_dim.

For one (layer, sequence, kv head) the S x D block is contiguous, so a decode kernel that gives each
program one KV head and a range of slots reads K and V as dense, coalesced tiles, and the query heads
that share that KV head (GQA) are served from one read. ``seq_lens`` plays the role of flash-decoding's
``cache_seqlens``: sequence b's keys live in slots ``[0, seq_lens[b])``, left-aligned, whatever
padding its prompt had. A token's slot index is therefore also its RoPE position (R-4B uses 1-D
positions), and sequences of different lengths share one batch without padding inside the cache.

``decode_backend`` ("sdpa" or "triton", resolved from the requested backend when the cache is
made) is the attention kernel of the single-token decode step; see r4b_core/models/attention.py.

The model writes new keys/values through ``write`` and advances ``seq_lens`` at the end of its
forward. Writes that would pass ``capacity`` raise ``CacheOverflowError`` before anything is
written (checked in eager mode; inside ``torch.compile`` the caller — ``generate`` — has already
validated prompt length + max_new_tokens, since a host-side check would break the graph).
"""

from __future__ import annotations

import torch

from r4b_core.models.attention import resolve_decode_backend
from r4b_core.config import TextConfig


class CacheOverflowError(ValueError):
    """A write would pass the cache's capacity."""


class KVCache:
    """Preallocated K/V storage for ``num_layers`` layers and ``batch_size`` sequences."""

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

    def row(self, index: int) -> "KVCache":
        """A batch-1 cache that is a view of sequence ``index``: k/v [L, 1, H_kv, S, D] and seq_lens [1]
        share this cache's storage, so a forward through the view (e.g. prefilling one request of a
        continuously batched server) writes that row only. It keeps this cache's decode backend."""
        if not isinstance(index, int) or not 0 <= index < self.batch_size:
            raise ValueError(f"KVCache.row: index must be an int in [0, {self.batch_size}), got {index!r}.")
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)  # decode_backend and any other setting, shared
        view.k, view.v = self.k[:, index:index + 1], self.v[:, index:index + 1]  # [L, 1, H_kv, S, D] views
        view.seq_lens = self.seq_lens[index:index + 1]  # [1] view
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

    def write(
        self,
        layer: int,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        slots: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> None:
        """Store new keys/values of one layer.

        k_new, v_new: [B, H_kv, T, D]; slots: [B, T] int64 slot index of each token;
        valid: [B, T] bool or None (all valid). Padding tokens (valid False) are not stored.
        """
        k_layer, v_layer = self.k[layer], self.v[layer]  # [B, H_kv, S, D] views
        if valid is None:
            batch_idx = torch.arange(k_new.shape[0], device=slots.device)[:, None].expand_as(slots)  # [B, T]
            # advanced indices around a slice put their dims first: target is [B, T, H_kv, D]
            k_layer[batch_idx, :, slots] = k_new.transpose(1, 2).to(k_layer.dtype)
            v_layer[batch_idx, :, slots] = v_new.transpose(1, 2).to(v_layer.dtype)
        else:
            batch_idx, tok_idx = valid.nonzero(as_tuple=True)  # N valid tokens
            k_layer[batch_idx, :, slots[batch_idx, tok_idx]] = k_new[batch_idx, :, tok_idx].to(k_layer.dtype)
            v_layer[batch_idx, :, slots[batch_idx, tok_idx]] = v_new[batch_idx, :, tok_idx].to(v_layer.dtype)

    def read(self, layer: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer for slots [0, kv_len): two [B, H_kv, kv_len, D] views."""
        return self.k[layer, :, :, :kv_len], self.v[layer, :, :, :kv_len]
