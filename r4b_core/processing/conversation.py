"""Messages as users give them -> conversations and the images each one carries.

``as_conversations`` accepts one conversation or a batch of them; ``conversation_images`` pairs each
conversation with its images, taken from its ``{"type": "image", "image" | "url" | "path"}`` items or from
``images=`` (never both); ``check_unicode`` refuses text the tokenizer cannot take. Used by the processor
and by training_data.py; pure Python, no tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check_unicode(text: str, what: str) -> None:
    """The tokenizer takes valid Unicode only: a lone surrogate (left by a broken decode) is a ValueError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} holds {text[e.start:e.end]!r} at character {e.start}: a lone surrogate, not valid "
                         "Unicode text; fix the decoding that produced it (e.g. decode with errors='replace').") from None


def as_conversations(messages: Any) -> tuple[list[list[Any]], bool]:
    """(conversations, batched) from one conversation or a list of them; empty ones are errors."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages should be a non-empty list of {'role', 'content'} dicts, or a list of such lists.")
    batched = isinstance(messages[0], (list, tuple))
    if batched and not all(isinstance(c, (list, tuple)) for c in messages):
        raise ValueError("messages mixes conversations (lists) and other items; give one list of message dicts, "
                         "or a list of such lists.")
    conversations = [list(c) for c in messages] if batched else [list(messages)]
    for i, conv in enumerate(conversations):
        if not conv:
            raise ValueError(f"conversation {i} is empty; give at least one message." if batched else
                             "the conversation is empty; give at least one message.")
    return conversations, batched


_NO_PAYLOAD = object()


def _images_in_conversation(conversation: list[Any]) -> list[Any]:
    """The images of a conversation's ``{"type": "image"}`` items, in order (``_NO_PAYLOAD`` for an item
    that only marks a place: its image comes from ``images=``)."""
    found = []
    for message in conversation:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, (list, tuple)):
            continue
        for item in content:
            kind = item.get("type") if isinstance(item, Mapping) else None
            if kind in ("video", "audio"):
                raise ValueError(f"R-4B takes images and text; a '{kind}' content item is not supported.")
            if kind != "image":
                continue
            if "base64" in item:
                raise ValueError("base64 image items are not decoded; pass a PIL image, an array or a file path.")
            payload = next((item[k] for k in ("image", "url", "path") if item.get(k) is not None), _NO_PAYLOAD)
            if isinstance(payload, str) and payload.split(":", 1)[0].lower() in ("http", "https", "data"):
                raise ValueError(f"image URLs are not fetched ({payload[:60]!r}); download it and pass the file path.")
            found.append(payload)
    return found


def conversation_images(conversations: list[list[Any]], images: Any) -> list[list[Any]]:
    """One list of images per conversation: the payloads of its ``{"type": "image", "image" | "url" | "path"}``
    items, or (when the items only mark places) ``images=``: one list per conversation, or a flat list (or
    one image) for a single conversation. Giving images both ways is an error."""
    return images_per_sample(images, [_images_in_conversation(c) for c in conversations], len(conversations))


def images_per_sample(images: Any, in_messages: list[list[Any]] | None, batch: int) -> list[list[Any]]:
    """One list of images per sample, from the messages or from ``images=`` (never both)."""
    if in_messages is not None and any(x is not _NO_PAYLOAD for s in in_messages for x in s):
        if images is not None:
            raise ValueError("images are given both inside the messages and as images=; give them one way.")
        if any(x is _NO_PAYLOAD for s in in_messages for x in s):
            raise ValueError("some image items carry an image ('image', 'url' or 'path') and some do not.")
        return [list(s) for s in in_messages]
    if images is None or (isinstance(images, (list, tuple)) and not images):
        return [[] for _ in range(batch)]
    if not isinstance(images, (list, tuple)):
        images = [images]
    nested = [x is None or isinstance(x, (list, tuple)) for x in images]
    if images and all(nested):
        if len(images) != batch:
            raise ValueError(f"images has {len(images)} per-sample lists for {batch} prompt(s).")
        return [list(x or []) for x in images]
    if any(nested):
        raise ValueError(
            "images mixes lists and single images; give one list per sample, or a flat list for one sample."
        )
    if batch != 1:
        raise ValueError(f"with {batch} prompts, give images as one list per prompt (e.g. [[img], []]).")
    return [list(images)]
