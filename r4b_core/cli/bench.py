"""``r4b bench``: prefill and decode speed, r4b vs transformers on the same weights (r4b_core/bench.py).

A random-init preset (default small) or a checkpoint (--model); prints a table, or ``--json`` one
object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json

from r4b_core.cli.common import (
    UsageError,
    add_max_new_tokens,
    compute_dtype,
    positive_int,
    progress_to_stderr,
    torch_device,
)

PRESETS = ["tiny", "small", "r4b"]
DEFAULT_PRESET = "small"


def add_parser(subparsers: argparse._SubParsersAction,
               parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    b = subparsers.add_parser(
        "bench", parents=parents, help="prefill/decode speed, ours vs transformers, and the bandwidth limit",
        description="Time prefill (text and image prompts) and decode tokens/s for r4b eager, r4b compiled and "
                    "transformers' generate on the same weights (batch 1, alternating runs, medians), against the "
                    "memory-bandwidth limit measured in the same run.")
    b.add_argument("--preset", choices=PRESETS,
                   help=f"random-init model shape when no --model is given (default {DEFAULT_PRESET})")
    b.add_argument("--prompt-tokens", type=positive_int, default=128, metavar="N", help="text prompt length "
                                                                                        "(default 128)")
    add_max_new_tokens(b, 32, "tokens decoded per timed run")
    b.add_argument("--repeats", type=positive_int, default=3, metavar="N", help="timed rounds after the warm-up "
                                                                                 "(default 3)")
    b.add_argument("--no-compile", action="store_true", help="skip the compiled decode step")
    b.add_argument("--no-transformers", action="store_true", help="skip the transformers reference")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return b


def run(args: argparse.Namespace) -> int:
    from r4b_core.bench import format_table, run_bench
    from r4b_weights import resolve_checkpoint

    if args.model is not None and args.preset is not None:
        raise UsageError(f"give --model or --preset, not both (--model {args.model}, --preset {args.preset}).")
    if args.model is None and args.revision is not None:
        raise UsageError(f"--revision {args.revision} needs --model (a hub id).")
    device = torch_device(args.device)
    directory = resolve_checkpoint(args.model, args.revision) if args.model is not None else None
    result = run_bench(args.preset or DEFAULT_PRESET, None if directory is None else str(directory),
                       compute_dtype(args.dtype, directory), str(device), args.prompt_tokens, args.max_new_tokens,
                       args.repeats, compile=not args.no_compile, transformers_reference=not args.no_transformers,
                       progress=progress_to_stderr)
    print(json.dumps(result) if args.json else format_table(result))
    return 0
