"""Generation as free functions outside the model: prefill, decode step, sampling, stopping, streaming.

    prompt ids [B, T] (left-padded) + images
      -> prefill: one forward that fills a fresh KVCache and gives the last position's logits [B, V]
      -> repeat: sample a token per sequence, stop finished sequences (eos / max_new_tokens),
                 decode_step: one forward of the new tokens [B, 1] through the cache

``decode_step`` has static shapes (the cache is attended over its whole capacity with a mask), so
it can be compiled. Sampling is greedy when ``temperature == 0``; otherwise temperature, top-k and
top-p (applied in that order, as transformers does) and a draw from a seeded generator.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r4b_core.kv_cache import KVCache


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")


@dataclass
class GenerationConfig:
    """What ``generation_config.json`` says (only the keys r4b uses)."""

    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    do_sample: bool | None = None

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "GenerationConfig":
        """Read ``generation_config.json``; an absent file gives an empty config."""
        path = Path(directory) / "generation_config.json"
        if not path.is_file():
            return cls()
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}).") from None
        eos = d.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return cls(eos_token_id=eos, pad_token_id=d.get("pad_token_id"), temperature=d.get("temperature"),
                   top_k=d.get("top_k"), top_p=d.get("top_p"), do_sample=d.get("do_sample"))

    def sampling(self, seed: int | None = None) -> SamplingParams:
        """The checkpoint's default sampling (greedy unless it sets do_sample)."""
        if not self.do_sample:
            return SamplingParams(seed=seed)
        return SamplingParams(temperature=self.temperature or 1.0, top_k=self.top_k or 0, top_p=self.top_p or 1.0,
                              seed=seed)


@dataclass
class GenerationOutput:
    """New tokens per sequence (eos included when it ended the sequence) and timings."""

    tokens: list[list[int]]
    finish_reasons: list[str]  # "eos" or "length"
    prompt_tokens: int
    time_to_first_token_s: float
    decode_time_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second of decoding, summed over the batch."""
        steps = sum(max(len(t) - 1, 0) for t in self.tokens)
        return steps / self.decode_time_s if self.decode_time_s > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# sampling


def sample_next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. No host synchronisation."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= params.top_p  # keep the token that crosses top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    # exponential race: argmax(p / E), E ~ Exp(1), draws from p without a multinomial sync
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


# ---------------------------------------------------------------------------------------------
# the two forward shapes


def prefill(model: torch.nn.Module, input_ids: torch.Tensor, kv_cache: KVCache, **inputs) -> torch.Tensor:
    """Run the prompt (with images) through the model into ``kv_cache``; last-position logits [B, V]."""
    return model(input_ids, kv_cache=kv_cache, logits_to_keep=1, **inputs).logits[:, -1]


def decode_step(model: torch.nn.Module, tokens: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
    """One new token per sequence [B, 1] through the cache; logits [B, V]. Static shapes."""
    return model(tokens, kv_cache=kv_cache).logits[:, -1]


_COMPILED_DECODE: dict[str, Callable] = {}  # one compiled wrapper per device type (torch.compile caches graphs)


def compiled_decode_step(device_type: str) -> Callable[[torch.nn.Module, torch.Tensor, KVCache], torch.Tensor]:
    """``decode_step`` under ``torch.compile(fullgraph=True)``; CUDA graphs ("reduce-overhead") on GPU.

    The step has static shapes (the cache is attended over its whole capacity), so one graph serves
    every position; a new batch size or cache capacity compiles a new one.
    """
    if device_type not in _COMPILED_DECODE:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED_DECODE[device_type] = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)
    return _COMPILED_DECODE[device_type]


def check_lengths(prompt_len: int, max_new_tokens: int, capacity: int, max_positions: int) -> None:
    """A clear error before any compute when the request cannot fit."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    need = prompt_len + max_new_tokens
    if need > max_positions:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceeds the model's "
            f"max_position_embeddings ({max_positions}); shorten the prompt or lower max_new_tokens."
        )
    if need - 1 > capacity:  # the last sampled token is never written to the cache
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) needs a KV cache of {need - 1} "
            f"slots but it has {capacity}."
        )


# ---------------------------------------------------------------------------------------------
# the loop


