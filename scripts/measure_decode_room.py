"""Decode step time at one context length with little vs much room reserved in the cache (issue 17).

    python scripts/measure_decode_room.py CHECKPOINT [--context 48] [--rooms 32 12000] [--rounds 9] [--contexts ...]

Both caches hold the same prompt; rounds alternate between them (the machine is noisy), each round times
``--steps`` decode steps through ``generate_steps`` (prefill excluded) and, separately, through
``decode_step`` on a rewound cache. Prints the per-step medians and the ratio big-room / small-room;
``--capacity-span`` reads the whole capacity every step (the behaviour before the bucketed span) for
comparison. ``--contexts 48 512 2048 8192`` adds decode step time at each context length (room 32 past it),
through ``decode_step``, alternating the lengths in rounds. ``--compile`` also checks that compiled greedy tokens equal eager ones over a run that
crosses a span boundary, and counts the compiled graphs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from r4b_core.generation.generate import decode_step, generate, generate_steps, prefill
from r4b_core.models import kv_cache as kv
from r4b_core.models.r4b import R4BForConditionalGeneration


def steps_timed(model, ids, room: int, steps: int) -> float:
    """Median seconds per decode step of one generate_steps run (the first yield follows the prefill)."""
    marks = []
    for i, _ in enumerate(generate_steps(model, ids, max_new_tokens=room)):
        marks.append(time.perf_counter())
        if i == steps:
            break
    return statistics.median(b - a for a, b in zip(marks, marks[1:]))


@torch.inference_mode()
def direct_timed(model, cache, token, context: int, steps: int) -> float:
    cache.set_lengths(context)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        decode_step(model, token, cache)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def by_context(model, contexts: list[int], rounds: int, steps: int) -> None:
    """Median decode_step time at each context length (room 32 past it), the lengths alternating per round."""
    text = model.config.text_config
    caches, times = {}, {c: [] for c in contexts}
    with torch.inference_mode():
        for context in contexts:
            ids = torch.randint(0, 1000, (1, context), generator=torch.Generator().manual_seed(0))
            caches[context] = (kv.KVCache.for_model(text, 1, context + 32), ids[:, -1:])
            prefill(model, ids, caches[context][0])
    for _ in range(rounds):
        for context in contexts:
            cache, token = caches[context]
            times[context].append(direct_timed(model, cache, token, context, steps))
    base = statistics.median(times[contexts[0]])
    for context in contexts:
        t = statistics.median(times[context])
        print(f"decode_step     context {context}: {t * 1e3:.2f} ms/step, {t / base:.3f}x context {contexts[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--context", type=int, default=48)
    parser.add_argument("--rooms", type=int, nargs=2, default=[32, 12000])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--capacity-span", action="store_true", help="read the whole capacity (the old way)")
    parser.add_argument("--compile", action="store_true", help="check compiled == eager tokens, count graphs")
    parser.add_argument("--contexts", type=int, nargs="*", default=[], help="also: step time at these context lengths")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.capacity_span:
        kv.decode_span = lambda longest, capacity: capacity
    model = R4BForConditionalGeneration.from_pretrained(args.checkpoint)
    text = model.config.text_config
    ids = torch.randint(0, 1000, (1, args.context), generator=torch.Generator().manual_seed(0))
    small, big = args.rooms
    caches = {}
    with torch.inference_mode():
        for room in (small, big):
            caches[room] = kv.KVCache.for_model(text, 1, args.context + room - 1)
            prefill(model, ids, caches[room])
    token = ids[:, -1:]
    results = {("generate_steps", r): [] for r in (small, big)} | {("decode_step", r): [] for r in (small, big)}
    for _ in range(args.rounds):
        for room in (small, big):
            results[("generate_steps", room)].append(steps_timed(model, ids, room, min(args.steps, room - 1)))
            results[("decode_step", room)].append(
                direct_timed(model, caches[room], token, args.context, min(args.steps, room - 1)))
    for path in ("generate_steps", "decode_step"):
        a, b = (statistics.median(results[(path, r)]) for r in (small, big))
        print(f"{path:15s} context {args.context}: room {small}: {a * 1e3:.2f} ms/step, room {big}: "
              f"{b * 1e3:.2f} ms/step, ratio {b / a:.3f}")
    if args.contexts:
        by_context(model, args.contexts, args.rounds, args.steps)
    if args.compile:
        torch._dynamo.reset()
        n_new = 600 - args.context  # crosses the 256 and 512 spans
        eager = generate(model, ids, max_new_tokens=n_new)
        compiled = generate(model, ids, max_new_tokens=n_new, compile=True)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        print(f"compiled == eager greedy tokens over {n_new} new tokens: {compiled.tokens == eager.tokens}; "
              f"compiled graphs: {graphs} (spans 256, 512, capacity {args.context + n_new - 1})")


if __name__ == "__main__":
    main()
