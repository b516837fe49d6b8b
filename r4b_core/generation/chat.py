"""Chat-level generation: messages + images in, streamed text and a (thinking, answer) result out.

    messages, images ──R4BProcessor──► input_ids, pixel_values, ...
      ──generate.prepare_generation (eos / pad / sampling: argument, else generation_config.json,
                                      else the tokenizer's / greedy)──► generate.GenerationStream
      ──each token──► sections.SectionStreamer: ("thinking" | "answer", UTF-8-safe text delta)
      ──at the end──► ChatResult: text, split_thinking(text), finish reason, timings

``ChatStream`` streams one conversation; ``chat`` drains a ChatStream; ``chat_batch`` runs several
conversations as one left-padded batch. The thinking is recognised by the ``<think>`` / ``</think>``
tokens (plain added tokens in Qwen3, so decoding keeps them); in ``long`` mode the prompt already
opened ``<think>``, so the output starts inside the thinking.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from r4b_core.generation.generate import (
    GenerationOutput,
    GenerationStream,
    PreparedGeneration,
    decode_tokens_per_s,
    prepare_generation,
)
from r4b_core.generation_config import GenerationConfig, SamplingParams
from r4b_core.generation.sections import SectionStreamer
from r4b_core.processing.processor import THINK_END, THINK_START, R4BProcessor
from r4b_core.generation.thinking_budget import thinking_budget_for


def split_thinking(text: str) -> tuple[str | None, str]:
    """(thinking, answer) of a generated text.

    ``<think>T</think>A`` -> (T, A) stripped; ``T</think>A`` (the prompt already ended in ``<think>\\n``,
    long mode) -> (T, A) stripped; ``<think>T`` (thinking not finished) -> (T stripped, "");
    no tags -> (None, text) unchanged. Only the first ``</think>`` after the opening tag closes it.
    """
    start, end = text.find(THINK_START), text.find(THINK_END)
    if start != -1 and (end == -1 or start < end):
        rest = text[start + len(THINK_START):]
        close = rest.find(THINK_END)
        if close == -1:
            return rest.strip(), ""
        return rest[:close].strip(), rest[close + len(THINK_END):].strip()
    if end != -1:
        return text[:end].strip(), text[end + len(THINK_END):].strip()
    return None, text


@dataclass
class ChatResult:
    tokens: list[int]
    text: str  # special tokens skipped; <think>/</think> kept (they are not "special" in Qwen3)
    thinking: str | None  # None: the model did not think
    answer: str
    finish_reason: str  # "eos" or "length"
    prompt_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float | None  # None: fewer than 2 tokens, no decode phase to time


def _chat_result(processor: R4BProcessor, output: GenerationOutput, index: int, thinking_mode: str) -> ChatResult:
    """Sequence ``index`` of ``output`` as text; its rate is over the whole (batch's) decode time."""
    tokens = output.tokens[index]
    text = processor.decode(tokens)
    thinking, answer = split_thinking((THINK_START + "\n" if thinking_mode == "long" else "") + text)
    return ChatResult(tokens=tokens, text=text, thinking=thinking, answer=answer,
                      finish_reason=output.finish_reasons[index], prompt_tokens=output.prompt_tokens,
                      time_to_first_token_s=output.time_to_first_token_s,
                      decode_tokens_per_s=decode_tokens_per_s([len(tokens)], output.decode_time_s))


def _prepare(model: torch.nn.Module, processor: R4BProcessor, inputs: dict, sampling: SamplingParams | None,
             generation_config: GenerationConfig | None) -> PreparedGeneration:
    """Processor output -> PreparedGeneration. ``generation_config`` None: the processor's (the checkpoint's
    generation_config.json); the tokenizer's eos / pad ids where it has none."""
    input_ids = inputs.pop("input_ids")
    if generation_config is None:
        generation_config = processor.generation_config
    return prepare_generation(model, input_ids, inputs, sampling=sampling, generation_config=generation_config,
                              default_eos_token_ids=processor.eos_token_ids,
                              default_pad_token_id=processor.pad_token_id)


class ChatStream:
    """Iterate to get ("thinking" | "answer", text delta) pairs as tokens arrive; ``result`` (a ChatResult)
    is set when the iteration ends.

    ``generation_config``: None takes the processor's (the checkpoint's ``generation_config.json``).
    ``sampling``: None takes ``generation_config.sampling()`` (greedy unless it sets ``do_sample``); stop
    and pad ids come from ``generation_config`` when it has them, else from the tokenizer. ``compile``
    and ``attention_backend`` as in ``generate.generate_steps``. ``max_thinking_tokens``: after that many
    thinking tokens, ``</think>`` and the template's separator are forced and the model answers
    (r4b_core/generation/thinking_budget.py); None: no limit. ``inputs``: the processor's output for ``messages`` and
    ``images`` when the caller already made it (e.g. ``r4b generate`` checks the prompt before it loads the
    weights); None: made here.
    """

    def __init__(self, model: torch.nn.Module, processor: R4BProcessor, messages: list[dict], images: Any = None, *,
                 thinking_mode: str = "auto", max_new_tokens: int = 1024, sampling: SamplingParams | None = None,
                 generation_config: GenerationConfig | None = None, compile: bool = False,
                 attention_backend: str = "auto", max_thinking_tokens: int | None = None,
                 inputs: dict | None = None) -> None:
        if inputs is None:
            inputs = processor(messages=messages, images=images, thinking_mode=thinking_mode)
        inputs = dict(inputs)  # popped below; the caller's dict stays as it was
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("ChatStream streams one conversation; use chat_batch for several.")
        inputs.pop("attention_mask")  # one prompt: no padding
        self.thinking_budget = thinking_budget_for(processor, inputs["input_ids"][0].tolist(), max_thinking_tokens)
        self.prepared = _prepare(model, processor, inputs, sampling, generation_config)
        self.model, self.processor, self.thinking_mode = model, processor, thinking_mode
        self.max_new_tokens = max_new_tokens
        self.compile, self.attention_backend = compile, attention_backend
        self.result: ChatResult | None = None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        tokenizer = self.processor.tokenizer
        sections = SectionStreamer(self.processor.decode, tokenizer.token_to_id(THINK_START),
                                   tokenizer.token_to_id(THINK_END), in_thinking=self.thinking_mode == "long")
        budget = self.thinking_budget
        token_filter = None if budget is None else (lambda t: torch.tensor([budget(int(t[0]))], device=t.device))
        generation = GenerationStream(self.model, self.prepared, max_new_tokens=self.max_new_tokens,
                                      compile=self.compile, attention_backend=self.attention_backend,
                                      token_filter=token_filter)
        for (token,) in generation:  # one sequence: never None (the loop ends when it finishes)
            yield from sections.push(token)
        yield from sections.finish()
        self.result = _chat_result(self.processor, generation.output, 0, self.thinking_mode)


def chat(model: torch.nn.Module, processor: R4BProcessor, messages: list[dict], images: Any = None,
         **kwargs: Any) -> ChatResult:
    """Generate an answer for one conversation (see ChatStream for the keyword arguments)."""
    stream = ChatStream(model, processor, messages, images, **kwargs)
    for _ in stream:
        pass
    return stream.result


def chat_batch(model: torch.nn.Module, processor: R4BProcessor, conversations: list[list[dict]], images: Any = None,
               *, thinking_mode: str = "auto", max_new_tokens: int = 1024, sampling: SamplingParams | None = None,
               generation_config: GenerationConfig | None = None, compile: bool = False,
               attention_backend: str = "auto") -> list[ChatResult]:
    """Several conversations at once (left-padded); ``images``: one list per conversation. Each result's
    TTFT and rate are the batch's (one prefill, one decode loop for all)."""
    inputs = processor(messages=conversations, images=images, thinking_mode=thinking_mode)
    prepared = _prepare(model, processor, inputs, sampling, generation_config)
    output = GenerationStream(model, prepared, max_new_tokens=max_new_tokens, compile=compile,
                              attention_backend=attention_backend).run()
    return [_chat_result(processor, output, i, thinking_mode) for i in range(len(output.tokens))]
