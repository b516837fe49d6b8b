"""One response's choices in flight: engine requests in, per-choice steps out, for chat and completions.

    n EngineRequests (one per choice, the same prompt) ──engine.submit──► events of all of them on one
    asyncio queue (loop.call_soon_threadsafe from the engine thread) ──run_choices──► (choice, event)
    until every choice finished ──Choice.step──► ChoiceStep: the text deltas per section
    (generation/sections.py), the token and its logprobs

A plain response drains ``run_choices`` and reads each Choice's totals; a stream turns every ChoiceStep
into chunks. Both share this one loop. A client that disconnects (checked every ``POLL_S``, busy or
not) cancels every choice and ends the loop early; a stop string ends a choice early (its engine
request is cancelled, which frees its slot at the engine's next step).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from fastapi import Request

from r4b_core.generation.sections import SectionStreamer
from r4b_core.serve.engine import Engine, EngineEvent, EngineRequest, EngineStoppedError, QueueFullError
from r4b_core.serve.schema import APIError, invalid
from r4b_core.serve.token_picker import TopLogprobs

POLL_S = 0.1  # how often a waiting handler checks whether its client is still there
log = logging.getLogger("r4b.serve")


@dataclass
class ChoiceStep:
    pieces: list[tuple[str, str]]  # (section, text delta)
    token: int | None = None
    logprob: float | None = None
    top_logprobs: TopLogprobs | None = None
    finished: bool = False


@dataclass
class Choice:
    index: int
    request: EngineRequest
    sections: SectionStreamer
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs | None] | None = None
    finish_reason: str | None = None

    def step(self, event: EngineEvent) -> ChoiceStep:
        """Fold one engine event in; raises APIError when the generation failed."""
        if event.kind == "finish":
            error = _finish_error(event)
            if error is not None:
                raise error
            self.finish_reason = event.finish_reason
            return ChoiceStep(self.sections.finish(), finished=True)
        self.tokens.append(event.token)
        if event.logprob is not None:
            self.logprobs.append(event.logprob)
            self.top_logprobs.append(event.top_logprobs or [])
        if event.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_top_logprobs = event.prompt_logprobs, event.prompt_top_logprobs
        pieces = self.sections.push(event.token)
        step = ChoiceStep(pieces, event.token, event.logprob, event.top_logprobs)
        if self.sections.stopped:  # a stop string: this choice is done, whatever the engine does next
            self.request.cancel()
            self.finish_reason, step.finished = "stop", True
        return step


def _finish_error(event: EngineEvent) -> APIError | None:
    if event.finish_reason == "error":
        return APIError(500, f"generation failed: {event.error}", type="server_error")
    if event.finish_reason == "cancelled":
        return APIError(503, event.error or "the request was cancelled.", type="server_error", code="cancelled")
    return None


class ChoiceRun:
    """The choices of one response and the queue their engine events arrive on."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, EngineEvent]] = asyncio.Queue()
        self.choices: list[Choice] = []
        self.client_gone = False
        self.engine: Engine | None = None  # set by submit: a cancellation during its shutdown is the shutdown's

    def listener(self, index: int):
        """The ``on_event`` of choice ``index``'s engine request (runs on the engine thread)."""
        def on_event(event: EngineEvent) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, event))
        return on_event

    def submit(self, engine: Engine, choices: Sequence[Choice]) -> None:
        """Queue every choice's request; a refusal cancels the ones already queued."""
        self.choices, self.engine = list(choices), engine
        try:
            for choice in self.choices:
                engine.submit(choice.request)
        except (QueueFullError, EngineStoppedError, ValueError) as e:
            self.cancel()
            raise _refusal(e) from None
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        for choice in self.choices:
            choice.request.cancel()  # no-op when it finished; frees the slot when we stopped early

    def _client_went_away(self, request: Request, task_cancelled: bool = False) -> None:
        """Cancel every choice, saying so in one log line (once): a hung-up client is no server error.
        ``task_cancelled``: the handler's task was cancelled; while the server shuts down, that is uvicorn's
        graceful timeout (--shutdown-timeout + 2 s) passing before the engine's own cancellation arrived."""
        if not self.client_gone and not self.finished:
            self.client_gone = True
            tokens = sum(len(c.tokens) for c in self.choices)
            if task_cancelled and self.engine is not None and not self.engine.accepting:
                log.warning("r4b serve: shutting down: the --shutdown-timeout deadline passed during a request (%s %s) "
                            "after %d generated token(s); cancelled", request.method, request.url.path, tokens)
            else:
                log.warning("r4b serve: a client went away during its request (%s %s) after %d generated token(s); "
                            "cancelled", request.method, request.url.path, tokens)
        self.cancel()

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    async def run_to_end(self, request: Request) -> bool:
        """Every choice's steps consumed (a response that is not streamed); False when the client went
        away first. Whatever is still queued is cancelled either way."""
        try:
            async for _ in self.steps(request):
                pass
        finally:
            self.cancel()
        return self.finished

    async def steps(self, request: Request) -> AsyncIterator[tuple[Choice, ChoiceStep]]:
        """Every choice's steps until all finished, or until the client went away (then ``finished`` is
        False). Events of a choice that already finished (a stop string) are dropped."""
        checked = time.monotonic()
        try:
            while not self.finished:
                try:
                    item = await asyncio.wait_for(self.events.get(), timeout=POLL_S)
                except asyncio.TimeoutError:
                    item = None
                if item is None or time.monotonic() - checked > POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        self._client_went_away(request)
                        return
                if item is None:
                    continue
                choice = self.choices[item[0]]
                if choice.finish_reason is None:
                    yield choice, choice.step(item[1])
        except (asyncio.CancelledError, GeneratorExit):  # a stream whose connection closed, or the shutdown
            self._client_went_away(request, task_cancelled=True)
            raise


def _refusal(e: Exception) -> APIError:
    """The engine's refusal of a request as the API's error."""
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), type="rate_limit_error", code="queue_full")
    if isinstance(e, EngineStoppedError):
        return APIError(503, str(e), type="server_error", code="shutting_down")
    return invalid("max_tokens", str(e), code="context_length_exceeded")
