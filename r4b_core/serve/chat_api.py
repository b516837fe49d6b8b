"""POST /v1/chat/completions: a validated ChatRequest -> choices -> one chat.completion or SSE chunks.

    ChatRequest ──(worker thread) images (images.load_request_image) + processor (chat template,
    thinking mode) + thinking budget + structured output──► n Choices ──ChoiceRun──► steps
    ──the edge: section "thinking" -> reasoning_content, "answer" -> content──► response

The message is the exact concatenation of the streamed deltas (nothing stripped). ``content`` is null
when no answer was produced (the thinking never closed, as vLLM's Qwen3 parser reports it);
``reasoning_content`` is null when the model did not think, and left out with include_reasoning=false.
usage.completion_tokens_details.reasoning_tokens counts the tokens of the thinking, its tags included.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from r4b_core.generation.sections import ANSWER, THINKING, SectionStreamer
from r4b_core.generation.thinking_budget import prompt_opens_thinking, thinking_budget_for
from r4b_core.processing.processor import THINK_END, THINK_START
from r4b_core.serve import responses
from r4b_core.serve.choices import Choice, ChoiceRun
from r4b_core.serve.engine import Engine
from r4b_core.serve.images import load_request_image
from r4b_core.serve.requests import ServerConfig, build_choices, token_room, vocab_size
from r4b_core.serve.responses import DONE, sse
from r4b_core.serve.schema import ChatRequest, invalid
from r4b_core.serve.structured import StructuredOutputs

FIELD = {THINKING: "reasoning_content", ANSWER: "content"}  # r4b's section names -> OpenAI's fields


class ChatHandler:
    """The chat route's work for one app: ``prepare`` (a worker thread) then ``respond``."""

    def __init__(self, engine: Engine, processor, config: ServerConfig) -> None:
        self.engine, self.processor, self.config = engine, processor, config
        tokenizer = processor.tokenizer
        self.think_ids = (tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END))
        self.texts = responses.TokenTexts(processor.decode, tokenizer.id_to_token)
        self.structured = StructuredOutputs(tokenizer, vocab_size(engine), engine.eos_token_ids)

    def prepare(self, chat: ChatRequest, run: ChoiceRun) -> list[Choice]:
        """Images, chat template, tokens and the choices' engine requests (CPU work: a worker thread)."""
        images = [load_request_image(ref, self.config.images) for ref in chat.images]
        thinking_mode = chat.thinking_mode or self.config.thinking_mode
        try:
            inputs = self.processor(messages=chat.messages, images=images or None, thinking_mode=thinking_mode)
        except ValueError as e:
            param = chat.images[0].param if images and "image" in str(e).lower() else "messages"
            raise invalid(param, str(e)) from None
        input_ids = inputs.pop("input_ids")
        inputs.pop("attention_mask", None)
        prompt = input_ids[0].tolist()
        max_tokens = token_room(self.engine, len(prompt), chat.sampling.max_tokens, "messages")
        budget_tokens = chat.max_thinking_tokens if chat.max_thinking_tokens is not None \
            else self.config.max_thinking_tokens
        try:
            thinking_budget_for(self.processor, prompt, budget_tokens)  # checked once here, made per choice below
        except ValueError as e:
            raise invalid("thinking_token_budget", str(e)) from None
        in_thinking = None not in self.think_ids and prompt_opens_thinking(prompt, *self.think_ids)
        fmt = chat.sampling.response_format
        return build_choices(
            run, self.engine, self.processor, self.config, chat.sampling, input_ids=input_ids, model_inputs=inputs,
            max_new_tokens=max_tokens, logprobs=chat.top_logprobs if chat.logprobs else None,
            sections=lambda: SectionStreamer(self.processor.decode, *self.think_ids, in_thinking=in_thinking,
                                             stop=chat.sampling.stop),
            thinking_budget=lambda: thinking_budget_for(self.processor, prompt, budget_tokens),
            logits_processor=self.structured.factory(fmt, self.think_ids, in_thinking))

    # ------------------------------------------------------------------------------------------

    def _message(self, chat: ChatRequest, choice: Choice) -> tuple[str | None, str | None]:
        sections = choice.sections
        content = sections.text(ANSWER) or None
        reasoning = sections.text(THINKING) if sections.thought and chat.include_reasoning else None
        return content, reasoning

    def _logprobs(self, chat: ChatRequest, tokens, logprobs, tops) -> list[dict[str, Any]] | None:
        return responses.chat_logprob_entries(self.texts, tokens, logprobs, tops) if chat.logprobs else None

    def _usage(self, choices: list[Choice]) -> dict[str, Any]:
        return responses.usage(choices[0].request.prompt_tokens, sum(len(c.tokens) for c in choices),
                               reasoning_tokens=sum(c.sections.tokens[THINKING] for c in choices))

    def respond(self, chat: ChatRequest, run: ChoiceRun, ids: dict[str, Any]) -> JSONResponse:
        """The response of a finished run that is not streamed (``ChoiceRun.run_to_end`` returned True)."""
        out = []
        for c in run.choices:
            content, reasoning = self._message(chat, c)
            out.append(responses.chat_choice(c.index, content, reasoning, c.finish_reason,
                                             self._logprobs(chat, c.tokens, c.logprobs, c.top_logprobs),
                                             c.tokens if chat.sampling.return_token_ids else None))
        prompt_ids = run.choices[0].request.input_ids[0].tolist() if chat.sampling.return_token_ids else None
        return JSONResponse(responses.chat_completion(ids["cid"], ids["created"], ids["model"], out,
                                                      self._usage(run.choices), prompt_ids))

    async def stream(self, request: Request, chat: ChatRequest, run: ChoiceRun,
                     ids: dict[str, Any]) -> AsyncIterator[str]:
        cid, created, model = ids["cid"], ids["created"], ids["model"]
        keep_ids = chat.sampling.return_token_ids
        try:
            prompt_ids = run.choices[0].request.input_ids[0].tolist() if keep_ids else None
            for c in run.choices:
                yield sse(responses.chat_chunk(cid, created, model, c.index, {"role": "assistant", "content": ""},
                                               prompt_token_ids=prompt_ids if c.index == 0 else None))
            try:
                async for choice, step in run.steps(request):
                    delta = {}
                    for section, text in step.pieces:
                        if section == ANSWER or chat.include_reasoning:
                            delta[FIELD[section]] = delta.get(FIELD[section], "") + text
                    token_ids = [step.token] if step.token is not None else []
                    logprobs = self._logprobs(chat, token_ids, [step.logprob] * bool(token_ids),
                                              [step.top_logprobs] * bool(token_ids))
                    if delta or logprobs or (keep_ids and token_ids):
                        yield sse(responses.chat_chunk(cid, created, model, choice.index, delta, None, logprobs,
                                                       token_ids if keep_ids else None))
                    if step.finished:
                        yield sse(responses.chat_chunk(cid, created, model, choice.index, {}, choice.finish_reason))
            except Exception as e:  # a failed generation: the error object, then the end of the stream
                error = getattr(e, "body", None)
                yield sse(error() if callable(error) else {"error": {"message": str(e), "type": "server_error"}})
                yield DONE
                return
            if not run.finished:  # the client went away
                return
            if chat.sampling.include_usage:
                yield sse(responses.usage_chunk(cid, created, model, self._usage(run.choices)))
            yield DONE
        finally:
            run.cancel()  # a closed connection ends the generator here: free the slots


def response_ids(model: str, prefix: str = "chatcmpl") -> dict[str, Any]:
    return dict(cid=responses.completion_id(prefix), created=int(time.time()), model=model)
