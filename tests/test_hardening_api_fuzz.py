"""API fuzzing (issue 21 item 7): schemathesis drives the server's OpenAPI description against a loopback
`r4b serve` app on the tiny checkpoint. Whatever it sends (valid requests and, in its negative mode,
requests that break the schema: wrong types, out-of-range numbers, missing fields, odd content types),
the server answers without a 5xx, keeps serving, and every error is OpenAI's error object.

The description (OPENAPI below) is the request surface docs/serving.md documents; the app serves none of
its own (create_app sets openapi_url=None, and its routes read the raw body, so FastAPI's generated one
would have no request bodies to fuzz). Examples are bounded (seeded, no shrinking: a run takes seconds).
"""

from __future__ import annotations

import json

import pytest

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from r4b_core.generation.generate import GenerationConfig  # noqa: E402
from r4b_core.models.r4b import R4BForConditionalGeneration  # noqa: E402
from r4b_core.processing.processor import R4BProcessor  # noqa: E402
from r4b_core.serve.api import ServerConfig, create_app  # noqa: E402
from r4b_core.serve.engine import Engine  # noqa: E402
from r4b_core.serve.server import BackgroundServer  # noqa: E402

MODEL = "r4b-tiny"
EXAMPLES = 8  # per operation and mode: bounded for the default suite (the whole suite must fit 5 minutes)

_SMALL = {"type": "integer", "minimum": 0, "maximum": 6}
_SAMPLING = {  # the fields both generation routes share (schema.parse_sampling_fields)
    "model": {"type": "string", "enum": [MODEL]},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 6},
    "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 6},
    "min_tokens": _SMALL,
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1, "maximum": 50},
    "seed": {"type": "integer"},
    "n": {"type": "integer", "minimum": 1, "maximum": 3},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "stop": {"oneOf": [{"type": "string", "minLength": 1},
                       {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}]},
    "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 4},
    "ignore_eos": {"type": "boolean"},
    "return_token_ids": {"type": "boolean"},
    "logprobs": {"type": "boolean"},
    "top_logprobs": _SMALL,
}
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
_IMAGE_PART = {"type": "object", "required": ["type", "image_url"],
               "properties": {"type": {"type": "string", "enum": ["image_url"]},
                              "image_url": {"type": "object", "required": ["url"],
                                            "properties": {"url": {"type": "string"}}}}}
_MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"type": "string", "enum": ["system", "user", "assistant"]},
    "content": {"oneOf": [{"type": "string"},
                          {"type": "array", "items": {"oneOf": [_TEXT_PART, _IMAGE_PART]}, "maxItems": 3}]}}}
_CHAT = {"type": "object", "required": ["messages"], "properties": {
    **_SAMPLING,
    "messages": {"type": "array", "items": _MESSAGE, "minItems": 1, "maxItems": 3},
    "response_format": {"type": "object", "required": ["type"],
                        "properties": {"type": {"type": "string", "enum": ["text", "json_object"]}}},
    "chat_template_kwargs": {"type": "object", "properties": {
        "thinking_mode": {"type": "string", "enum": ["auto", "long", "short"]},
        "enable_thinking": {"type": "boolean"}}},
    "thinking_token_budget": _SMALL,
    "include_reasoning": {"type": "boolean"},
}}
_COMPLETION = {"type": "object", "required": ["prompt"], "properties": {
    **{k: v for k, v in _SAMPLING.items() if k not in ("logprobs", "top_logprobs")},
    "prompt": {"oneOf": [{"type": "string", "minLength": 1},
                         {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                          "minItems": 1, "maxItems": 8}]},
    "echo": {"type": "boolean"},
    "logprobs": _SMALL,
}}
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}}}}}


def _post(body_schema: dict) -> dict:
    return {"post": {"requestBody": {"required": True,
                                     "content": {"application/json": {"schema": body_schema}}},
                     "responses": {"200": {"description": "the completion (JSON or SSE)"},
                                   "default": {"description": "an OpenAI error object",
                                               "content": {"application/json": {"schema": _ERROR}}}}}}


def _get(parameters: list | None = None) -> dict:
    op = {"responses": {"200": {"description": "ok"}, "default": {
        "description": "an OpenAI error object", "content": {"application/json": {"schema": _ERROR}}}}}
    if parameters:
        op["parameters"] = parameters
    return {"get": op}


OPENAPI = {
    "openapi": "3.1.0",
    "info": {"title": "r4b serve", "version": "1"},
    "paths": {
        "/v1/chat/completions": _post(_CHAT),
        "/v1/completions": _post(_COMPLETION),
        "/v1/models": _get(),
        "/v1/models/{model_id}": _get([{"name": "model_id", "in": "path", "required": True,
                                        "schema": {"type": "string", "minLength": 1}}]),
        "/health": _get(),
    },
}

schema = schemathesis.openapi.from_dict(OPENAPI)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                max_examples=EXAMPLES, deterministic=True, no_shrink=True)


@pytest.fixture(scope="module")
def server_url(tiny_checkpoint):
    model = R4BForConditionalGeneration.from_pretrained(tiny_checkpoint)
    processor = R4BProcessor.from_pretrained(tiny_checkpoint)
    engine = Engine(model, max_batch_size=4, max_seq_len=160, max_queue=16, eos_token_ids=processor.eos_token_ids,
                    pad_token_id=processor.pad_token_id)
    app = create_app(engine, processor, ServerConfig(
        MODEL, max_body_bytes=256 * 1024, generation_config=GenerationConfig.from_pretrained(tiny_checkpoint)))
    with BackgroundServer(app, engine) as server:
        yield server.url


def _error_object(response) -> str | None:
    """What is wrong with a 4xx/5xx body as an OpenAI error object (None: nothing)."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return f"not JSON: {response.content[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return f"no 'error' object: {body!r:.200}"
    if not isinstance(error.get("message"), str) or not error["message"]:
        return f"no error.message: {error!r:.200}"
    if not isinstance(error.get("type"), str):
        return f"no error.type: {error!r:.200}"
    if not (error.get("param") is None or isinstance(error["param"], str)):
        return f"error.param is neither null nor a string: {error!r:.200}"
    return None


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_fuzzed_requests_get_no_server_error_and_errors_are_openai_objects(case, server_url):
    response = case.call(base_url=server_url, timeout=30)
    where = f"{case.method} {case.formatted_path} body={case.body!r:.300} -> {response.status_code}"
    assert response.status_code < 500, f"server error: {where}: {response.content[:300]!r}"
    if response.status_code >= 400:
        problem = _error_object(response)
        assert problem is None, f"{where}: {problem}"
    elif case.path != "/health":
        assert response.status_code == 200, where


def test_the_server_still_serves_after_the_fuzzing(server_url):
    """Runs after the fuzzed cases above (same module-scoped server): whatever it was sent, it still
    answers a plain request (checked once here rather than after every case, which doubled the run)."""
    import httpx

    assert httpx.get(f"{server_url}/health", timeout=10).json()["status"] == "ok"
    chat = httpx.post(f"{server_url}/v1/chat/completions", timeout=30,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] <= 2
