"""Decode timing for ``r4b bench``: per-step times, the bandwidth limit of each variant, alternating rounds.

A variant is one way of decoding (r4b in float32 / bfloat16 / int8, eager or compiled, at a batch size;
transformers' ``generate`` on the same weights). One run of a variant generates ``n`` tokens greedily
(eos ignored) and records the wall clock at every new token; the intervals after the first token are
its per-step times (one decode forward + sampling + bookkeeping), so prefill and set-up never count.
The figure is the median of all per-step times of all rounds: on a shared CPU, where another process
can steal a core for a few milliseconds, the median is stable where a mean or a total is not.

Rounds run every variant once, in turn (A, B, C, A, B, C, ...), and each round also times a large
copy (the fastest of 3 back to back), so a slow spell hits every variant alike. After ``min_rounds``,
rounds continue (up to ``max_rounds``) while any variant's per-round medians spread by more than
``max_spread``.

Bandwidth limit of a variant = batch x copy bandwidth / bytes read per step, where the bytes are every
weight of the language model that a decode step reads (decoder layers, final norm, lm_head; int8
weights count one byte; one embedding row per sequence) plus the K/V of every sequence at the mean
context. Copy bandwidth counts bytes read + bytes written of a large tensor copy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from r4b_core.generation.generate import generate_steps
from r4b_core.models.kv_cache import KVCache

COPY_BYTES_CPU = 256 * 1024**2
COPY_BYTES_GPU = 2 * 1024**3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_seconds(device: torch.device, nbytes: int) -> Callable[[], float]:
    """A function that times one copy of ``nbytes`` (allocated once, here) on ``device``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)

    def run() -> float:
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        return time.perf_counter() - start

    return run


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes per second (read + written) of the fastest of ``repeats`` copies of ``nbytes`` on ``device``."""
    once = copy_seconds(device, nbytes)
    return 2 * nbytes / min(once() for _ in range(repeats))


def spread(values: list[float]) -> float:
    """(max - min) / median: 0 when every value is the same."""
    return (max(values) - min(values)) / statistics.median(values) if values else float("nan")


def decode_bytes_per_step(model: torch.nn.Module, batch: int, context: int) -> int:
    """Bytes one decode step must read: the language model's weights and buffers except the embedding table
    (a tied lm_head counts once, as lm_head), one embedding row and the K/V at ``context`` per sequence."""
    lm = getattr(model, "language_model", model)
    cfg = lm.config
    embed = lm.model.embed_tokens.weight
    seen, total = {id(embed)}, 0
    head = getattr(lm.lm_head, "weight", None)
    if isinstance(head, torch.Tensor) and head is embed:  # tied: the table is read whole, as lm_head
        total += head.numel() * head.element_size()
    for t in lm.state_dict(keep_vars=True).values():  # parameters and saved buffers (int8 weights, scales)
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    act = torch.finfo(embed.dtype).bits // 8
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * act
    return total + batch * (cfg.hidden_size * embed.element_size() + kv)


@dataclass
class DecodeVariant:
    """One way of decoding. ``run(n)`` generates n tokens and returns the per-step times (n - 1 values)."""

    name: str
    batch: int
    bytes_per_step: int
    run: Callable[[int], list[float]]
    steps: list[float] = field(default_factory=list)  # every per-step time of every round
    round_medians: list[float] = field(default_factory=list)

    def add_round(self, times: list[float]) -> None:
        self.steps.extend(times)
        self.round_medians.append(statistics.median(times))

    def result(self, copy_bandwidth: float) -> dict:
        step = statistics.median(self.steps)
        q = statistics.quantiles(self.steps, n=4) if len(self.steps) > 1 else [step, step, step]
        rate = self.batch / step
        limit = self.batch * copy_bandwidth / self.bytes_per_step
        return {"batch": self.batch, "tokens_per_s": rate, "step_ms_median": 1e3 * step,
                "step_ms_p25": 1e3 * q[0], "step_ms_p75": 1e3 * q[2],
                "round_tokens_per_s_min": self.batch / max(self.round_medians),
                "round_tokens_per_s_max": self.batch / min(self.round_medians),
                "round_spread": spread(self.round_medians), "rounds": len(self.round_medians),
                "steps": len(self.steps), "bytes_per_step": self.bytes_per_step,
                "limit_tokens_per_s": limit, "share_of_limit": rate / limit}


def ours_variant(name: str, model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int, compile: bool,
                 context: int) -> DecodeVariant:
    """r4b's ``generate_steps`` (greedy, no eos) on ``prompt`` [B, T], with one cache reused across runs."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    text_config = getattr(model.config, "text_config", model.config)
    cache = KVCache.for_model(text_config, prompt.shape[0], prompt.shape[1] + max_new_tokens, dtype=dtype,
                              device=prompt.device)

    def run(n: int) -> list[float]:
        cache.reset()
        marks = []
        for _ in generate_steps(model, prompt, max_new_tokens=n, kv_cache=cache, compile=compile):
            marks.append(time.perf_counter())  # each step synchronises (finished.all()) before it yields
        return [b - a for a, b in zip(marks, marks[1:])]

    return DecodeVariant(name, prompt.shape[0], decode_bytes_per_step(model, prompt.shape[0], context), run)


class _TokenMarks:
    """A transformers stopping criterion (duck-typed: it is called after every new token) that never stops
    generation and records when each token arrived."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def transformers_variant(name: str, ref: torch.nn.Module, prompt: torch.Tensor, bytes_per_step: int) -> DecodeVariant:
    """transformers' ``generate`` (greedy, exactly n tokens, its default dynamic cache) on ``prompt`` [B, T]."""

    def run(n: int) -> list[float]:
        marks = _TokenMarks()
        ref.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                     min_new_tokens=n, pad_token_id=0, stopping_criteria=[marks])
        return [b - a for a, b in zip(marks.times, marks.times[1:])]

    return DecodeVariant(name, prompt.shape[0], bytes_per_step, run)


def run_rounds(variants: list[DecodeVariant], device: torch.device, max_new_tokens: int, min_rounds: int,
               max_rounds: int, max_spread: float, progress: Callable[[str], None]) -> dict:
    """Warm every variant up (twice: compiles, allocations), then alternate rounds (module docstring).
    Returns {"copy_bandwidth": {...}, "variants": {name: result}}."""
    copy_once = copy_seconds(device, COPY_BYTES_GPU if device.type == "cuda" else COPY_BYTES_CPU)
    nbytes = COPY_BYTES_GPU if device.type == "cuda" else COPY_BYTES_CPU
    for v in variants:
        progress(f"warming up: {v.name} ...")
        v.run(min(max_new_tokens, 3))
        v.run(min(max_new_tokens, 3))
    bandwidths: list[float] = []
    for r in range(max_rounds):
        progress(f"decode round {r + 1} (at least {min_rounds}, at most {max_rounds}) ...")
        bandwidths.append(2 * nbytes / min(copy_once() for _ in range(3)))  # warm: the first copy wakes threads
        for v in variants:
            v.add_round(v.run(max_new_tokens))
        if r + 1 >= min_rounds and all(spread(v.round_medians) <= max_spread for v in variants):
            break
    bandwidth = statistics.median(bandwidths)
    return {"copy_bandwidth": {"GBps_median": bandwidth / 1e9, "GBps_min": min(bandwidths) / 1e9,
                               "GBps_max": max(bandwidths) / 1e9, "rounds": len(bandwidths)},
            "variants": {v.name: v.result(bandwidth) for v in variants}}
