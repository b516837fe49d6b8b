"""The OpenAI-compatible HTTP API (FastAPI) in front of the continuous-batching engine.

    POST /v1/chat/completions   body (<= max_body_bytes, else 413) ──schema.parse_chat_request──► images
                                (images.load_request_image) + processor (chat template, thinking mode)
                                in a worker thread ──► EngineRequest ──engine.submit (429 when the queue
                                is full, 503 when shutting down)──► engine events ──output.ChatOutput──►
                                one chat.completion, or SSE chunks ending with ``data: [DONE]``
    GET  /v1/models             the one served model
    GET  /health                200 with the engine's slot / queue counters; 503 once shutdown began

Every error is OpenAI's error object with the right status, and the server keeps serving. With an
API key, /v1/* needs ``Authorization: Bearer KEY`` (401 otherwise). A client that disconnects
(checked while waiting for tokens, and by every write of a stream) cancels its request, which frees
its slot at the engine's next step. Engine events cross from the engine thread into the event loop
through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from r4b_core.generation_config import GenerationConfig
from r4b_core.processing.processor import THINK_END, THINK_START
from r4b_core.serve import schema
from r4b_core.serve.engine import Engine, EngineEvent, EngineRequest, EngineStoppedError, QueueFullError
from r4b_core.serve.images import ImagePolicy, load_request_image
from r4b_core.serve.output import CONTENT, ChatOutput
from r4b_core.serve.schema import APIError, ChatRequest, invalid
from r4b_core.generation.thinking_budget import prompt_opens_thinking, thinking_budget_for

log = logging.getLogger("r4b.serve")

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
_POLL_S = 0.1  # how often a waiting handler checks whether its client is still there


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    thinking_mode: str = "auto"  # default when a request does not set chat_template_kwargs.thinking_mode
    max_thinking_tokens: int | None = None  # default when a request does not set max_thinking_tokens
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    images: ImagePolicy = field(default_factory=ImagePolicy)
    generation_config: GenerationConfig | None = None  # sampling defaults; None: the processor's (the checkpoint's)
    shutdown_deadline_s: float = 30.0


@dataclass
class _Prepared:
    request: EngineRequest
    output: ChatOutput


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
    tokenizer = processor.tokenizer
    think_ids = (tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(exc.status_code, str(exc.detail), type="invalid_request_error",
                         code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        error = APIError(500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    def check_auth(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'.", code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise APIError(401, "invalid API key.", code="invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = engine.stats()
        ok = stats["accepting"]
        return JSONResponse({"status": "ok" if ok else "shutting_down", **stats}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_auth(request)
        return {"object": "list", "data": [schema.model_card(config.model_name, engine.max_seq_len)]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        body = await _read_body(request, config.max_body_bytes)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise invalid("", f"the request body is not valid JSON ({e}).") from None
        chat = schema.parse_chat_request(payload)
        if chat.model is not None and chat.model != config.model_name:
            raise APIError(404, f"the model {chat.model!r} does not exist; this server serves "
                                f"{config.model_name!r}.", param="model", code="model_not_found")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[EngineEvent] = asyncio.Queue()

        def on_event(event: EngineEvent) -> None:  # runs on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        prepared = await run_in_threadpool(_prepare, chat, on_event)
        try:
            engine.submit(prepared.request)
        except QueueFullError as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        except ValueError as e:
            raise invalid("max_tokens", str(e), code="context_length_exceeded") from None
        ids = dict(cid=schema.completion_id(), created=int(time.time()), model=config.model_name)
        if chat.stream:
            return StreamingResponse(_stream(request, chat, prepared, events, ids), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(request, chat, prepared, events, ids)

    # ------------------------------------------------------------------------------------------

    def _prepare(chat: ChatRequest, on_event) -> _Prepared:
        """Images, chat template and tokens (a worker thread: this is CPU work)."""
        images = [load_request_image(ref, config.images) for ref in chat.images]
        thinking_mode = chat.thinking_mode or config.thinking_mode
        try:
            inputs = processor(messages=chat.messages, images=images or None, thinking_mode=thinking_mode)
        except ValueError as e:
            param = chat.images[0].param if images and "image" in str(e).lower() else "messages"
            raise invalid(param, str(e)) from None
        input_ids = inputs.pop("input_ids")
        inputs.pop("attention_mask", None)
        prompt_tokens = input_ids.shape[1]
        room = engine.max_new_tokens_for(prompt_tokens)
        if room < 1:
            raise invalid("messages", f"the prompt has {prompt_tokens} tokens, which leaves no room to generate in "
                                      f"the server's context of {engine.max_seq_len} tokens (--max-seq-len).",
                          code="context_length_exceeded")
        max_tokens = chat.max_tokens if chat.max_tokens is not None else room
        if max_tokens > room:
            raise invalid("max_tokens", f"the prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) does not fit "
                                        f"the server's context of {engine.max_seq_len} tokens (--max-seq-len); at "
                                        f"most {room} new tokens fit after this prompt.",
                          code="context_length_exceeded")
        try:
            sampling = (config.generation_config or processor.generation_config).sampling(
                chat.seed, temperature=chat.temperature, top_k=chat.top_k, top_p=chat.top_p)
        except ValueError as e:
            raise invalid("temperature", str(e)) from None
        prompt = input_ids[0].tolist()
        budget_tokens = chat.max_thinking_tokens if chat.max_thinking_tokens is not None else config.max_thinking_tokens
        try:
            budget = thinking_budget_for(processor, prompt, budget_tokens)
        except ValueError as e:
            raise invalid("max_thinking_tokens", str(e)) from None
        in_thinking = None not in think_ids and prompt_opens_thinking(prompt, *think_ids)
        request = EngineRequest(input_ids=input_ids, max_new_tokens=max_tokens, on_event=on_event, sampling=sampling,
                                model_inputs=inputs, thinking_budget=budget,
                                stop_token_ids=[] if chat.ignore_eos else None)
        output = ChatOutput(processor.decode, *think_ids, in_thinking=in_thinking, stop=chat.stop)
        return _Prepared(request, output)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(413, f"the request body is larger than {limit} bytes (the server's --max-body-bytes).",
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
    return b"".join(chunks)


async def _engine_events(request: Request, prepared: _Prepared,
                         events: asyncio.Queue[EngineEvent]) -> AsyncIterator[EngineEvent]:
    """The request's events until it finishes; a disconnected client (checked every ``_POLL_S``, busy or
    not) cancels it and ends the iteration."""
    checked = time.monotonic()
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=_POLL_S)
        except asyncio.TimeoutError:
            event = None
        if event is None or time.monotonic() - checked > _POLL_S:
            checked = time.monotonic()
            if await request.is_disconnected():
                prepared.request.cancel()
                return
        if event is None:
            continue
        yield event
        if event.kind == "finish":
            return


def _finish_error(event: EngineEvent) -> APIError | None:
    if event.finish_reason == "error":
        return APIError(500, f"generation failed: {event.error}", type="server_error")
    if event.finish_reason == "cancelled":
        return APIError(503, event.error or "the request was cancelled.", type="server_error", code="cancelled")
    return None


async def _complete(request: Request, chat: ChatRequest, prepared: _Prepared, events: asyncio.Queue,
                    ids: dict) -> JSONResponse:
    engine_request, output = prepared.request, prepared.output
    finish_reason, tokens = None, []
    try:
        async for event in _engine_events(request, prepared, events):
            if event.kind == "token":
                tokens.append(event.token)
                output.push(event.token)
                if output.stopped:
                    finish_reason = "stop"
                    break
            else:
                error = _finish_error(event)
                if error is not None:
                    raise error
                finish_reason = event.finish_reason
    finally:
        engine_request.cancel()  # no-op when it finished; frees the slot when we stopped early
    if finish_reason is None:  # the client went away
        return JSONResponse({}, status_code=499)
    output.finish()
    body = schema.completion(ids["cid"], ids["created"], ids["model"], output.content_text(), output.reasoning_text(),
                             finish_reason, engine_request.prompt_tokens, len(tokens),
                             tokens if chat.return_token_ids else None)
    return JSONResponse(body)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(request: Request, chat: ChatRequest, prepared: _Prepared, events: asyncio.Queue,
                  ids: dict) -> AsyncIterator[str]:
    engine_request, output = prepared.request, prepared.output
    cid, created, model = ids["cid"], ids["created"], ids["model"]
    tokens: list[int] = []

    def delta_chunks(pairs: list[tuple[str, str]]) -> list[str]:
        keys = {CONTENT: "content"}
        return [_sse(schema.chunk(cid, created, model, {keys.get(section, "reasoning_content"): text}))
                for section, text in pairs]

    try:
        yield _sse(schema.chunk(cid, created, model, {"role": "assistant", "content": ""}))
        finish_reason = None
        async for event in _engine_events(request, prepared, events):
            if event.kind == "token":
                tokens.append(event.token)
                for piece in delta_chunks(output.push(event.token)):
                    yield piece
                if output.stopped:
                    finish_reason = "stop"
                    break
            else:
                error = _finish_error(event)
                if error is not None:
                    yield _sse(error.body())
                    yield "data: [DONE]\n\n"
                    return
                finish_reason = event.finish_reason
        if finish_reason is None:  # the client went away
            return
        engine_request.cancel()
        for piece in delta_chunks(output.finish()):
            yield piece
        yield _sse(schema.chunk(cid, created, model, {}, finish_reason,
                                token_ids=tokens if chat.return_token_ids else None))
        if chat.include_usage:
            yield _sse(schema.usage_chunk(cid, created, model, engine_request.prompt_tokens, len(tokens)))
        yield "data: [DONE]\n\n"
    finally:
        engine_request.cancel()  # a closed connection ends the generator here: free the slot
