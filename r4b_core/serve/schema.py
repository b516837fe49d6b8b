"""The OpenAI chat-completions schema: request validation and the response, chunk and error objects.

``parse_chat_request(body)`` turns a decoded JSON body into a ``ChatRequest`` or raises ``APIError``
(status, message naming the field, OpenAI's ``type`` / ``param`` / ``code``). Accepted:

    model, messages (roles system | developer | user | assistant; content a string or a list of
    {"type": "text", "text"} and {"type": "image_url", "image_url": {"url"}} parts, images in user
    messages only), max_tokens | max_completion_tokens, temperature, top_p, top_k, seed, stop, stream,
    stream_options.include_usage, n (1 only), chat_template_kwargs.thinking_mode (or enable_thinking),
    max_thinking_tokens, and two of vLLM's extensions: return_token_ids (the generated ids in the
    choice; in a stream, on the last chunk) and ignore_eos (generate max_tokens tokens, for load tests)

Fields that would change the output but are not implemented (tools, logprobs, penalties, logit_bias,
a JSON response_format) are refused rather than ignored; other unknown fields are ignored, as
OpenAI-compatible servers do.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from r4b_core.json_io import is_int

ROLES = ("system", "developer", "user", "assistant")
THINKING_MODES = ("auto", "long", "short")


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, f"{param}: {message}" if param else message, param=param or None, code=code)


@dataclass
class ImageRef:
    """An image part: where it is in the request (for errors) and its URL."""

    param: str  # e.g. "messages[0].content[1].image_url"
    url: str


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]  # the processor's form: content lists with {"type": "image"} placeholders
    images: list[ImageRef]  # in placeholder order
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    thinking_mode: str | None = None  # None: the server's default
    max_thinking_tokens: int | None = None  # None: the server's default
    return_token_ids: bool = False
    ignore_eos: bool = False


# ---------------------------------------------------------------------------------------------
# typed field readers


def _int(body: Mapping, key: str, minimum: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not is_int(v):
        raise invalid(key, f"expected an integer, got {type(v).__name__} {v!r}.")
    if minimum is not None and v < minimum:
        raise invalid(key, f"must be at least {minimum}, got {v}.")
    return v


def _number(body: Mapping, key: str, low: float, high: float, low_open: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise invalid(key, f"expected a finite number, got {v!r}.")
    if v < low or v > high or (low_open and v == low):
        span = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise invalid(key, f"must be in {span}, got {v}.")
    return float(v)


def _bool(body: Mapping, key: str, prefix: str = "") -> bool | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise invalid(prefix + key, f"expected true or false, got {v!r}.")
    return v


def _object(body: Mapping, key: str) -> Mapping | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, Mapping):
        raise invalid(key, f"expected an object, got {type(v).__name__}.")
    return v


# ---------------------------------------------------------------------------------------------
# the request


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded JSON body (see the module docstring); raises APIError(400, ...) naming the field."""
    if not isinstance(body, Mapping):
        raise invalid("", f"the request body must be a JSON object, got {type(body).__name__}.")
    _refuse_unsupported(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", f"expected a string, got {type(model).__name__}.")
    messages, images = _parse_messages(body.get("messages"))
    n = _int(body, "n", minimum=1)
    if n is not None and n != 1:
        raise invalid("n", f"only n=1 is supported (one choice per request), got {n}; send {n} requests instead.")
    max_tokens = _int(body, "max_completion_tokens", minimum=1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", minimum=1)
    top_k = _int(body, "top_k", minimum=-1)
    stream = bool(_bool(body, "stream"))
    options = _object(body, "stream_options")
    if options is not None and not stream:
        raise invalid("stream_options", "only allowed when stream is true.")
    include_usage = bool(_bool(options, "include_usage", "stream_options.") if options else False)
    thinking_mode = _thinking_mode(_object(body, "chat_template_kwargs"))
    return ChatRequest(
        messages=messages, images=images, model=model, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0), top_p=_number(body, "top_p", 0.0, 1.0, low_open=True),
        top_k=None if top_k is None else max(top_k, 0), seed=_int(body, "seed"), stop=_stop(body.get("stop")),
        stream=stream, include_usage=include_usage, thinking_mode=thinking_mode,
        max_thinking_tokens=_int(body, "max_thinking_tokens", minimum=0),
        return_token_ids=bool(_bool(body, "return_token_ids")), ignore_eos=bool(_bool(body, "ignore_eos")),
    )


def _refuse_unsupported(body: Mapping) -> None:
    def present(key: str, default: Any = None) -> bool:
        return body.get(key) not in (None, default)

    for key in ("tools", "functions"):
        if body.get(key):
            raise invalid(key, "tool calling is not supported by this server.")
    if body.get("tool_choice") not in (None, "none"):
        raise invalid("tool_choice", "tool calling is not supported by this server.")
    if present("logprobs", False) or present("top_logprobs", 0):
        raise invalid("logprobs", "log probabilities are not supported by this server.")
    for key in ("presence_penalty", "frequency_penalty"):
        if present(key, 0):
            raise invalid(key, "penalties are not supported by this server; leave it at 0.")
    if body.get("logit_bias"):
        raise invalid("logit_bias", "logit_bias is not supported by this server.")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise invalid("response_format", "only {\"type\": \"text\"} is supported.")


def _stop(v: Any) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", f"expected a string or a list of strings, got {v!r}.")
    if len(stops) > 16 or any(not s for s in stops):
        raise invalid("stop", "give at most 16 non-empty stop strings.")
    return stops


def _thinking_mode(kwargs: Mapping | None) -> str | None:
    if not kwargs:
        return None
    mode = kwargs.get("thinking_mode")
    if mode is not None:
        if mode not in THINKING_MODES:
            raise invalid("chat_template_kwargs.thinking_mode",
                          f"must be one of {', '.join(THINKING_MODES)}, got {mode!r}.")
        return mode
    enable = kwargs.get("enable_thinking")  # Qwen3's switch, mapped onto R-4B's modes
    if enable is None:
        return None
    if not isinstance(enable, bool):
        raise invalid("chat_template_kwargs.enable_thinking", f"expected true or false, got {enable!r}.")
    return "long" if enable else "short"


def _parse_messages(raw: Any) -> tuple[list[dict[str, Any]], list[ImageRef]]:
    if raw is None:
        raise invalid("messages", "required: a non-empty list of {role, content} objects.")
    if not isinstance(raw, list):
        raise invalid("messages", f"expected a list of messages, got {type(raw).__name__}.")
    if not raw:
        raise invalid("messages", "is empty; give at least one message.")
    messages, images = [], []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise invalid(where, f"expected an object with role and content, got {type(m).__name__}.")
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}.")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                parts.append(_parse_part(part, f"{where}.content[{j}]", role, images))
        else:
            raise invalid(f"{where}.content", f"expected a string or a list of parts, got {type(content).__name__}.")
        messages.append({"role": "system" if role == "developer" else role, "content": parts})
    if all(m["role"] == "assistant" for m in messages):
        raise invalid("messages", "needs at least one system or user message.")
    return messages, images


