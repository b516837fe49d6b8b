"""The cache interface the model attends through, and the layout of one forward's new tokens.

Notation: L layers, B sequences, T new tokens of this forward, S key/value slots attended to,
H_kv key/value heads, Hq query heads, D head_dim.

The interface (``AttentionCache``): the model keeps no inference state; a cache is passed into
``forward`` and every layer goes through these five calls, so a second implementation (a paged cache)
only has to satisfy them:

    layout = cache.plan(attention_mask, n_new)       once per forward, before the layers: default RoPE
                                                     positions of the new tokens, where each is stored
                                                     (``slots``), the lengths after this forward, the mask
                                                     and key count S for ``read``; checks the room (eager)
    cache.write(layer, k, v, layout)                 store one layer's new keys/values [B, H_kv, T, D]
                                                     (padding tokens, ``layout.valid`` False, are not stored)
    k, v, mask = cache.read(layer, layout)           one layer's keys/values [B, H_kv, S, D] (this forward's
                                                     included) and the bool mask [B, 1, T, S] or None (plain
                                                     causal) for SDPA or the explicit softmax
    out = cache.decode_attention(layer, q, layout, scale)   the fused single-token step (``layout.decode``):
                                                     q [B, Hq, D] -> [B, Hq, D], with the cache's backend
    cache.commit(layout)                             after the last layer: the lengths advance

plus ``batch_size`` and ``reserve_decode()``: the host-side bookkeeping of a decode step (room check, the
span of slots it reads; a paged cache would allocate blocks here), which ``compiled_decode_step`` calls
outside the compiled graph; an eager forward does it itself in ``plan``. ``uncached_layout`` gives the
same ``AttentionLayout`` for a forward without a cache. The attention entry that uses all this is
``compute_attention`` in r4b_core/models/attention.py; the static cache is r4b_core/models/kv_cache.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class AttentionRecorder:
    """Collects each layer's attention probabilities [B, Hq, T, S] during one forward, in layer order.

    A plain object rather than a list or a dataclass: wrappers that rebuild a block's arguments (FSDP2's
    input casting rebuilds lists and dataclasses) pass it through as the same object.
    """

    def __init__(self) -> None:
        self.probs: list[torch.Tensor] = []

    def add(self, probs: torch.Tensor) -> None:
        self.probs.append(probs)


@dataclass
class AttentionLayout:
    """Where this forward's new tokens go and what each may attend to: computed once per forward (by a
    cache's ``plan`` or ``uncached_layout``), read by every layer.

    positions:  int64 [B, T]  default RoPE position of each new token (real tokens before it, cache included)
    mask:       bool [B, 1, T, S] (True = may attend) over the keys ``read`` returns, or None: plain causal
    valid:      bool [B, T] which new tokens are real (None = all); padding is never cached
    slots:      int64 [B, T] where the cache stores each new token (cache-specific; the static cache: the
                slot in the sequence's row; a paged cache: block * block_size + offset)
    kv_len:     S, the key slots ``read`` returns (a decode step: the span ``decode_attention`` reads)
    seq_lens:   [B] tokens per sequence after this forward's write (cache only)
    decode:     one new token per sequence through a cache: the fused ``decode_attention`` path applies
    packed:     several sequences' prefill chunks in one row (r4b_core/models/packed_prefill.py): the cache's
                ``packed_attention(layer, q, layout, scale)`` attends chunk by chunk (a cache whose ``plan``
                sets this provides it)
    attentions: collects each layer's probabilities (output_attentions=True), else None
    """

    positions: torch.Tensor
    mask: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    kv_len: int = 0
    seq_lens: torch.Tensor | None = None
    decode: bool = False
    packed: bool = False
    attentions: AttentionRecorder | None = None


class AttentionCache(Protocol):
    """What the model needs of a KV cache (see the module docstring); ``KVCache`` is the static one."""

    @property
    def batch_size(self) -> int: ...

    def plan(self, attention_mask: torch.Tensor | None, n_new: int) -> AttentionLayout: ...

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, layout: AttentionLayout) -> None: ...

    def read(self, layer: int, layout: AttentionLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...

    def decode_attention(self, layer: int, q: torch.Tensor, layout: AttentionLayout, scale: float) -> torch.Tensor: ...

    def commit(self, layout: AttentionLayout) -> None: ...

    def reserve_decode(self) -> None: ...


def new_token_offsets(valid: torch.Tensor | None, batch: int, n_new: int, device: torch.device) -> torch.Tensor:
    """[B, T] index of each new token among its sequence's real new tokens (padding borrows a neighbour's)."""
    if valid is None:
        return torch.arange(n_new, device=device).expand(batch, n_new)  # [B, T]
    return (valid.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]


def uncached_layout(attention_mask: torch.Tensor | None, batch: int, n_new: int,
                    device: torch.device) -> AttentionLayout:
    """The layout of a forward without a cache: positions [B, T] and, with padding, the mask [B, 1, T, T]."""
    valid = attention_mask.bool() if attention_mask is not None else None
    positions = new_token_offsets(valid, batch, n_new, device)
    if valid is None:
        return AttentionLayout(positions=positions)  # plain causal: SDPA's fused path
    causal = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril()  # [T, T]
    mask = causal[None] & valid[:, None, :]  # [B, T, T]: causal and key is real
    mask = mask | ~valid[:, :, None]  # padding queries see everything (finite junk, no NaN)
    return AttentionLayout(positions=positions, mask=mask[:, None], valid=valid)
