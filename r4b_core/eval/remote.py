"""The OpenAI-compatible backend: the same prompts sent to a server (``r4b serve``, vLLM, SGLang).

Each job is one ``POST {base_url}/chat/completions`` (``base_url`` as the openai client takes it, ending in
``/v1``): images as ``data:`` URIs, ``temperature`` (0 = greedy, the default), ``max_tokens``, and the
thinking mode as ``chat_template_kwargs: {"thinking_mode": mode}`` (R-4B's template switch). The thinking
is read from the reply's ``reasoning_content`` (or ``reasoning``), the answer from ``content``; a server without a
reasoning parser returns the tags inside ``content``, which are then split as the local backend does.
Thinking tokens: the usage's ``completion_tokens_details.reasoning_tokens`` when the server reports it,
else the thinking text re-encoded with ``tokenizer`` (when given), else unknown.

At most ``concurrency`` requests are in flight (threads); a connection error, 429 or 5xx is retried
``retries`` times with exponential back-off; any other HTTP error stops the run with the server's message.
Uses only the standard library (urllib), so no client package is needed.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from r4b_core.eval.benchmark import EvalItem, image_bytes
from r4b_core.eval.generation import Generation
from r4b_core.eval.prompts import user_message
from r4b_core.scoring import split_answer

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


def _mime(data: bytes) -> str:
    for magic, mime in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
                        (b"RIFF", "image/webp"), (b"BM", "image/bmp")):
        if data.startswith(magic):
            return mime
    return "image/png"


def _data_uri(data: bytes) -> str:
    return f"data:{_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


class RemoteBackend:
    """Generate through an OpenAI-compatible chat completions endpoint; see the module docstring."""

    def __init__(self, base_url: str, *, max_new_tokens: int, model: str | None = None, api_key: str | None = None,
                 concurrency: int = 8, retries: int = 3, timeout_s: float = 600.0,
                 count_tokens: Callable[[str], int] | None = None, temperature: float = 0.0,
                 seed: int | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_new_tokens, self.api_key = max_new_tokens, api_key
        self.concurrency, self.retries, self.timeout_s = concurrency, retries, timeout_s
        self.count_tokens = count_tokens
        self.temperature, self.seed = temperature, seed
        self.model = model or self._first_model()
        self.name = f"{self.base_url} ({self.model})"

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        url = f"{self.base_url}{path}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:500]
                if e.code not in _RETRY_STATUS or attempt == self.retries:
                    raise ValueError(f"--base-url {self.base_url}: {method} {path} answered HTTP {e.code}: "
                                     f"{detail}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                if attempt == self.retries:
                    raise ValueError(f"--base-url {self.base_url}: cannot reach the server ({e}); is it running?"
                                     ) from None
            time.sleep(min(0.5 * 2 ** attempt, 8.0))
        raise AssertionError("unreachable")  # pragma: no cover

    def _first_model(self) -> str:
        models = self._call("GET", "/models").get("data") or []
        if not models or "id" not in models[0]:
            raise ValueError(f"--base-url {self.base_url}: GET /models lists no model; pass --served-model NAME.")
        return str(models[0]["id"])

    def _one(self, item: EvalItem, mode: str) -> Generation:
        parts = [{"type": "image_url", "image_url": {"url": _data_uri(image_bytes(i))}} for i in item.images]
        body = {"model": self.model, "messages": [user_message(item, parts)], "temperature": self.temperature,
                "max_tokens": self.max_new_tokens, "chat_template_kwargs": {"thinking_mode": mode}}
        if self.seed is not None:
            body["seed"] = self.seed
        started = time.perf_counter()
        reply = self._call("POST", "/chat/completions", body)
        seconds = time.perf_counter() - started
        try:
            choice = reply["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"--base-url {self.base_url}: the reply for item {item.id} has no choices[0].message: "
                             f"{str(reply)[:300]}") from None
        content = message.get("content") or ""
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if reasoning is None:
            split = split_answer(content, thinking_mode=mode)
            thinking, answer, thought = split
        else:
            thinking = "" if mode == "short" else reasoning.strip()
            answer, thought = split_answer(content, thinking_mode="short").answer, bool(thinking)
        usage = reply.get("usage") or {}
        details = usage.get("completion_tokens_details") or {}
        thinking_tokens = details.get("reasoning_tokens")
        if not thought:
            thinking_tokens = 0
        elif thinking_tokens is None and self.count_tokens is not None:
            thinking_tokens = self.count_tokens(thinking)
        return Generation(thinking, answer, thought, int(usage.get("completion_tokens") or 0), thinking_tokens,
                          seconds, str(choice.get("finish_reason") or "stop"))

    def generate(self, jobs: Iterable[tuple[EvalItem, str]]) -> Iterator[tuple[EvalItem, str, Generation]]:
        """Yield each job's generation as it finishes, ``concurrency`` at a time."""
        pending = iter(jobs)
        executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="r4b-eval-http")
        running: dict[Future, tuple[EvalItem, str]] = {}
        try:
            while True:
                while len(running) < self.concurrency:
                    job = next(pending, None)
                    if job is None:
                        break
                    running[executor.submit(self._one, *job)] = job
                if not running:
                    return
                done, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    item, mode = running.pop(future)
                    yield item, mode, future.result()
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> "RemoteBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