@torch.inference_mode()
def generate_steps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    kv_cache: KVCache | None = None,
    decode_fn: Callable[[torch.nn.Module, torch.Tensor, KVCache], torch.Tensor] | None = None,
    compile: bool = False,
    attention_backend: str = "auto",
    **inputs,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens [B], finished [B] bool) once per generated position, until every sequence has
    finished or ``max_new_tokens`` were produced. Finished sequences are fed ``pad_token_id``.

    ``compile``: run the decode step through ``compiled_decode_step``. ``attention_backend`` ("auto",
    "sdpa", "triton") picks the decode attention of the cache made here (ignored when ``kv_cache`` is
    given: the cache carries its own). ``inputs`` go to the prefill forward: attention_mask,
    pixel_values, image_sizes, batch_num_images.
    """
    batch, prompt_len = input_ids.shape
    text_config = getattr(model.config, "text_config", model.config)
    if kv_cache is None:
        capacity = prompt_len + max_new_tokens - 1
        check_lengths(prompt_len, max_new_tokens, capacity, text_config.max_position_embeddings)
        kv_cache = KVCache.for_model(text_config, batch, max(capacity, 1), dtype=_model_dtype(model),
                                     device=input_ids.device, attention_backend=attention_backend)
    else:
        check_lengths(prompt_len, max_new_tokens, kv_cache.capacity - int(kv_cache.seq_lens.max()),
                      text_config.max_position_embeddings)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(sampling.seed)
    if decode_fn is None:
        decode_fn = compiled_decode_step(input_ids.device.type) if compile else decode_step
    if compile and input_ids.device.type == "cuda":  # CUDA graphs need the cache at fixed addresses
        for t in (kv_cache.k, kv_cache.v, kv_cache.seq_lens):
            torch._dynamo.mark_static_address(t)
    eos = torch.tensor(list(eos_token_ids) or [-1], device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)

    logits = prefill(model, input_ids, kv_cache, **inputs)
    for step in range(max_new_tokens):
        tokens = sample_next_token(logits, sampling, generator)
        tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
        newly_done = torch.isin(tokens, eos) & ~finished
        yield tokens, finished.clone()
        finished |= newly_done
        if step == max_new_tokens - 1 or bool(finished.all()):
            return
        logits = decode_fn(model, tokens[:, None], kv_cache)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int = 256,
    sampling: SamplingParams = SamplingParams(),
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    kv_cache: KVCache | None = None,
    decode_fn: Callable[[torch.nn.Module, torch.Tensor, KVCache], torch.Tensor] | None = None,
    compile: bool = False,
    attention_backend: str = "auto",
    **inputs,
) -> GenerationOutput:
    """Generate for a (left-padded) batch; see ``generate_steps`` for the arguments."""
    batch = input_ids.shape[0]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    eos = set(eos_token_ids)
    start = time.perf_counter()
    first = None
    steps = generate_steps(model, input_ids, max_new_tokens=max_new_tokens, sampling=sampling,
                           eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, kv_cache=kv_cache,
                           decode_fn=decode_fn, compile=compile, attention_backend=attention_backend, **inputs)
    for new, was_finished in steps:
        for b, (token, done) in enumerate(zip(new.tolist(), was_finished.tolist())):
            if not done:
                tokens[b].append(token)
                if token in eos:
                    reasons[b] = "eos"
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return GenerationOutput(tokens=tokens, finish_reasons=reasons, prompt_tokens=input_ids.shape[1],
                            time_to_first_token_s=first - start, decode_time_s=end - first)


class TextStreamer:
    """Turns a growing token list into UTF-8-safe text deltas.

    Byte-level BPE can split one character over several tokens; until the last character is
    complete the decoded text ends in U+FFFD, and that tail is held back.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[self.emitted:], len(text)
        return delta

    def flush(self) -> str:
        text = self.decode(self.ids)
        delta, self.emitted = text[self.emitted:], len(text)
        return delta


# ---------------------------------------------------------------------------------------------
# text in, text out: messages + images -> streamed (section, delta) pairs and a ChatResult


@dataclass
class ChatResult:
    tokens: list[int]
    text: str  # special tokens skipped; <think>/</think> kept (they are not "special" in Qwen3)
    thinking: str | None  # None: the model did not think
    answer: str
    finish_reason: str  # "eos" or "length"
    prompt_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float


