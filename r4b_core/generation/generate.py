"""Token-level generation as free functions outside the model: sampling, prefill, decode step, the loop.

    prompt ids [B, T] (left-padded) + images
      -> prepare_generation: inputs onto the model's device / dtype; eos, pad and sampling chosen
      -> prefill: one forward that fills a fresh KVCache and gives the last position's logits [B, V]
      -> repeat: sample a token per sequence, stop finished sequences (eos / max_new_tokens),
                 decode_step: one forward of the new tokens [B, 1] through the cache
      -> GenerationStream keeps the books (tokens, finish reasons, GenerationTimer) -> GenerationOutput

``decode_step`` has static shapes: it attends over a span of the cache (the used length rounded up
to a power of two, r4b_core/models/kv_cache.py), so it can be compiled, one graph per span.
Sampling is greedy when ``temperature == 0``; otherwise temperature, top-k and
top-p (applied in that order, as transformers does) and a draw from a seeded generator.
``generate`` drains a ``GenerationStream``; chat.py streams one (text in, text out lives there).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from r4b_core.generation_config import GenerationConfig, SamplingParams
from r4b_core.models.input_checks import check_prompt_ids
from r4b_core.models.kv_cache import KVCache


class NonFiniteLogitsError(ValueError):
    """The model produced NaN / Inf logits during generation (broken weights, or float16 overflow)."""


def decode_tokens_per_s(token_counts: Sequence[int], decode_time_s: float) -> float | None:
    """Tokens after each sequence's first, summed, per second of decoding; None when fewer than 2 tokens
    of any sequence were decoded (there is no decode phase to time; None stays valid JSON, NaN does not)."""
    decoded = sum(max(n - 1, 0) for n in token_counts)
    return decoded / decode_time_s if decoded > 0 and decode_time_s > 0 else None


class GenerationTimer:
    """Wall-clock marks of one generation: created before prefill, ``token()`` at every step (the first
    call marks the first token), ``stop()`` at the end. TTFT = first token - start (prefill + first
    sample); decode time = end - first token."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.end: float | None = None

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def stop(self) -> None:
        self.end = time.perf_counter()

    @property
    def time_to_first_token_s(self) -> float:
        return (self.first or self.end or self.start) - self.start

    @property
    def decode_time_s(self) -> float:
        return (self.end or self.start) - (self.first or self.end or self.start)


