"""The OpenAI-compatible HTTP API (FastAPI) in front of the continuous-batching engine.

    POST /v1/chat/completions   JSON body (Content-Type application/json, else 415; <= max_body_bytes,
                                else 413) ──schema.parse_chat_request──► chat_api.ChatHandler: choices
                                ──engine.submit (429 when the queue is full, 503 when shutting down)──►
                                one chat.completion, or SSE chunks ending with ``data: [DONE]``
    POST /v1/completions        the same for a text or token-id prompt (completions.py): echo, prompt
                                logprobs, max_tokens 0 with echo
    GET  /v1/models             the one served model;  GET /v1/models/{id}: it, or 404 naming the id
    GET  /health                200 with the engine's slot / queue counters; 503 once shutdown began

Every error is OpenAI's error object with the right status, and the server keeps serving. With an
API key, /v1/* needs ``Authorization: Bearer KEY`` (401 otherwise). A client that disconnects
(checked while waiting for tokens, and by every write of a stream) cancels its request, which frees
its slot at the engine's next step (choices.py).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from r4b_core.serve import responses, schema
from r4b_core.serve.chat_api import ChatHandler, response_ids
from r4b_core.serve.choices import ChoiceRun
from r4b_core.serve.completions import CompletionHandler, parse_completion_request
from r4b_core.serve.engine import Engine
from r4b_core.serve.requests import DEFAULT_MAX_BODY_BYTES, ServerConfig
from r4b_core.serve.schema import APIError, invalid

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServerConfig", "create_app"]

log = logging.getLogger("r4b.serve")
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(engine: Engine, processor, config: ServerConfig, manage_engine: bool = True) -> FastAPI:
    """The FastAPI app. ``manage_engine``: start the engine with the app and stop it (within
    ``config.shutdown_deadline_s``) when the app shuts down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            engine.start()
        yield
        if manage_engine:
            await run_in_threadpool(engine.stop, config.shutdown_deadline_s)

    app = FastAPI(title="r4b", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    _add_info_routes(app, engine, config)
    _add_generation_routes(app, engine, processor, config)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(exc.status_code, str(exc.detail), type="invalid_request_error",
                         code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # the client hung up while sending its body: nothing ran, nobody to answer; one line, no traceback
        log.warning("r4b serve: a client disconnected before its request body was complete (%s %s); nothing ran",
                    request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        error = APIError(500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(error.body(), status_code=500)


def _check_auth(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if not header:
        raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'.", code="invalid_api_key")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
        raise APIError(401, "invalid API key.", code="invalid_api_key")


def _unknown_model(name: str, served: str, param: str | None = "model") -> APIError:
    return APIError(404, f"The model {name!r} does not exist; this server serves {served!r}.", param=param,
                    type="NotFoundError", code="model_not_found")


def _add_info_routes(app: FastAPI, engine: Engine, config: ServerConfig) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        stats = engine.stats()
        ok = stats["accepting"]
        return JSONResponse({"status": "ok" if ok else "shutting_down", **stats}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _check_auth(request, config.api_key)
        return {"object": "list", "data": [responses.model_card(config.model_name, engine.max_seq_len)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict[str, Any]:
        _check_auth(request, config.api_key)
        if model_id != config.model_name:
            raise _unknown_model(model_id, config.model_name, param=None)
        return responses.model_card(config.model_name, engine.max_seq_len)


async def read_json_body(request: Request, limit: int) -> Any:
    """The decoded JSON body: 415 unless Content-Type is application/json, 413 past ``limit`` bytes, 400
    when it is not JSON."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {media_type or 'none'!r}.",
                       code="unsupported_media_type")
    too_large = APIError(413, f"the request body is larger than {limit} bytes (the server's --max-body-mb).",
                         code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_large
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid("", f"the request body is not valid JSON ({e}).") from None


def _add_generation_routes(app: FastAPI, engine: Engine, processor, config: ServerConfig) -> None:
    chat_handler = ChatHandler(engine, processor, config)
    completion_handler = CompletionHandler(engine, processor, config)

    async def serve(request: Request, parse: Callable[[Any], Any], handler, prefix: str):
        _check_auth(request, config.api_key)
        parsed = parse(await read_json_body(request, config.max_body_bytes))
        if parsed.model is not None and parsed.model != config.model_name:
            raise _unknown_model(parsed.model, config.model_name)
        run = ChoiceRun()
        choices = await run_in_threadpool(handler.prepare, parsed, run)
        run.submit(engine, choices)
        ids = response_ids(config.model_name, prefix)
        if parsed.sampling.stream:
            return StreamingResponse(handler.stream(request, parsed, run, ids), media_type="text/event-stream",
                                     headers=_STREAM_HEADERS)
        if not await run.run_to_end(request):  # the client went away
            return JSONResponse({}, status_code=499)
        return handler.respond(parsed, run, ids)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, lambda body: schema.parse_chat_request(body, config.max_n), chat_handler,
                           "chatcmpl")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, lambda body: parse_completion_request(body, config.max_n), completion_handler,
                           "cmpl")
