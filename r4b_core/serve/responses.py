"""The OpenAI response objects: chat.completion (+ chunks), text_completion, usage, logprobs, models.

Chat logprobs are OpenAI's ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``, one
entry per generated token (thinking tokens included, as vLLM does); completions logprobs are the legacy
``{"tokens", "token_logprobs", "top_logprobs" ({text: logprob}), "text_offset"}``. A token's text is its
own decoding (a lone piece of a multi-byte character decodes to U+FFFD; ``bytes`` are its real bytes).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from r4b_core.processing.qwen_tokenizer import bytes_to_unicode

TopLogprobs = list[tuple[int, float]]
DONE = "data: [DONE]\n\n"  # the last event of every stream


def sse(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class TokenTexts:
    """Token id -> (text, UTF-8 bytes), cached. ``id_to_token``: the tokenizer's vocabulary string of an id
    (byte-level BPE: one printable character per byte, mapped back here)."""

    def __init__(self, decode: Callable[[list[int]], str], id_to_token: Callable[[int], str | None]) -> None:
        self.decode, self.id_to_token = decode, id_to_token
        self.byte_of = {c: b for b, c in bytes_to_unicode().items()}
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self.cache:
            text = self.decode([token])
            piece = self.id_to_token(token) or ""
            raw = bytes(self.byte_of[c] for c in piece) if piece and all(c in self.byte_of for c in piece) \
                else text.encode()
            self.cache[token] = (text, list(raw))
        return self.cache[token]


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}
    if reasoning_tokens is not None:
        body["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return body


# ---------------------------------------------------------------------------------------------
# chat


def chat_logprob_entries(texts: TokenTexts, tokens: Sequence[int], logprobs: Sequence[float],
                         tops: Sequence[TopLogprobs]) -> list[dict[str, Any]]:
    entries = []
    for token, logprob, top in zip(tokens, logprobs, tops):
        text, raw = texts(token)
        entries.append({"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": [
            {"token": texts(i)[0], "logprob": lp, "bytes": texts(i)[1]} for i, lp in top]})
    return entries


def chat_choice(index: int, content: str | None, reasoning: str | None, finish_reason: str,
                logprobs: list[dict[str, Any]] | None, token_ids: list[int] | None) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": index,
        "message": {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": []},
        "logprobs": None if logprobs is None else {"content": logprobs},
        "finish_reason": finish_reason,
    }
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chat_completion(cid: str, created: int, model: str, choices: list[dict[str, Any]], usage_: dict[str, Any],
                    prompt_token_ids: list[int] | None = None) -> dict[str, Any]:
    body = {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage_}
    if prompt_token_ids is not None:
        body["prompt_token_ids"] = prompt_token_ids
    return body


def chat_chunk(cid: str, created: int, model: str, index: int, delta: dict[str, Any],
               finish_reason: str | None = None, logprobs: list[dict[str, Any]] | None = None,
               token_ids: list[int] | None = None, prompt_token_ids: list[int] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "delta": delta,
                              "logprobs": None if logprobs is None else {"content": logprobs},
                              "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    if prompt_token_ids is not None:
        body["prompt_token_ids"] = prompt_token_ids
    return body


def usage_chunk(cid: str, created: int, model: str, usage_: dict[str, Any], obj: str = "chat.completion.chunk"):
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": cid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_}


# ---------------------------------------------------------------------------------------------
# completions


def completion_logprobs(texts: TokenTexts, tokens: Sequence[int], logprobs: Sequence[float | None],
                        tops: Sequence[TopLogprobs | None], offset: int = 0) -> dict[str, Any]:
    """The legacy logprobs object; ``offset``: the text offset of the first token."""
    strings, offsets, top_dicts = [], [], []
    for token, top in zip(tokens, tops):
        text = texts(token)[0]
        strings.append(text)
        offsets.append(offset)
        offset += len(text)
        top_dicts.append(None if top is None else {texts(i)[0]: lp for i, lp in top})
    return {"tokens": strings, "token_logprobs": list(logprobs), "top_logprobs": top_dicts, "text_offset": offsets}


def merge_completion_logprobs(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    return {k: first[k] + second[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None,
                      token_ids: list[int] | None = None, prompt_token_ids: list[int] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    if prompt_token_ids is not None:
        choice["prompt_token_ids"] = prompt_token_ids
    return choice


def text_completion(cid: str, created: int, model: str, choices: list[dict[str, Any]],
                    usage_: dict[str, Any] | None) -> dict[str, Any]:
    body = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


# ---------------------------------------------------------------------------------------------
# models


def model_card(name: str, max_model_len: int, created: int | None = None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created or int(time.time()), "owned_by": "r4b",
            "max_model_len": max_model_len}
