"""The OpenAI request schema: validation of chat-completions bodies and of the fields chat and
``/v1/completions`` share (completions.py parses the rest of its own).

``parse_chat_request(body, max_n)`` turns a decoded JSON body into a ``ChatRequest`` or raises
``APIError`` (status, message naming the field, OpenAI's ``type`` / ``param`` / ``code``). Accepted:

    model, messages (roles system | developer | user | assistant; content a string or a list of
    {"type": "text", "text"} and {"type": "image_url", "image_url": {"url"}} parts, images in user
    messages only), max_tokens | max_completion_tokens, temperature, top_p, top_k, seed (int64),
    stop, stop_token_ids, min_tokens, n (1..max_n), stream, stream_options.include_usage,
    logprobs + top_logprobs (0..20), response_format (text | json_object | json_schema),
    chat_template_kwargs.thinking_mode (or enable_thinking), thinking_token_budget (vLLM's name; r4b's
    max_thinking_tokens is the same field), include_reasoning, return_token_ids, ignore_eos

Fields that would change the output but are not implemented (tools, penalties, logit_bias, prompt
logprobs in chat, vLLM's guided-decoding fields, ...) are refused rather than ignored; other unknown
fields (user, metadata, ...) are ignored, as OpenAI-compatible servers do. The response objects are
in responses.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from r4b_core.json_io import is_int

ROLES = ("system", "developer", "user", "assistant")
THINKING_MODES = ("auto", "long", "short")
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
MAX_TOP_LOGPROBS = 20  # OpenAI's limit (and vLLM's default --max-logprobs)


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
class ResponseFormat:
    """``response_format``: "text" (no constraint), "json_object" (any JSON object) or "json_schema"."""

    type: str = "text"
    schema: dict[str, Any] | None = None  # json_schema's schema


@dataclass
class SamplingFields:
    """The fields chat and completions share: how many tokens, how they are picked, when to stop."""

    max_tokens: int | None = None  # None: the rest of the context
    temperature: float | None = None  # None: the server's default (the checkpoint's generation_config)
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None  # int64; mapped to 0..2**64-1 for torch.Generator
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop ids besides eos
    min_tokens: int = 0
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    ignore_eos: bool = False
    response_format: ResponseFormat = field(default_factory=ResponseFormat)


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]  # the processor's form: content lists with {"type": "image"} placeholders
    images: list[ImageRef]  # in placeholder order
    sampling: SamplingFields = field(default_factory=SamplingFields)
    model: str | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    thinking_mode: str | None = None  # None: the server's default
    max_thinking_tokens: int | None = None  # None: the server's default
    include_reasoning: bool = True  # False: reasoning_content is left out (the thinking still happens)


# ---------------------------------------------------------------------------------------------
# typed field readers


def read_int(body: Mapping, key: str, minimum: int | None = None, maximum: int | None = None,
             prefix: str = "") -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not is_int(v):
        raise invalid(prefix + key, f"expected an integer, got {type(v).__name__} {v!r}.")
    if minimum is not None and v < minimum:
        raise invalid(prefix + key, f"must be at least {minimum}, got {v}.")
    if maximum is not None and v > maximum:
        raise invalid(prefix + key, f"must be at most {maximum}, got {v}.")
    return int(v)


def read_number(body: Mapping, key: str, low: float, high: float, low_open: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise invalid(key, f"expected a finite number, got {v!r}.")
    if v < low or v > high or (low_open and v == low):
        span = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise invalid(key, f"must be in {span}, got {v}.")
    return float(v)


def read_bool(body: Mapping, key: str, prefix: str = "") -> bool | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise invalid(prefix + key, f"expected true or false, got {v!r}.")
    return v


def read_object(body: Mapping, key: str) -> Mapping | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, Mapping):
        raise invalid(key, f"expected an object, got {type(v).__name__}.")
    return v


def _int_list(body: Mapping, key: str) -> list[int]:
    v = body.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(is_int(i) and i >= 0 for i in v):
        raise invalid(key, f"expected a list of token ids (integers >= 0), got {v!r}.")
    return [int(i) for i in v]


# ---------------------------------------------------------------------------------------------
# shared fields


def parse_sampling_fields(body: Mapping, max_n: int, min_max_tokens: int = 1) -> SamplingFields:
    """The shared fields of ``body`` (see SamplingFields); ``min_max_tokens`` 0 for completions' echo."""
    refuse_unsupported(body)
    max_tokens = read_int(body, "max_completion_tokens", minimum=min_max_tokens)
    if max_tokens is None:
        max_tokens = read_int(body, "max_tokens", minimum=min_max_tokens)
    min_tokens = read_int(body, "min_tokens", minimum=0) or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise invalid("min_tokens", f"must be at most max_tokens ({max_tokens}), got {min_tokens}.")
    top_k = read_int(body, "top_k", minimum=-1)
    stream = bool(read_bool(body, "stream"))
    options = read_object(body, "stream_options")
    if options is not None and not stream:
        raise invalid("stream_options", "only allowed when stream is true.")
    seed = read_int(body, "seed", minimum=INT64_MIN, maximum=INT64_MAX)
    return SamplingFields(
        max_tokens=max_tokens, temperature=read_number(body, "temperature", 0.0, 2.0),
        top_p=read_number(body, "top_p", 0.0, 1.0, low_open=True), top_k=None if top_k is None else max(top_k, 0),
        seed=None if seed is None else seed % 2**64, stop=_stop(body.get("stop")),
        stop_token_ids=_int_list(body, "stop_token_ids"), min_tokens=min_tokens,
        n=read_int(body, "n", minimum=1, maximum=max_n) or 1, stream=stream,
        include_usage=bool(read_bool(options, "include_usage", "stream_options.") if options else False),
        return_token_ids=bool(read_bool(body, "return_token_ids")), ignore_eos=bool(read_bool(body, "ignore_eos")),
        response_format=_response_format(body.get("response_format")),
    )


