"""From a validated request to the engine requests of its choices: the server's settings, token room,
sampling, stop ids, logprobs, min tokens and the structured-output constraint, shared by chat and
completions.

``n`` choices are ``n`` engine requests of the same prompt (the engine's prefix cache shares the prompt
where it has one); with a seed, choice ``i`` samples with seed + i so the choices differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from r4b_core.generation.sections import SectionStreamer
from r4b_core.generation_config import GenerationConfig
from r4b_core.serve.choices import Choice, ChoiceRun
from r4b_core.serve.engine import Engine, EngineRequest
from r4b_core.serve.images import ImagePolicy
from r4b_core.serve.schema import SamplingFields, invalid

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    thinking_mode: str = "auto"  # default when a request does not set chat_template_kwargs.thinking_mode
    max_thinking_tokens: int | None = None  # default when a request does not set thinking_token_budget
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    images: ImagePolicy = field(default_factory=ImagePolicy)
    generation_config: GenerationConfig | None = None  # sampling defaults; None: the processor's (the checkpoint's)
    shutdown_deadline_s: float = 30.0
    max_n: int = 8  # the most choices one request may ask for


def token_room(engine: Engine, prompt_tokens: int, max_tokens: int | None, prompt_param: str) -> int:
    """max_tokens, checked against the context (None: all the room left); 400 naming the numbers."""
    room = engine.max_new_tokens_for(prompt_tokens)
    if room < 1:
        raise invalid(prompt_param, f"the prompt has {prompt_tokens} tokens, which leaves no room to generate in "
                                    f"the server's context of {engine.max_seq_len} tokens (--max-seq-len).",
                      code="context_length_exceeded")
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise invalid("max_tokens", f"the prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) does not fit "
                                    f"the server's context of {engine.max_seq_len} tokens (--max-seq-len); at "
                                    f"most {room} new tokens fit after this prompt.", code="context_length_exceeded")
    return max_tokens


def build_choices(run: ChoiceRun, engine: Engine, processor, config: ServerConfig, fields: SamplingFields, *,
                  input_ids: torch.Tensor, model_inputs: dict[str, Any], max_new_tokens: int,
                  sections: Callable[[], SectionStreamer], logprobs: int | None = None,
                  prompt_logprobs: int | None = None, thinking_budget: Callable[[], Any] | None = None,
                  logits_processor: Callable[[], Any] | None = None, first_index: int = 0) -> list[Choice]:
    """The ``fields.n`` choices of one prompt, numbered from ``first_index``; the factories make each choice's
    own stateful parts."""
    check_token_ids(fields.stop_token_ids, vocab_size(engine), "stop_token_ids")
    stop_ids = [*([] if fields.ignore_eos else engine.eos_token_ids), *fields.stop_token_ids]
    defaults = config.generation_config or processor.generation_config
    choices = []
    for i in range(fields.n):
        seed = None if fields.seed is None else (fields.seed + i) % 2**64
        try:
            sampling = defaults.sampling(seed, temperature=fields.temperature, top_k=fields.top_k, top_p=fields.top_p)
        except ValueError as e:
            raise invalid(_sampling_param(str(e)), str(e)) from None
        request = EngineRequest(
            input_ids=input_ids, max_new_tokens=max_new_tokens, on_event=run.listener(first_index + i),
            sampling=sampling,            model_inputs=model_inputs, stop_token_ids=stop_ids,
            thinking_budget=thinking_budget() if thinking_budget else None, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, min_new_tokens=min(fields.min_tokens, max_new_tokens),
            logits_processor=logits_processor() if logits_processor else None)
        choices.append(Choice(first_index + i, request, sections()))
    return choices


def _sampling_param(message: str) -> str:
    """The request field a SamplingParams error is about (its message starts with the field's name)."""
    name = message.split(" ", 1)[0]
    return name if name in ("temperature", "top_k", "top_p", "seed") else "temperature"


def vocab_size(engine: Engine) -> int:
    """The model's vocabulary size (its logits' width; tokenizers may number their ids sparsely below it)."""
    config = engine.model.config
    return getattr(config, "text_config", config).vocab_size


def check_token_ids(ids: Sequence[int], vocab: int, param: str) -> None:
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise invalid(param, f"token ids {bad[:5]} are outside the vocabulary (size {vocab}).")
