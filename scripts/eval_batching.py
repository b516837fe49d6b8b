"""`r4b eval`'s batching, measured: the same items one prompt at a time (max_batch_size=1) and batched
through the serving engine (max_batch_size=8), alternated in one process, best of each; prints the ratio.

    python scripts/eval_batching.py --model DIR     # e.g. a `r4b make-synthetic DIR` tiny checkpoint
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/test_eval.py writes the VLMEvalKit-style TSV

from test_eval import write_tsv  # noqa: E402

from r4b_core.eval import LocalBackend, evaluate, load_benchmark  # noqa: E402
from r4b_core.models.r4b import R4BForConditionalGeneration  # noqa: E402
from r4b_core.processing.processor import R4BProcessor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model = R4BForConditionalGeneration.from_pretrained(args.model).eval()
    processor = R4BProcessor.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        items = load_benchmark(write_tsv(Path(tmp) / "bench.tsv", rows=args.items))
    seconds: dict[int, list[float]] = {1: [], 8: []}
    for _ in range(args.rounds):
        for batch in (1, 8):
            with LocalBackend(model, processor, max_new_tokens=args.max_new_tokens, max_batch_size=batch) as backend:
                start = time.perf_counter()
                evaluate(items, backend, ["auto", "short"], progress=False)
                seconds[batch].append(time.perf_counter() - start)
    one, batched = min(seconds[1]), min(seconds[8])
    print(f"{args.items} items x 2 modes, max_new_tokens {args.max_new_tokens}: one at a time {one:.2f} s, "
          f"batched (8) {batched:.2f} s: {one / batched:.2f}x")


if __name__ == "__main__":
    main()
