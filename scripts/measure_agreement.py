"""How far a request's greedy tokens depend on its neighbours in the engine's default (non-exact) mode (issue 17).

    python scripts/measure_agreement.py [CHECKPOINT] [--prompts 24] [--max-tokens 48] [--concurrency 8] [--threads 2]
                                        [--device cpu] [--dtype float32] [--preset small] [--exact] [--json PATH]

The engine (r4b_core/serve/engine.py) is run in-process on the server's weights (oneDNN-prepacked linears
for ``--concurrency`` rows, as ``r4b serve`` loads them). Every prompt (random words, random lengths) runs
alone first; then all of them run again, ``--concurrency`` at a time, in groups submitted together (so their
prefills are packed into one forward and they decode in one batch), with the groups' lengths mixed. The
crowded tokens are compared with the alone tokens: how many requests match exactly, and for the others
where the first differing token is. With ``--exact`` the engine runs in its exact mode, where every request
must match. No CHECKPOINT: the ``--preset`` synthetic checkpoint (cached). ``--json`` also writes the figures
(scripts/device_check.sh runs this on the GPU: the paged Triton decode kernel beside packed prefills).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading

import torch

from r4b_core.models.fast_linears import fast_linears
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.serve.engine import Engine, EngineRequest

WORDS = "the a cat sat on mat of red blue one two three think answer why because image count".split()


class Done:
    """An on_event sink that signals the request's finish."""

    def __init__(self) -> None:
        self.finished = threading.Event()

    def __call__(self, event) -> None:
        if event.kind == "finish":
            self.finished.set()


def run_all(engine: Engine, prompts: list[torch.Tensor], max_tokens: int, group: int) -> list[list[int]]:
    """Greedy tokens of every prompt, ``group`` requests submitted together at a time."""
    tokens: list[list[int]] = []
    for start in range(0, len(prompts), group):
        requests = [EngineRequest(ids, max_tokens, on_event=Done(), stop_token_ids=[])
                    for ids in prompts[start:start + group]]
        for r in requests:
            engine.submit(r)
        for r in requests:
            if not r.on_event.finished.wait(600):
                raise RuntimeError("a request did not finish within 600 s")
            if r.finish_reason != "length":
                raise RuntimeError(f"a request finished with {r.finish_reason!r}")
        tokens += [list(r.tokens) for r in requests]
    return tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", help="a checkpoint directory (default: the small synthetic preset)")
    p.add_argument("--prompts", type=int, default=24, help="requests (default 24)")
    p.add_argument("--max-tokens", type=int, default=48, help="greedy tokens per request (default 48)")
    p.add_argument("--concurrency", type=int, default=8, help="requests submitted together (default 8)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    p.add_argument("--exact", action="store_true", help="the engine's exact mode (every request must match)")
    p.add_argument("--device", default="cpu", help="where the model runs (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="default float32")
    p.add_argument("--preset", default="small", choices=["tiny", "small"], help="no CHECKPOINT: this synthetic one")
    p.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = p.parse_args(argv)
    if min(args.prompts, args.max_tokens, args.concurrency, args.threads) < 1:
        p.error("--prompts, --max-tokens, --concurrency and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    if args.checkpoint is None:
        from r4b_core.reference.synthetic import cached_synthetic_checkpoint

        args.checkpoint = str(cached_synthetic_checkpoint(args.preset))
    model = R4BForConditionalGeneration.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype),
                                                        device=args.device, progress=False).eval()
    fast_linears(model, "auto", rows_hint=args.concurrency)  # the server's linears (prepacked on a CPU only)
    rng = random.Random(args.seed)
    vocab = model.config.text_config.vocab_size
    prompts = [torch.tensor([[rng.randrange(10, min(vocab, 50000)) for _ in range(rng.randint(4, 120))]])
               for _ in range(args.prompts)]
    engine = Engine(model, max_batch_size=args.concurrency, max_seq_len=1024, eos_token_ids=[], pad_token_id=0,
                    exact=args.exact).start()
    backend = engine.cache.decode_backend  # "triton" on a GPU whose kernel takes the shapes, else "sdpa"
    try:
        alone = run_all(engine, prompts, args.max_tokens, 1)
        order = list(range(len(prompts)))
        rng.shuffle(order)  # crowds of mixed prompt lengths
        crowded_shuffled = run_all(engine, [prompts[i] for i in order], args.max_tokens, args.concurrency)
    finally:
        engine.stop()
    crowded = [None] * len(prompts)
    for slot, i in enumerate(order):
        crowded[i] = crowded_shuffled[slot]
    first_diff = [next((t for t, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(alone, crowded)]
    differing = [d for d in first_diff if d is not None]
    same_tokens = sum(d if d is not None else len(x) for d, x in zip(first_diff, alone))
    mode = "exact" if args.exact else "default"
    total = len(prompts) * args.max_tokens
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "device": args.device, "dtype": args.dtype, "mode": mode,
                       "decode_backend": backend, "concurrency": args.concurrency, "requests": len(prompts),
                       "identical": len(prompts) - len(differing), "tokens": total,
                       "tokens_before_first_difference": same_tokens, "first_differences": sorted(differing)},
                      f, indent=2)
    print(f"{args.checkpoint}; engine {mode} mode; {args.prompts} prompts of 4-120 tokens, {args.max_tokens} greedy "
          f"tokens each; alone vs {args.concurrency} submitted together; {args.threads} threads; {args.device}, "
          f"{args.dtype}, {backend} decode")
    print(f"identical token lists: {len(prompts) - len(differing)}/{len(prompts)}; tokens before the first "
          f"difference: {same_tokens}/{total} ({100 * same_tokens / total:.1f} %)")
    if differing:
        print(f"first differing token (0 = the first new token): {sorted(differing)}; median "
              f"{statistics.median(differing)}")
    return 1 if args.exact and differing else 0


if __name__ == "__main__":
    sys.exit(main())
