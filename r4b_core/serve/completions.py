"""POST /v1/completions: raw prompts (text or token ids) -> text_completion, plain or streamed.

    prompt: "text" | ["text", ...] | [id, ...] | [[id, ...], ...]   (each prompt gets n choices,
    numbered prompt * n + j)  ──encode (no chat template, no images)──► choices ──► text_completion

``echo``: the prompt's text comes first in each choice's text; with ``logprobs`` k as well, the prompt
tokens' logprobs come first in its logprobs (the first token has none: null), which is what lm-eval's
``local-completions`` loglikelihood requests read. ``max_tokens`` 0 is allowed with echo: the prompt is
scored and nothing is generated (the engine still computes one token, which is dropped). The text is
plain: ``<think>`` is text here, there are no reasoning fields. Default max_tokens: 16 (OpenAI's).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from r4b_core.generation.sections import ANSWER, SectionStreamer
from r4b_core.json_io import is_int
from r4b_core.serve import responses
from r4b_core.serve.choices import Choice, ChoiceRun
from r4b_core.serve.engine import Engine
from r4b_core.serve.requests import ServerConfig, build_choices, check_token_ids, token_room, vocab_size
from r4b_core.serve.responses import DONE, sse
from r4b_core.serve.schema import MAX_TOP_LOGPROBS, SamplingFields, invalid, parse_sampling_fields, read_bool, read_int

DEFAULT_MAX_TOKENS = 16
MAX_PROMPTS = 32


@dataclass
class CompletionRequest:
    prompts: list[str | list[int]]
    sampling: SamplingFields = field(default_factory=SamplingFields)
    model: str | None = None
    echo: bool = False
    logprobs: int | None = None  # top-k per token; None: no logprobs


def parse_completion_request(body: Any, max_n: int = 8) -> CompletionRequest:
    if not isinstance(body, Mapping):
        raise invalid("", f"the request body must be a JSON object, got {type(body).__name__}.")
    sampling = parse_sampling_fields(body, max_n, min_max_tokens=0)
    if sampling.response_format.type != "text":
        raise invalid("response_format", "structured output is served on /v1/chat/completions only.")
    echo = bool(read_bool(body, "echo"))
    if sampling.max_tokens == 0 and not echo:
        raise invalid("max_tokens", "must be at least 1 (0 is allowed only with echo, to score the prompt).")
    if sampling.max_tokens is None:
        sampling.max_tokens = DEFAULT_MAX_TOKENS
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", f"expected a string, got {type(model).__name__}.")
    return CompletionRequest(prompts=_prompts(body.get("prompt")), sampling=sampling, model=model, echo=echo,
                             logprobs=read_int(body, "logprobs", minimum=0, maximum=MAX_TOP_LOGPROBS))


def _prompts(v: Any) -> list[str | list[int]]:
    what = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(v, str):
        prompts = [v]
    elif isinstance(v, list) and v and all(is_int(i) for i in v):
        prompts = [[int(i) for i in v]]
    elif isinstance(v, list) and v and all(isinstance(p, str) for p in v):
        prompts = list(v)
    elif isinstance(v, list) and v and all(isinstance(p, list) and p and all(is_int(i) for i in p) for p in v):
        prompts = [[int(i) for i in p] for p in v]
    else:
        raise invalid("prompt", f"required: {what}, non-empty; got {str(v)[:80]!r}.")
    if len(prompts) > MAX_PROMPTS:
        raise invalid("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}.")
    if any(p == "" for p in prompts):
        raise invalid("prompt", "an empty prompt has nothing to continue; give at least one token.")
    return prompts


class CompletionHandler:
    """The completions route's work for one app: ``prepare`` (a worker thread) then ``respond`` / ``stream``."""

    def __init__(self, engine: Engine, processor, config: ServerConfig) -> None:
        self.engine, self.processor, self.config = engine, processor, config
        self.texts = responses.TokenTexts(processor.decode, processor.tokenizer.id_to_token)

    def prepare(self, req: CompletionRequest, run: ChoiceRun) -> list[Choice]:
        import torch

        choices: list[Choice] = []
        for p, prompt in enumerate(req.prompts):
            param = "prompt" if len(req.prompts) == 1 else f"prompt[{p}]"
            ids = self.processor.encode(prompt) if isinstance(prompt, str) else prompt
            if not ids:
                raise invalid(param, "encodes to no tokens; give a longer prompt.")
            check_token_ids(ids, vocab_size(self.engine), param)
            max_tokens = token_room(self.engine, len(ids), max(req.sampling.max_tokens, 1), param)
            choices += build_choices(
                run, self.engine, self.processor, self.config, req.sampling,
                input_ids=torch.tensor([ids], dtype=torch.int64), model_inputs={}, max_new_tokens=max_tokens,
                sections=lambda: SectionStreamer(self.processor.decode, None, None, stop=req.sampling.stop),
                logprobs=req.logprobs, prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
                first_index=p * req.sampling.n)
        return choices

    # ------------------------------------------------------------------------------------------

    def _generated(self, req: CompletionRequest, choice: Choice) -> tuple[list[int], str]:
        """The choice's kept tokens and text (none with max_tokens 0)."""
        if req.sampling.max_tokens == 0:
            return [], ""
        return choice.tokens, choice.sections.text(ANSWER)

    def _prompt_part(self, req: CompletionRequest, choice: Choice) -> tuple[str, dict | None]:
        """The echoed prompt's text and logprobs."""
        ids = choice.request.input_ids[0].tolist()
        prompt = req.prompts[choice.index // req.sampling.n]
        text = prompt if isinstance(prompt, str) else self.processor.decode(ids)
        logprobs = None
        if req.logprobs is not None:
            logprobs = responses.completion_logprobs(self.texts, ids, choice.prompt_logprobs or [None] * len(ids),
                                                     choice.prompt_top_logprobs or [None] * len(ids))
        return text, logprobs

    def _choice_logprobs(self, req: CompletionRequest, tokens, logprobs, tops, offset: int) -> dict | None:
        if req.logprobs is None:
            return None
        return responses.completion_logprobs(self.texts, tokens, logprobs[:len(tokens)], tops[:len(tokens)], offset)

    def _usage(self, req: CompletionRequest, choices: list[Choice]) -> dict[str, Any]:
        prompts = sum(c.request.prompt_tokens for c in choices[::req.sampling.n])
        return responses.usage(prompts, sum(len(self._generated(req, c)[0]) for c in choices))

    def respond(self, req: CompletionRequest, run: ChoiceRun, ids: dict[str, Any]) -> JSONResponse:
        """The response of a finished run that is not streamed (``ChoiceRun.run_to_end`` returned True)."""
        out = []
        for c in run.choices:
            tokens, text = self._generated(req, c)
            logprobs = None
            if req.echo:
                prompt_text, prompt_logprobs = self._prompt_part(req, c)
                offset = len(prompt_text)
                text = prompt_text + text
            else:
                prompt_logprobs, offset = None, 0
            generated = self._choice_logprobs(req, tokens, c.logprobs, c.top_logprobs, offset)
            if generated is not None:
                logprobs = generated if prompt_logprobs is None else \
                    responses.merge_completion_logprobs(prompt_logprobs, generated)
            keep_ids = req.sampling.return_token_ids
            out.append(responses.completion_choice(
                c.index, text, "length" if req.sampling.max_tokens == 0 else c.finish_reason, logprobs,
                tokens if keep_ids else None, c.request.input_ids[0].tolist() if keep_ids else None))
        return JSONResponse(responses.text_completion(ids["cid"], ids["created"], ids["model"], out,
                                                      self._usage(req, run.choices)))

    async def stream(self, request: Request, req: CompletionRequest, run: ChoiceRun,
                     ids: dict[str, Any]) -> AsyncIterator[str]:
        cid, created, model = ids["cid"], ids["created"], ids["model"]

        def chunk(index: int, text: str, finish_reason: str | None = None, logprobs: dict | None = None) -> str:
            return sse(responses.text_completion(cid, created, model, [responses.completion_choice(
                index, text, finish_reason, logprobs)], None))

        scoring_only = req.sampling.max_tokens == 0
        echo_later = req.echo and req.logprobs is not None  # the prompt logprobs come with the first token event
        try:
            offsets = {c.index: 0 for c in run.choices}
            if req.echo and not echo_later:
                for c in run.choices:
                    text, _ = self._prompt_part(req, c)
                    offsets[c.index] = len(text)
                    yield chunk(c.index, text)
            try:
                async for choice, step in run.steps(request):
                    if echo_later and step.token is not None and len(choice.tokens) == 1:
                        text, logprobs = self._prompt_part(req, choice)
                        offsets[choice.index] = len(text)
                        yield chunk(choice.index, text, logprobs=logprobs)
                    if scoring_only:
                        if step.finished:
                            yield chunk(choice.index, "", "length")
                        continue
                    text = "".join(t for _, t in step.pieces)
                    tokens = [step.token] if step.token is not None else []
                    logprobs = self._choice_logprobs(req, tokens, [step.logprob], [step.top_logprobs],
                                                     offsets[choice.index])
                    offsets[choice.index] += len(text)
                    if text or logprobs:
                        yield chunk(choice.index, text, logprobs=logprobs)
                    if step.finished:
                        yield chunk(choice.index, "", choice.finish_reason)
            except Exception as e:  # a failed generation: the error object, then the end of the stream
                error = getattr(e, "body", None)
                yield sse(error() if callable(error) else {"error": {"message": str(e), "type": "server_error"}})
                yield DONE
                return
            if not run.finished:
                return
            if req.sampling.include_usage:
                yield sse(responses.usage_chunk(cid, created, model, self._usage(req, run.choices), "text_completion"))
            yield DONE
        finally:
            run.cancel()
