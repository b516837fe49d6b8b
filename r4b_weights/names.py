"""The one table between checkpoint (HF) tensor names and ours.

Our names are the full model's state-dict names:

    language_model.model.*     the Qwen3 decoder (embed_tokens, layers.N.*, norm)
    language_model.lm_head.*   the output head
    vision_tower.*             SigLIP (embeddings, encoder.layers.N.*, post_layernorm)
    multi_modal_projector.*    pre_norm, linear_1, linear_2
    image_newline

The text-only ``Qwen3ForCausalLM`` uses the same names without the ``language_model.`` prefix.

Each rule maps an HF prefix to ours; the longest matching HF prefix wins, so rule order does not
matter. ``layouts`` says which save formats spell a tensor that way; exporting to a layout uses the
rule listed for it. Dropped tensors are named by explicit rules with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

# save formats
R4B = "r4b"  # what R-4B ships (transformers >= 4.52 LLaVA naming), r4b_spec.md §1.6
LLAVA_LEGACY = "llava-legacy"  # older LLaVA saves: language_model.model.*, vision_tower.vision_model.*
QWEN3 = "qwen3"  # a plain Qwen3ForCausalLM checkpoint (text only)
LAYOUTS = (R4B, LLAVA_LEGACY, QWEN3)


@dataclass(frozen=True)
class Rule:
    hf: str  # HF name prefix (or whole name)
    ours: str  # our prefix
    layouts: tuple[str, ...] = ()  # save formats that use this spelling (empty: accepted on load only)


RULES: tuple[Rule, ...] = (
    # text decoder and head
    Rule("model.language_model.", "language_model.model.", (R4B,)),
    Rule("language_model.model.", "language_model.model.", (LLAVA_LEGACY,)),
    Rule("model.", "language_model.model.", (QWEN3,)),
    Rule("lm_head.", "language_model.lm_head.", (R4B, QWEN3)),
    Rule("language_model.lm_head.", "language_model.lm_head.", (LLAVA_LEGACY,)),
    # vision tower: with or without the SiglipVisionModel -> vision_model nesting
    Rule("model.vision_tower.vision_model.", "vision_tower.", (R4B,)),
    Rule("model.vision_tower.", "vision_tower."),
    Rule("vision_tower.vision_model.", "vision_tower.", (LLAVA_LEGACY,)),
    Rule("vision_tower.", "vision_tower."),
    # projector and the image-newline vector
    Rule("model.multi_modal_projector.", "multi_modal_projector.", (R4B,)),
    Rule("multi_modal_projector.", "multi_modal_projector.", (LLAVA_LEGACY,)),
    Rule("model.image_newline", "image_newline", (R4B,)),
    Rule("image_newline", "image_newline", (LLAVA_LEGACY,)),
)

# Tensors a checkpoint may hold that we deliberately do not load: (match on our name, reason).
DROPPED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vision_tower.head.", "SigLIP pooling head: R-4B takes features from hidden states, never from the head"),
)
DROPPED_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".rotary_emb.inv_freq", "RoPE frequencies are computed from the config, not stored"),
)


class UnknownTensorName(KeyError):
    """An HF tensor name that no rule covers."""


def hf_to_ours(hf_name: str) -> str | None:
    """Our (full-model) name for an HF tensor name; None if a drop rule says to skip it."""
    best: Rule | None = None
    for rule in RULES:
        if hf_name.startswith(rule.hf) and (best is None or len(rule.hf) > len(best.hf)):
            best = rule
    if best is None:
        raise UnknownTensorName(hf_name)
    ours = best.ours + hf_name[len(best.hf):]
    return None if drop_reason(ours) else ours


def drop_reason(our_name: str) -> str | None:
    for prefix, reason in DROPPED_PREFIXES:
        if our_name.startswith(prefix):
            return reason
    for suffix, reason in DROPPED_SUFFIXES:
        if our_name.endswith(suffix):
            return reason
    return None


def ours_to_hf(our_name: str, layout: str = R4B) -> str:
    """The HF name ``layout`` gives one of our (full-model) names; inverse of ``hf_to_ours``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
    best: Rule | None = None
    for rule in RULES:
        if layout in rule.layouts and our_name.startswith(rule.ours):
            if best is None or len(rule.ours) > len(best.ours):
                best = rule
    if best is None:
        raise UnknownTensorName(f"{our_name} has no spelling in the {layout!r} layout")
    return best.hf + our_name[len(best.ours):]


# The text-only model (Qwen3ForCausalLM) names = full names without this prefix.
TEXT_PREFIX = "language_model."


def full_to_text(our_name: str) -> str | None:
    """Text-only name of a full-model name; None for vision-side tensors (not part of the text model)."""
    return our_name[len(TEXT_PREFIX):] if our_name.startswith(TEXT_PREFIX) else None


def text_to_full(text_name: str) -> str:
    return TEXT_PREFIX + text_name