class ChatStream:
    """Iterate to get ("thinking" | "answer", text delta) pairs as tokens arrive; ``result`` is set
    when the iteration ends. The thinking is recognised by the ``<think>``/``</think>`` tokens; in
    ``long`` mode the prompt already opened ``<think>``, so the stream starts in the thinking."""

    def __init__(self, model: torch.nn.Module, processor, messages: list[dict], images=None, *,
                 thinking_mode: str = "auto", max_new_tokens: int = 1024, sampling: SamplingParams | None = None,
                 generation_config: GenerationConfig | None = None, compile: bool = False,
                 attention_backend: str = "auto") -> None:
        device = next(model.parameters()).device
        inputs = processor(messages=messages, images=images, thinking_mode=thinking_mode)
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("ChatStream streams one conversation; use chat_batch for several.")
        inputs.pop("attention_mask")  # one prompt: no padding
        self.input_ids = inputs.pop("input_ids").to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(device, _model_dtype(model))
        self.inputs = inputs
        self.model, self.processor, self.thinking_mode = model, processor, thinking_mode
        self.max_new_tokens = max_new_tokens
        self.compile, self.attention_backend = compile, attention_backend
        generation_config = generation_config or GenerationConfig()
        self.sampling = sampling or generation_config.sampling()
        self.eos = generation_config.eos_token_id or processor.eos_token_ids
        pad = generation_config.pad_token_id
        self.pad = pad if pad is not None else processor.pad_token_id
        self.result: ChatResult | None = None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        from r4b_core.processor import THINK_END, THINK_START

        tokenizer = self.processor.tokenizer
        think_start, think_end = tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END)
        section = "thinking" if self.thinking_mode == "long" else "answer"
        streams = {"thinking": TextStreamer(self.processor.decode), "answer": TextStreamer(self.processor.decode)}
        tokens: list[int] = []
        start = time.perf_counter()
        first = None
        steps = generate_steps(self.model, self.input_ids, max_new_tokens=self.max_new_tokens, sampling=self.sampling,
                               eos_token_ids=self.eos, pad_token_id=self.pad, compile=self.compile,
                               attention_backend=self.attention_backend, **self.inputs)
        for new, _ in steps:
            token = int(new[0])
            first = first or time.perf_counter()
            tokens.append(token)
            if token == think_start:
                section = "thinking"
            elif token == think_end:
                section = "answer"
            elif delta := streams[section].push(token):
                yield section, delta
        end = time.perf_counter()
        for name, stream in streams.items():
            if delta := stream.flush():
                yield name, delta
        self.result = _chat_result(self.processor, tokens, self.eos, self.thinking_mode, self.input_ids.shape[1],
                                   first - start, end - first)


def _chat_result(processor, tokens: list[int], eos: Sequence[int], thinking_mode: str, prompt_tokens: int,
                 ttft: float, decode_time: float) -> ChatResult:
    from r4b_core.processor import THINK_START, split_thinking

    text = processor.decode(tokens)
    thinking, answer = split_thinking((THINK_START + "\n" if thinking_mode == "long" else "") + text)
    rate = (len(tokens) - 1) / decode_time if len(tokens) > 1 and decode_time > 0 else float("nan")
    return ChatResult(tokens=tokens, text=text, thinking=thinking, answer=answer,
                      finish_reason="eos" if tokens and tokens[-1] in eos else "length",
                      prompt_tokens=prompt_tokens, time_to_first_token_s=ttft, decode_tokens_per_s=rate)


def chat(model: torch.nn.Module, processor, messages: list[dict], images=None, **kwargs) -> ChatResult:
    """Generate an answer for one conversation (see ChatStream for the keyword arguments)."""
    stream = ChatStream(model, processor, messages, images, **kwargs)
    for _ in stream:
        pass
    return stream.result


def chat_batch(model: torch.nn.Module, processor, conversations: list[list[dict]], images=None, *,
               thinking_mode: str = "auto", max_new_tokens: int = 1024, sampling: SamplingParams | None = None,
               generation_config: GenerationConfig | None = None, compile: bool = False,
               attention_backend: str = "auto") -> list[ChatResult]:
    """Several conversations at once (left-padded); ``images``: one list per conversation."""
    device = next(model.parameters()).device
    inputs = processor(messages=conversations, images=images, thinking_mode=thinking_mode)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(device, _model_dtype(model))
    ids = inputs.pop("input_ids").to(device)
    inputs["attention_mask"] = inputs["attention_mask"].to(device)
    generation_config = generation_config or GenerationConfig()
    eos = generation_config.eos_token_id or processor.eos_token_ids
    pad = generation_config.pad_token_id if generation_config.pad_token_id is not None else processor.pad_token_id
    out = generate(model, ids, max_new_tokens=max_new_tokens, sampling=sampling or generation_config.sampling(),
                   eos_token_ids=eos, pad_token_id=pad, compile=compile, attention_backend=attention_backend, **inputs)
    per_sequence_time = out.decode_time_s
    return [_chat_result(processor, tokens, eos, thinking_mode, ids.shape[1], out.time_to_first_token_s,
                         per_sequence_time) for tokens in out.tokens]
