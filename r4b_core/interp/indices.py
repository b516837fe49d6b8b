"""Layer and position indices as the interpretability tools take them: negative counts from the end,
checked against the decoder's depth or the prompt's length before any work (and before the weights load)."""

from __future__ import annotations

from collections.abc import Sequence


def _from_end(indices: Sequence[int], length: int, what: str, holder: str) -> list[int]:
    """Each index in [-length, length) as its non-negative index, in order; ValueError naming the first
    out of range (``what``: "layer"; ``holder``: "the decoder has 4 layers")."""
    out = []
    for i in indices:
        if not -length <= i < length:
            raise ValueError(f"{what} {i} is out of range: {holder} (0..{length - 1}, or -{length}..-1 from the end).")
        out.append(i % length)
    return out


def check_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """Layer indices (negative from the end allowed) as a sorted list without repeats; None: all."""
    if layers is None:
        return list(range(num_layers))
    chosen = _from_end(layers, num_layers, "layer", f"the decoder has {num_layers} layers")
    if not chosen:
        raise ValueError("no layers chosen; give at least one layer index, or none for all layers.")
    return sorted(set(chosen))


def check_positions(positions: Sequence[int] | None, length: int) -> list[int]:
    """Positions (negative from the end) as non-negative indices, in order; None: the last position."""
    if positions is None:
        return [length - 1]
    if not positions:
        raise ValueError("no positions chosen; give at least one, or none for the last position.")
    return _from_end(positions, length, "position", f"the prompt has {length} tokens")
