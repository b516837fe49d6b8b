"""``r4b bench``: decode, prefill and load speed, r4b vs transformers and the bandwidth limit (r4b_core/bench/run.py).

A random-init preset (default small) or a checkpoint (--model); prints a table, or ``--json`` one
object; progress goes to stderr. The fast path for tests: ``--preset tiny --max-new-tokens 4
--repeats 1 --max-repeats 1 --load-repeats 1`` (the compiled step only runs with --compile or --full).
"""

from __future__ import annotations

import argparse
import json

from r4b_core.cli.common import (
    UsageError,
    add_max_new_tokens,
    add_quantize,
    compute_dtype,
    finite_float,
    positive_int,
    progress_to_stderr,
    torch_device,
)

PRESETS = ["tiny", "small", "r4b"]
DEFAULT_PRESET = "small"
VARIANT_CHOICES = ("float32", "float32-plain", "bfloat16", "bfloat16-plain", "float16", "int8")  # bench.VARIANTS
DEFAULT_VARIANTS = ("float32", "float32-plain")  # the default run fits 5 minutes on a 2-core CPU
FULL_VARIANTS = ("float32", "float32-plain", "bfloat16", "int8")  # --full
DEFAULT_BATCH_SIZES, FULL_BATCH_SIZES = (1, 8), (1, 4, 8)
DEFAULT_MAX_REPEATS, FULL_MAX_REPEATS = 3, 9  # default: exactly --repeats (3) rounds
DEFAULT_LOAD_REPEATS, FULL_LOAD_REPEATS = 1, 2


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in VARIANT_CHOICES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(VARIANT_CHOICES)}; got "
                                         f"{text!r}")
    return names


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers such as 1,4,8; got "
                                         f"{text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be at least 1; got {text!r}")
    return values


def add_parser(subparsers: argparse._SubParsersAction,
               parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    b = subparsers.add_parser(
        "bench", parents=parents, help="decode/prefill/load speed, r4b vs transformers, and the bandwidth limit",
        description="Time decoding (per-step medians of r4b in float32 / bfloat16 / int8, compiled, and r4b vs "
                    "transformers' generate at several batch sizes, alternating in one process, each against its "
                    "memory-bandwidth limit), prefill (text prompt, image prompt, vision stage) and loading "
                    "(fresh processes), on the same weights.")
    b.add_argument("--preset", choices=PRESETS,
                   help=f"random-init model shape when no --model is given (default {DEFAULT_PRESET})")
    b.add_argument("--prompt-tokens", type=positive_int, default=128, metavar="N",
                   help="text prompt length (default 128)")
    add_max_new_tokens(b, 32, "tokens decoded per timed run")
    add_quantize(b)
    b.add_argument("--repeats", type=positive_int, default=3, metavar="N",
                   help="timed rounds at least, after the warm-up (default 3)")
    b.add_argument("--full", action="store_true",
                   help="the full sweep: variants " + ",".join(FULL_VARIANTS) + ", batch sizes "
                        + ",".join(map(str, FULL_BATCH_SIZES)) + f", up to {FULL_MAX_REPEATS} rounds, "
                        f"{FULL_LOAD_REPEATS} loads per side (flags given explicitly still win)")
    b.add_argument("--max-repeats", type=positive_int, default=None, metavar="N",
                   help="timed rounds at most: rounds go on while a figure's per-round spread is above "
                        f"--max-spread (default {DEFAULT_MAX_REPEATS}; --full {FULL_MAX_REPEATS})")
    b.add_argument("--max-spread", type=finite_float, default=0.10, metavar="FRACTION",
                   help="(max - min) / median of the per-round figures that ends the rounds (default 0.10)")
    b.add_argument("--variants", type=_name_list, default=None, metavar="LIST",
                   help="batch-1 decode variants, comma-separated from " + ", ".join(VARIANT_CHOICES) + ": a dtype "
                        "alone is what --quantize auto runs (oneDNN-prepacked weights on a CPU), -plain the weights "
                        "as loaded (--quantize none), int8 is bfloat16 with --quantize int8 (default "
                        + ",".join(DEFAULT_VARIANTS) + "; --full " + ",".join(FULL_VARIANTS) + ")"),
    b.add_argument("--batch-sizes", type=_int_list, default=None, metavar="LIST",
                   help="batch sizes of the r4b vs transformers decode comparison (default "
                        + ",".join(map(str, DEFAULT_BATCH_SIZES)) + "; --full " + ",".join(map(str, FULL_BATCH_SIZES))
                        + ")")
    b.add_argument("--load-repeats", type=positive_int, default=None, metavar="N",
                   help=f"fresh-process loads per side (default {DEFAULT_LOAD_REPEATS}; --full {FULL_LOAD_REPEATS})")
    b.add_argument("--compile", action="store_true",
                   help="also time the compiled decode step (on with --full; its compile takes minutes on a CPU)")
    b.add_argument("--no-compile", action="store_true", help="skip the compiled decode step (with --full)")
    b.add_argument("--no-transformers", action="store_true", help="skip the transformers reference")
    b.add_argument("--no-prefill", action="store_true", help="skip the prefill and vision timings")
    b.add_argument("--no-load", action="store_true",
                   help="skip the load timings (with a preset they write its synthetic checkpoint to the r4b cache "
                        "on first use)")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return b


def sweep_settings(args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[int, ...], int, int, bool]:
    """(variants, batch sizes, max repeats, load repeats, compiled step): the flags given, else the default
    run's (which fits 5 minutes on a 2-core CPU) or --full's."""
    full = args.full
    return (args.variants or (FULL_VARIANTS if full else DEFAULT_VARIANTS),
            args.batch_sizes or (FULL_BATCH_SIZES if full else DEFAULT_BATCH_SIZES),
            args.max_repeats or (FULL_MAX_REPEATS if full else DEFAULT_MAX_REPEATS),
            args.load_repeats or (FULL_LOAD_REPEATS if full else DEFAULT_LOAD_REPEATS),
            not args.no_compile and (args.compile or full))


def run(args: argparse.Namespace) -> int:
    from r4b_core.bench.run import BenchOptions, format_table, run_bench
    from r4b_weights import resolve_checkpoint

    if args.model is not None and args.preset is not None:
        raise UsageError(f"give --model or --preset, not both (--model {args.model}, --preset {args.preset}).")
    if args.model is None and args.revision is not None:
        raise UsageError(f"--revision {args.revision} needs --model (a hub id).")
    if args.max_new_tokens < 2:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: bench times the steps after the first token, so "
                         "it needs at least 2.")
    if not 0 < args.max_spread:
        raise UsageError(f"--max-spread must be above 0, got {args.max_spread}.")
    variants, batch_sizes, max_repeats, load_repeats, compiled = sweep_settings(args)
    device = torch_device(args.device)
    directory = resolve_checkpoint(args.model, args.revision) if args.model is not None else None
    options = BenchOptions(
        preset=args.preset or DEFAULT_PRESET, model_dir=None if directory is None else str(directory),
        dtype=compute_dtype(args.dtype, directory), quantize=args.quantize, device=str(device),
        prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
        max_repeats=max_repeats, max_spread=args.max_spread, variants=variants,
        batch_sizes=batch_sizes, compile=compiled, transformers=not args.no_transformers,
        prefill=not args.no_prefill, load=not args.no_load, load_repeats=load_repeats)
    result = run_bench(options, progress=progress_to_stderr)
    print(json.dumps(result) if args.json else format_table(result))
    return 0