def _parse_part(part: Any, where: str, role: str, images: list[ImageRef]) -> dict[str, Any]:
    if not isinstance(part, Mapping):
        raise invalid(where, f"expected a content part object, got {type(part).__name__}.")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid(f"{where}.text", f"expected a string, got {type(text).__name__}.")
        return {"type": "text", "text": text}
    if kind == "image_url":
        if role != "user":
            raise invalid(where, f"images are accepted in user messages only, not in a {role} message.")
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, Mapping) else ref
        if not isinstance(url, str) or not url:
            raise invalid(f"{where}.image_url", "expected {\"url\": \"data:image/...;base64,...\"} or an http(s) URL.")
        images.append(ImageRef(f"{where}.image_url", url))
        return {"type": "image"}
    raise invalid(f"{where}.type", f"unsupported content part type {kind!r}; use 'text' or 'image_url'.")


# ---------------------------------------------------------------------------------------------
# responses


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, created: int, model: str, content: str, reasoning: str | None, finish_reason: str,
               prompt_tokens: int, completion_tokens: int, token_ids: list[int] | None = None) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice."""
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": []},
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None = None,
          token_ids: list[int] | None = None) -> dict[str, Any]:
    """A ``chat.completion.chunk`` object with one choice."""
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def usage_chunk(cid: str, created: int, model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def model_card(name: str, max_model_len: int, created: int | None = None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created or int(time.time()), "owned_by": "r4b",
            "max_model_len": max_model_len}
