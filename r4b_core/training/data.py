"""Supervised fine-tuning data: one conversation -> (input_ids, labels, images), examples -> a batch.

    conversation ──chat template (whole, no generation prompt)──► text
                 ──render the turns before / through each assistant turn──► target spans [start, end)
    text + images ──R4BProcessor.encode_with_images (the path inference uses; spans carried along)──►
                  ids, token starts ──► labels = ids where a token starts inside a span, else IGNORE_INDEX
    examples ──collate (right padding)──► input_ids, attention_mask, labels [B, T] (+ images)

    examples = [build_training_example(processor, messages, images) for messages, images in data]
    batch = collate(examples, processor.pad_token_id)
    loss = model(**batch).loss

``IGNORE_INDEX`` is the one label value that means "no target" (training.py's losses use it too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from r4b_core.processing.chat_template import render_chat_template
from r4b_core.processing.conversation import as_conversations, conversation_images
from r4b_core.processing.processor import R4BProcessor, check_thinking_mode

IGNORE_INDEX = -100  # labels: no loss at this position (torch's cross_entropy default)


def build_training_example(processor: R4BProcessor, messages: Sequence[Any], images: Any = None,
                           thinking_mode: str = "auto", max_length: int | None = None) -> dict[str, torch.Tensor]:
    """One supervised example from a conversation that holds at least one assistant turn.

    Returns ``input_ids`` and ``labels`` (int64 [T]) and, with images, ``pixel_values``
    [N_images, views, 3, S, S] and ``image_sizes`` [N_images, 2]; ``collate`` batches them.
    ``images``: as for the processor (inside the messages, or one list / a flat list here).

    The text is the chat template's rendering of the whole conversation (no generation prompt).
    ``labels`` are IGNORE_INDEX except on what the model should write in each assistant turn: the text
    after the turn's generation prompt (as ``thinking_mode`` renders it: nothing extra for ``auto``,
    so a ``<think>...</think>`` block in the content is learned; ``long`` / ``short`` put the
    ``<think>`` opening / the empty thought in the prompt, so the content must start with it)
    up to and including the turn's end token (``<|im_end|>`` in ChatML, so the model learns to stop;
    the newline after it is not learned: it is never generated). Thinking text is labelled exactly
    as the template renders it. Image tokens are never labels. Tokenization is that of the whole
    text, by the processor's own inference path; a token is a label when it starts inside a target span.

    Errors: no assistant turn; a number of images that differs from the number of ``<image>``
    placeholders; a template whose rendering of the first turns is not a prefix of the whole
    rendering (turn boundaries could not be found); ``max_length`` exceeded (never truncated).
    """
    check_thinking_mode(thinking_mode)
    conversations, batched = as_conversations(messages)
    if batched:
        raise ValueError("build_training_example takes one conversation; call it once per conversation.")
    conversation = conversations[0]
    roles = [m.get("role") if isinstance(m, Mapping) else None for m in conversation]
    turns = [i for i, role in enumerate(roles) if role == "assistant"]
    if not turns:
        raise ValueError(
            f"the conversation has no assistant turn (roles: {roles}); a training example needs at least "
            "one assistant message to learn from."
        )
    imgs = conversation_images([conversation], images)[0]

    def render(msgs: list[Any], generation_prompt: bool) -> str:
        return render_chat_template(processor.template_source, msgs, generation_prompt, processor.special_tokens,
                                    thinking_mode=thinking_mode)

    full = render(conversation, False)
    spans = []  # character spans [start, end) of the targets in ``full``
    for i in turns:
        head, turn = render(conversation[:i], True), render(conversation[: i + 1], False)
        if not full.startswith(turn):
            raise ValueError(
                f"the chat template renders messages 0..{i} differently inside the whole conversation (it "
                "rewrites earlier turns, e.g. drops their thinking), so the assistant turn cannot be located; "
                "make one training example per assistant turn."
            )
        if not turn.startswith(head):
            raise ValueError(
                f"assistant message {i} does not start with the generation prompt of thinking_mode="
                f"{thinking_mode!r} ({head[len(render(conversation[:i], False)):]!r}); write the content as "
                "the model would continue that prompt, or use thinking_mode='auto'."
            )
        spans.append((len(head), len(turn.rstrip())))

    # the same text with its message-content spans: typed special-token text stays text, as at inference
    whole = processor.render_prompt(conversation, thinking_mode, add_generation_prompt=False)
    (encoded,), image_inputs = processor.encode_with_images([whole], [imgs], marks=[[c for s in spans for c in s]])
    ids = torch.tensor(encoded.ids, dtype=torch.int64)  # [T]
    starts = torch.tensor(encoded.token_starts, dtype=torch.int64)  # [T]
    is_target = torch.zeros_like(ids, dtype=torch.bool)
    for s, e in zip(encoded.marks[0::2], encoded.marks[1::2]):
        is_target |= (starts >= s) & (starts < e)
    is_target &= ids != processor.image_token_id
    if not bool(is_target.any()):
        raise ValueError("the assistant turns give no target tokens (empty content and no end token).")
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"the example has {len(ids)} tokens, more than max_length={max_length}; "
                         "it is not truncated (that could cut image tokens); shorten it or raise the limit.")
    out = {k: image_inputs[k] for k in ("pixel_values", "image_sizes") if k in image_inputs}
    return {"input_ids": ids, "labels": ids.masked_fill(~is_target, IGNORE_INDEX), **out}


def collate(examples: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int,
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """A training batch from ``build_training_example`` outputs; ``model(**batch)`` works.

    ``input_ids`` [B, T] RIGHT-padded with ``pad_token_id`` (training: every real token keeps positions
    0..n-1; pass ``processor.pad_token_id``), ``attention_mask`` [B, T] (1 = real), ``labels`` [B, T]
    padded with IGNORE_INDEX; with images, ``pixel_values`` [N, max_views, 3, S, S] (all images of the
    batch in order, views zero-padded), ``image_sizes`` [N, 2] and ``batch_num_images`` [B] (images per
    example, 0 for a text-only one; the model tiles an image only when its example has exactly one).
    """
    if not examples:
        raise ValueError("collate: no examples.")
    for i, ex in enumerate(examples):
        if ex["input_ids"].ndim != 1 or ex["labels"].shape != ex["input_ids"].shape:
            raise ValueError(f"example {i}: input_ids and labels should be 1-D tensors of one length.")
        if ("pixel_values" in ex) != ("image_sizes" in ex):
            raise ValueError(f"example {i}: pixel_values and image_sizes come together.")
    width = max(len(ex["input_ids"]) for ex in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.int64)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((batch, width), dtype=torch.int64)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = ex["input_ids"], ex["labels"], 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    with_images = [ex for ex in examples if "pixel_values" in ex]
    if with_images:
        views = max(ex["pixel_values"].shape[1] for ex in with_images)
        # [n_i, views_i, 3, S, S] -> [n_i, views, 3, S, S] (zero views appended), then all images in order
        out["pixel_values"] = torch.cat([
            torch.nn.functional.pad(ex["pixel_values"], (0, 0, 0, 0, 0, 0, 0, views - ex["pixel_values"].shape[1]))
            for ex in with_images
        ])
        out["image_sizes"] = torch.cat([ex["image_sizes"] for ex in with_images])
        out["batch_num_images"] = torch.tensor([len(ex.get("image_sizes", ())) for ex in examples], dtype=torch.int64)
    return out