@dataclass
class GenerationOutput:
    """New tokens per sequence (eos included when it ended the sequence) and timings."""

    tokens: list[list[int]]
    finish_reasons: list[str]  # "eos" or "length"
    prompt_tokens: int
    time_to_first_token_s: float
    decode_time_s: float

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, per second of decoding, summed over the batch (None: fewer than 2)."""
        return decode_tokens_per_s([len(t) for t in self.tokens], self.decode_time_s)


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

    Before each compiled call the cache's host-side bookkeeping runs eagerly (``kv_cache.reserve_decode()``:
    room check, the span of slots this step reads), so the graph has static shapes: one graph per span
    (SDPA: powers of two from 256 up to the capacity, at most 7 for a 12,000-slot cache; Triton: the
    capacity), per batch size.
    """
    if device_type not in _COMPILED_DECODE:
        mode = "reduce-overhead" if device_type == "cuda" else None
        compiled = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)

        def step(model: torch.nn.Module, tokens: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
            kv_cache.reserve_decode()
            return compiled(model, tokens, kv_cache)

        _COMPILED_DECODE[device_type] = step
    return _COMPILED_DECODE[device_type]


@torch.inference_mode()
def warm_up_decode_step(model: torch.nn.Module, batch: int, capacity: int, *, compile: bool = False,
                        attention_backend: str = "auto", steps: int = 2, context: int = 0) -> float:
    """Run the decode step ``steps`` times on a throwaway cache of ``batch`` x ``capacity`` slots (the shape
    ``generate_steps`` will build) holding ``context`` tokens (the prompt's length: the span the first steps
    read), so that compiling it (``compile``) and first-call set-up are paid here and not inside a timed
    generation; returns the seconds taken. Same shapes, same compiled graph: no recompile until the context
    crosses a power of two."""
    text_config = getattr(model.config, "text_config", model.config)
    parameter = next(model.parameters())
    cache = KVCache.for_model(text_config, batch, capacity, dtype=_model_dtype(model),
                              device=parameter.device, attention_backend=attention_backend)
    cache.set_lengths(max(min(context, capacity - steps), 0))
    step = compiled_decode_step(parameter.device.type) if compile else decode_step
    if compile and parameter.device.type == "cuda":
        for t in (cache.k, cache.v, cache.seq_lens):
            torch._dynamo.mark_static_address(t)
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=parameter.device)
    start = time.perf_counter()
    for _ in range(min(steps, capacity - int(cache.seq_lens[0]))):  # each step fills one slot
        step(model, tokens, cache)
    if parameter.device.type == "cuda":
        torch.cuda.synchronize(parameter.device)
    return time.perf_counter() - start


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
    token_filter: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **inputs,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens [B], finished [B] bool) once per generated position, until every sequence has
    finished or ``max_new_tokens`` were produced. Finished sequences are fed ``pad_token_id``.

    ``compile``: run the decode step through ``compiled_decode_step``. ``attention_backend`` ("auto",
    "sdpa", "triton") picks the decode attention of the cache made here (ignored when ``kv_cache`` is
    given: the cache carries its own). ``token_filter``: sampled tokens [B] -> the tokens to emit and feed
    back (e.g. a ``ThinkingBudget`` forcing ``</think>``). ``inputs`` go to the prefill forward:
    attention_mask, pixel_values, image_sizes, batch_num_images. Logits with NaN / Inf for a running
    sequence raise ``NonFiniteLogitsError`` naming the step, before that step's tokens are yielded.
    """
    check_prompt_ids(input_ids)
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
        # NaN / Inf logits of a running sequence: flagged on the device and read back with the "all finished"
        # flag, in the one host sync per step this loop already had (the decode step itself has none). A row's
        # fp32 sum is NaN / Inf exactly when the row holds one (finite logits cannot overflow it): one cheap
        # reduction, where isfinite(logits).all() costs ~30x more on the CPU
        nonfinite = (~torch.isfinite(logits.sum(dim=-1, dtype=torch.float32)) & ~finished).any()
        tokens = sample_next_token(logits, sampling, generator)
        if token_filter is not None:
            tokens = token_filter(tokens)
        tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
        newly_done = torch.isin(tokens, eos) & ~finished
        bad, all_done = torch.stack([nonfinite, (finished | newly_done).all()]).tolist()
        if bad:
            raise NonFiniteLogitsError(
                f"generation step {step} (0 = the first new token): the model's logits hold NaN or Inf, so every "
                "token from here would be noise; generation stopped. Check the weights (r4b inspect --load, or "
                "from_pretrained(..., check_finite=True)) and the dtype (float16 overflows where bfloat16 does not)."
            )
        yield tokens, finished.clone()
        finished |= newly_done
        if step == max_new_tokens - 1 or all_done:
            return
        logits = decode_fn(model, tokens[:, None], kv_cache)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


# ---------------------------------------------------------------------------------------------
# one preparation and one bookkeeping loop, shared by generate() and chat.ChatStream / chat_batch


@dataclass
class PreparedGeneration:
    """A prompt ready for ``generate_steps``: tensors where the model is, stop and pad ids, sampling."""

    input_ids: torch.Tensor  # [B, T] on the model's device
    inputs: dict[str, Any]  # attention_mask, pixel_values, image_sizes, batch_num_images (those given)
    eos_token_ids: list[int]
    pad_token_id: int
    sampling: SamplingParams


def check_input_names(model: torch.nn.Module, inputs: Mapping[str, Any]) -> None:
    """The extra keywords of ``generate`` are inputs of the model's forward: any other name is a TypeError
    here, before any work, naming it (a sampling setting such as ``temperature=`` says it goes in
    ``sampling=SamplingParams(...)``), instead of one from inside ``forward``."""
    import dataclasses
    import inspect

    parameters = inspect.signature(model.forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return  # a forward that takes any keyword: it says for itself what it does not know
    sampling_names = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = [name for name in inputs if name in sampling_names and name not in parameters]
    if unknown:
        raise TypeError(f"generate() got {', '.join(f'{n}=' for n in unknown)}: sampling settings go in "
                        f"sampling=SamplingParams({', '.join(f'{n}=...' for n in unknown)}).")
    import difflib  # a misspelled keyword of generate itself (max_new_token=): named here, not inside forward

    own = [n for n in inspect.signature(generate).parameters if n not in ("model", "input_ids", "inputs")]
    for name in inputs:
        close = difflib.get_close_matches(name, own, 1, cutoff=0.8) if name not in parameters else []
        if close:
            raise TypeError(f"generate() got an unexpected keyword argument {name}= (did you mean {close[0]}=?); "
                            f"its other keywords are inputs of {type(model).__name__}.forward.")


def prepare_generation(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    inputs: Mapping[str, Any] | None = None,
    *,
    sampling: SamplingParams | None = None,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generation_config: GenerationConfig | None = None,
    default_eos_token_ids: Sequence[int] = (),
    default_pad_token_id: int = 0,
) -> PreparedGeneration:
    """Move the prompt to the model and choose what generation needs, in one place.

    ``input_ids`` and ``attention_mask`` go to the model's device, ``pixel_values`` also to its dtype;
    ``image_sizes`` / ``batch_num_images`` stay where they are (the model reads them on the host).
    Each of eos ids, pad id and sampling is: the argument when given, else ``generation_config``'s
    (``generation_config.json``: a non-empty ``eos_token_id``, a ``pad_token_id``, ``sampling()``),
    else the default (the tokenizer's ids at the chat level; none / 0 / greedy at the token level).
    """
    check_prompt_ids(input_ids)  # a list or a 1-D tensor is named here, not by a failed unpack further on
    check_input_names(model, inputs or {})
    parameter = next(model.parameters())
    prepared = dict(inputs or {})
    if prepared.get("attention_mask") is not None:
        prepared["attention_mask"] = prepared["attention_mask"].to(parameter.device)
    if prepared.get("pixel_values") is not None:
        prepared["pixel_values"] = prepared["pixel_values"].to(parameter.device, _model_dtype(model))
    if eos_token_ids is None:
        from_config = generation_config.eos_token_id if generation_config is not None else None
        eos_token_ids = from_config or default_eos_token_ids
    if pad_token_id is None:
        from_config = generation_config.pad_token_id if generation_config is not None else None
        pad_token_id = from_config if from_config is not None else default_pad_token_id
    if sampling is None:
        sampling = generation_config.sampling() if generation_config is not None else SamplingParams()
    return PreparedGeneration(input_ids=input_ids.to(parameter.device), inputs=prepared,
                              eos_token_ids=[int(i) for i in eos_token_ids], pad_token_id=int(pad_token_id),
                              sampling=sampling)


class GenerationStream:
    """``generate_steps`` with the books kept. Iterate to get, per step, each sequence's new token (None for
    a sequence that had already finished); when the iteration ends, ``output`` (a GenerationOutput with
    the tokens, finish reasons and the GenerationTimer's timings) is set. ``run()`` drains it."""

    def __init__(self, model: torch.nn.Module, prepared: PreparedGeneration, *, max_new_tokens: int,
                 kv_cache: KVCache | None = None,
                 decode_fn: Callable[[torch.nn.Module, torch.Tensor, KVCache], torch.Tensor] | None = None,
                 compile: bool = False, attention_backend: str = "auto",
                 token_filter: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.model, self.prepared, self.max_new_tokens = model, prepared, max_new_tokens
        self.kv_cache, self.decode_fn = kv_cache, decode_fn
        self.compile, self.attention_backend = compile, attention_backend
        self.token_filter = token_filter
        self.output: GenerationOutput | None = None

    def __iter__(self) -> Iterator[list[int | None]]:
        p = self.prepared
        batch, prompt_tokens = p.input_ids.shape
        tokens: list[list[int]] = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        eos = set(p.eos_token_ids)
        timer = GenerationTimer()
        steps = generate_steps(self.model, p.input_ids, max_new_tokens=self.max_new_tokens, sampling=p.sampling,
                               eos_token_ids=p.eos_token_ids, pad_token_id=p.pad_token_id, kv_cache=self.kv_cache,
                               decode_fn=self.decode_fn, compile=self.compile,
                               attention_backend=self.attention_backend, token_filter=self.token_filter, **p.inputs)
        for new, was_finished in steps:
            timer.token()
            row: list[int | None] = [None if done else token for token, done in
                                     zip(new.tolist(), was_finished.tolist())]
            for b, token in enumerate(row):
                if token is not None:
                    tokens[b].append(token)
                    if token in eos:
                        reasons[b] = "eos"
            yield row
        timer.stop()
        self.output = GenerationOutput(tokens=tokens, finish_reasons=reasons, prompt_tokens=prompt_tokens,
                                       time_to_first_token_s=timer.time_to_first_token_s,
                                       decode_time_s=timer.decode_time_s)

    def run(self) -> GenerationOutput:
        for _ in self:
            pass
        return self.output


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int = 256,
    sampling: SamplingParams | None = None,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generation_config: GenerationConfig | None = None,
    kv_cache: KVCache | None = None,
    decode_fn: Callable[[torch.nn.Module, torch.Tensor, KVCache], torch.Tensor] | None = None,
    compile: bool = False,
    attention_backend: str = "auto",
    **inputs,
) -> GenerationOutput:
    """Generate for a (left-padded) batch; see ``generate_steps`` for the arguments. Without
    ``sampling`` / ``eos_token_ids`` / ``pad_token_id``: ``generation_config``'s when given, else
    greedy, no eos, pad 0 (see ``prepare_generation``)."""
    prepared = prepare_generation(model, input_ids, inputs, sampling=sampling, eos_token_ids=eos_token_ids,
                                  pad_token_id=pad_token_id, generation_config=generation_config)
    return GenerationStream(model, prepared, max_new_tokens=max_new_tokens, kv_cache=kv_cache, decode_fn=decode_fn,
                            compile=compile, attention_backend=attention_backend).run()