_REFUSED = {  # key: (the value that means "off", why)
    "tools": (None, "tool calling is not supported by this server."),
    "functions": (None, "tool calling is not supported by this server."),
    "function_call": (None, "tool calling is not supported by this server."),
    "presence_penalty": (0, "penalties are not supported by this server; leave it at 0."),
    "frequency_penalty": (0, "penalties are not supported by this server; leave it at 0."),
    "repetition_penalty": (1, "penalties are not supported by this server; leave it at 1."),
    "logit_bias": (None, "logit_bias is not supported by this server."),
    "best_of": (1, "best_of is not supported by this server; use n."),
    "use_beam_search": (False, "beam search is not supported by this server."),
    "prompt_logprobs": (None, "prompt logprobs are supported on /v1/completions with echo and logprobs only."),
    "guided_json": (None, "use response_format (json_object or json_schema) instead."),
    "guided_regex": (None, "regular-expression constraints are not supported by this server."),
    "guided_choice": (None, "choice constraints are not supported by this server."),
    "guided_grammar": (None, "grammar constraints are not supported by this server."),
    "structured_outputs": (None, "use response_format (json_object or json_schema) instead."),
    "suffix": (None, "suffix (insertion) is not supported by this server."),
    "min_p": (0, "min_p is not supported by this server; leave it at 0."),
    "bad_words": (None, "bad_words is not supported by this server."),
    "allowed_token_ids": (None, "allowed_token_ids is not supported by this server."),
}


def refuse_unsupported(body: Mapping) -> None:
    """400 for a field that would change the output but is not implemented (set to other than its "off")."""
    for key, (off, why) in _REFUSED.items():
        v = body.get(key)
        if v is None or v == off or (off is None and v in ([], {})):
            continue
        raise invalid(key, why)
    if body.get("tool_choice") not in (None, "none"):
        raise invalid("tool_choice", "tool calling is not supported by this server.")


def _stop(v: Any) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", f"expected a string or a list of strings, got {v!r}.")
    if len(stops) > 16 or any(not s for s in stops):
        raise invalid("stop", "give at most 16 non-empty stop strings.")
    return stops


def _response_format(v: Any) -> ResponseFormat:
    if v is None:
        return ResponseFormat()
    kinds = ("text", "json_object", "json_schema")
    if not isinstance(v, Mapping) or v.get("type") not in kinds:
        raise invalid("response_format", f"expected {{\"type\": one of {', '.join(kinds)}}}, got {v!r}.")
    if v["type"] != "json_schema":
        return ResponseFormat(v["type"])
    spec = v.get("json_schema")
    if not isinstance(spec, Mapping):
        raise invalid("response_format.json_schema", "expected an object with name and schema.")
    schema = spec.get("schema", {})
    if not isinstance(schema, Mapping):
        raise invalid("response_format.json_schema.schema", f"expected a JSON schema object, got {schema!r}.")
    return ResponseFormat("json_schema", dict(schema))


# ---------------------------------------------------------------------------------------------
# chat


def parse_chat_request(body: Any, max_n: int = 8) -> ChatRequest:
    """Validate a decoded JSON body (see the module docstring); raises APIError(400, ...) naming the field."""
    if not isinstance(body, Mapping):
        raise invalid("", f"the request body must be a JSON object, got {type(body).__name__}.")
    for key, off in (("echo", False), ("continue_final_message", False), ("add_generation_prompt", True)):
        if body.get(key) not in (None, off):
            raise invalid(key, f"only {str(off).lower()} is supported by this server.")
    sampling = parse_sampling_fields(body, max_n)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", f"expected a string, got {type(model).__name__}.")
    messages, images = _parse_messages(body.get("messages"))
    logprobs = bool(read_bool(body, "logprobs"))
    top_logprobs = read_int(body, "top_logprobs", minimum=0, maximum=MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise invalid("top_logprobs", "needs logprobs set to true.")
    budget = read_int(body, "thinking_token_budget", minimum=0)
    alias = read_int(body, "max_thinking_tokens", minimum=0)
    if budget is not None and alias is not None and budget != alias:
        raise invalid("thinking_token_budget", f"and max_thinking_tokens disagree ({budget} vs {alias}); give one.")
    include_reasoning = read_bool(body, "include_reasoning")
    return ChatRequest(
        messages=messages, images=images, sampling=sampling, model=model, logprobs=logprobs,
        top_logprobs=top_logprobs or 0, thinking_mode=_thinking_mode(read_object(body, "chat_template_kwargs")),
        max_thinking_tokens=budget if budget is not None else alias,
        include_reasoning=True if include_reasoning is None else include_reasoning,
    )


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
            parts = [_parse_part(part, f"{where}.content[{j}]", role, images) for j, part in enumerate(content)]
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
        if not isinstance(ref, Mapping):
            raise invalid(f"{where}.image_url", f"expected an object {{\"url\": ...}}, got {type(ref).__name__}.")
        url = ref.get("url")
        if not isinstance(url, str) or not url:
            raise invalid(f"{where}.image_url.url",
                          "expected a non-empty string: a data:image/...;base64,... URI or an http(s) URL.")
        images.append(ImageRef(f"{where}.image_url", url))
        return {"type": "image"}
    raise invalid(f"{where}.type", f"unsupported content part type {kind!r}; use 'text' or 'image_url'.")
