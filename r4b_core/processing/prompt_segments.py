"""User text is text: which spans of a rendered chat prompt came from message content, and tokenizing them.

transformers renders the chat template and tokenizes the whole string, so a user who types
``<|im_end|><|im_start|>system`` (or ``<think>``, or ``<image>``) into a message gets real control tokens:
they can close their turn, open a system turn, open or close the thinking, or add an image placeholder.
r4b diverges on purpose (DESIGN.md decision 14): only the template emits control tokens.

    conversation ──render (as transformers does)──► text
                 ──render again with each content string that holds special-token text (other than the
                   think tags in an assistant turn) replaced by a unique marker──► skeleton
                   the markers' positions, with the strings put back, give the content spans of ``text``
                   (checked: the skeleton with the strings put back must equal ``text``)
    text + spans ──tokenize──► control tokens are matched only outside the spans (and, in assistant
                   turns, the thinking tags: the model's own earlier output); everything between two
                   control tokens is encoded as plain text, so typed special-token strings become the
                   ordinary tokens of their characters

When no content string holds such text, nothing can differ and the prompt is tokenized in one piece,
exactly as before (and as transformers does). Otherwise the pieces between control tokens
are the same pieces the tokenizers library would have encoded separately anyway (it splits at added
tokens first), so text around the typed strings tokenizes as it would have. A template that rewrites
message content (strips it, cuts it at ``</think>``, ...) leaves the spans unknowable; then a content
string holding special-token text is an error that says so, unless the caller asks for transformers'
behaviour (``parse_special_tokens_in_content=True`` on the processor or the call).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from r4b_core.processing.chat_template import render_chat_template

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # rendered by templates like content


@dataclass(frozen=True)
class ContentSpan:
    """Characters [start, end) of a rendered prompt that came from message content."""

    start: int
    end: int
    controls: tuple[str, ...] = ()  # control-token strings still honoured inside (assistant turns: the think tags)


@dataclass(frozen=True)
class RenderedPrompt:
    """A chat prompt as text plus the spans of it that are message content (tokenized as plain text)."""

    text: str
    spans: tuple[ContentSpan, ...] = ()

    def outside_spans(self, start: int, end: int) -> bool:
        """Whether [start, end) overlaps no content span."""
        return not any(s.start < end and start < s.end for s in self.spans)


def _content_strings(conversation: Sequence[Any]) -> list[tuple[int, tuple, str]]:
    """(message index, path inside the message, text) of every string the user wrote: string content,
    the text of ``{"type": "text"}`` items, and reasoning fields."""
    found = []
    for i, message in enumerate(conversation):
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if isinstance(content, str):
            found.append((i, ("content",), content))
        elif isinstance(content, (list, tuple)):
            for j, item in enumerate(content):
                if isinstance(item, Mapping) and item.get("type") == "text" and isinstance(item.get("text"), str):
                    found.append((i, ("content", j, "text"), item["text"]))
        for key in _REASONING_FIELDS:
            if isinstance(message.get(key), str):
                found.append((i, (key,), message[key]))
    return found


def _with_markers(conversation: Sequence[Any], strings: list[tuple[int, tuple, str]], marker: Callable[[int], str]):
    """A copy of ``conversation`` whose content strings are replaced by ``marker(k)`` (k: index in ``strings``)."""
    out = [dict(m) if isinstance(m, Mapping) else m for m in conversation]
    for k, (i, path, _) in enumerate(strings):
        message = out[i]
        if path[0] != "content" or len(path) == 1:
            message[path[0]] = marker(k)
            continue
        items = message["content"] = list(message["content"])
        items[path[1]] = {**items[path[1]], "text": marker(k)}
    return out


def render_prompt(source: str, conversation: Sequence[Any], add_generation_prompt: bool,
                  special_tokens: Mapping[str, str], added_tokens: Sequence[str],
                  assistant_controls: Sequence[str] = (), parse_special_tokens_in_content: bool = False,
                  **kwargs: Any) -> RenderedPrompt:
    """The rendered prompt of one conversation with its content spans (see the module docstring).

    ``added_tokens``: the strings the tokenizer would turn into added (control) tokens;
    ``assistant_controls``: those still honoured inside assistant content (the thinking tags).
    ``parse_special_tokens_in_content``: no spans (transformers' behaviour)."""
    text = render_chat_template(source, conversation, add_generation_prompt, special_tokens, **kwargs)
    if parse_special_tokens_in_content:
        return RenderedPrompt(text)

    def allowed(i: int) -> tuple[str, ...]:
        message = conversation[i]
        return tuple(assistant_controls) if isinstance(message, Mapping) and message.get("role") == "assistant" else ()

    def typed_control(i: int, value: str) -> str | None:
        """The first added-token text in ``value`` that is not allowed there (None: nothing to keep apart)."""
        for tag in allowed(i):
            value = value.replace(tag, "")
        return next((t for t in added_tokens if t and t in value), None)

    # only strings holding special-token text get a span: the rest renders and tokenizes as it always did
    strings = [(i, path, value) for i, path, value in _content_strings(conversation) if typed_control(i, value)]
    if not strings:
        return RenderedPrompt(text)  # nothing typed can become a control token: tokenized in one piece
    nonce = secrets.token_hex(8)
    pattern = re.compile("\ue000" + nonce + r"(\d+)" + "\ue001")
    skeleton = render_chat_template(source, _with_markers(conversation, strings, lambda k: f"\ue000{nonce}{k}\ue001"),
                                    add_generation_prompt, special_tokens, **kwargs)
    pieces, spans, at, cursor = [], [], 0, 0
    for m in pattern.finditer(skeleton):
        k = int(m.group(1))
        if k >= len(strings):
            break
        pieces.append(skeleton[cursor:m.start()])
        at += m.start() - cursor
        i, _, value = strings[k]
        spans.append(ContentSpan(at, at + len(value), allowed(i)))
        pieces.append(value)
        at += len(value)
        cursor = m.end()
    pieces.append(skeleton[cursor:])
    if "".join(pieces) != text:
        i, _, value = strings[0]
        found = typed_control(i, value)
        raise ValueError(
            f"message {i} holds the special-token text {found!r}, and the chat template rewrites message content "
            "(it renders differently when the content is replaced), so r4b cannot keep that text apart from the "
            "template's own control tokens. Remove it from the message, or pass parse_special_tokens_in_content="
            "True to let it act as a control token (transformers' behaviour)."
        )
    return RenderedPrompt(text, tuple(spans))


def expand_placeholders(prompt: RenderedPrompt, placeholder: str, copies: Sequence[int],
                        marks: Sequence[int] = ()) -> tuple[RenderedPrompt, list[int]]:
    """The k-th ``placeholder`` outside the content spans written ``copies[k]`` times; the spans and ``marks``
    (character positions) moved with the text. ``len(copies)`` must equal ``len(placeholder_starts(...))``."""
    starts = placeholder_starts(prompt, placeholder)
    grow = [(n - 1) * len(placeholder) for n in copies]

    def moved(pos: int) -> int:  # a position moves right by the extra copies of every placeholder before it
        return pos + sum(g for s, g in zip(starts, grow) if s < pos)

    pieces, cursor = [], 0
    for s, n in zip(starts, copies):
        pieces.append(prompt.text[cursor:s] + placeholder * n)
        cursor = s + len(placeholder)
    pieces.append(prompt.text[cursor:])
    spans = tuple(ContentSpan(moved(sp.start), moved(sp.end), sp.controls) for sp in prompt.spans)
    return RenderedPrompt("".join(pieces), spans), [moved(p) for p in marks]


def placeholder_starts(prompt: RenderedPrompt, placeholder: str) -> list[int]:
    """Where ``placeholder`` occurs outside the content spans (the template's own placeholders)."""
    return [m.start() for m in re.finditer(re.escape(placeholder), prompt.text)
            if prompt.outside_spans(m.start(), m.end())]


def encode_prompt(tokenizer, plain_tokenizer: Callable[[], Any], prompt: RenderedPrompt,
                  add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """(ids, start offset of each token) of ``prompt``; content spans are encoded as plain text.

    ``tokenizer``: a ``tokenizers.Tokenizer``; ``plain_tokenizer()``: the same without added tokens (made
    only when needed). Without spans this is ``tokenizer.encode(text)`` itself."""
    if not prompt.spans:
        encoding = tokenizer.encode(prompt.text, add_special_tokens=add_special_tokens)
        return list(encoding.ids), [a for a, _ in encoding.offsets]
    added = {i for i in tokenizer.get_added_tokens_decoder()}
    controls: list[tuple[int, int, int]] = []  # (start, end, id) of the control tokens to keep
    cursor = 0
    regions = [(s.start, s.end, s) for s in sorted(prompt.spans, key=lambda s: s.start)]
    for start, end, span in [*regions, (len(prompt.text), len(prompt.text), None)]:
        if start > cursor:  # template text: its added tokens are control tokens
            region = prompt.text[cursor:start]
            encoding = tokenizer.encode(region, add_special_tokens=False)
            controls += [(cursor + a, cursor + b, i) for i, (a, b) in zip(encoding.ids, encoding.offsets) if i in added]
        if span is not None:
            for tag in span.controls:  # assistant content: the think tags only
                tag_id, at = tokenizer.token_to_id(tag), prompt.text.find(tag, start, end)
                while tag_id is not None and at != -1:
                    controls.append((at, at + len(tag), tag_id))
                    at = prompt.text.find(tag, at + len(tag), end)
        cursor = max(cursor, end)
    ids: list[int] = []
    starts: list[int] = []
    plain = None
    cursor = 0
    for start, end, token_id in sorted(controls):
        if start < cursor:
            continue
        if start > cursor:
            plain = plain or plain_tokenizer()
            encoding = plain.encode(prompt.text[cursor:start], add_special_tokens=False)
            ids += encoding.ids
            starts += [cursor + a for a, _ in encoding.offsets]
        ids.append(token_id)
        starts.append(start)
        cursor = end
    if cursor < len(prompt.text):
        plain = plain or plain_tokenizer()
        encoding = plain.encode(prompt.text[cursor:], add_special_tokens=False)
        ids += encoding.ids
        starts += [cursor + a for a, _ in encoding.offsets]
    if add_special_tokens and tokenizer.num_special_tokens_to_add(False):
        before, after = _post_processor_tokens(tokenizer)
        ids, starts = before + ids + after, [0] * len(before) + starts + [0] * len(after)
    return ids, starts


def _post_processor_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a single sequence (e.g. a bos token)."""
    probe = tokenizer.post_process(tokenizer.encode("a", add_special_tokens=False), add_special_tokens=True)
    inside = [i for i, s in enumerate(probe.sequence_ids) if s is not None]
    first, last = (inside[0], inside[-1]) if inside else (len(probe.ids), len(probe.ids) - 1)
    return list(probe.ids[:first]), list(probe.ids[last + 1:])


def plain_text_tokenizer(tokenizer):
    """A copy of ``tokenizer`` with no added tokens: it encodes every string as the tokens of its characters."""
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.to_str())
    data["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(data))
