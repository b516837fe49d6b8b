"""``r4b eval``: a local benchmark file through the model in each thinking mode, scored and reported.

Reads a VLMEvalKit TSV or a JSONL file (r4b_core/eval/benchmark.py), generates every (item, mode) through
the in-process serving engine (batched) or, with ``--base-url``, an OpenAI-compatible server, scores the
answer sections (r4b_core/scoring) and prints one table row per mode; ``--out DIR`` keeps the predictions
(resumable), summary.json and the accuracy-vs-tokens PNG. Everything is checked before the weights load.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from r4b_core.cli.common import (
    UsageError,
    add_image_options,
    add_max_new_tokens,
    add_quantize,
    finite_float,
    positive_int,
    progress_to_stderr,
    seed_int,
    set_up,
)

DEFAULT_MAX_NEW_TOKENS = 8192  # a long thinking plus its answer; R-4B's long mode thinks for thousands of tokens


def add_parser(subparsers: argparse._SubParsersAction,
               parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    e = subparsers.add_parser(
        "eval", parents=parents, help="accuracy, thinking rate and token cost per thinking mode on a benchmark file",
        description="Evaluate a local benchmark file (VLMEvalKit .tsv or .jsonl) in each thinking mode: accuracy "
                    "(overall, per category, among thought / not-thought answers), thinking rate and output / "
                    "thinking tokens. Generation runs batched through the serving engine, or through an "
                    "OpenAI-compatible server with --base-url. Nothing is downloaded.")
    e.add_argument("--data", required=True, type=Path, metavar="FILE", help="the benchmark file (.tsv or .jsonl)")
    e.add_argument("--thinking-mode", default="all", choices=["auto", "long", "short", "all"],
                   help="all (default): auto, long and short on the same prompts; or one mode")
    add_max_new_tokens(e, DEFAULT_MAX_NEW_TOKENS, "stop each answer after this many new tokens, thinking included")
    e.add_argument("--limit", type=positive_int, metavar="N", help="only the first N items of the file")
    e.add_argument("--out", type=Path, metavar="DIR",
                   help="write predictions.jsonl (appended as answers finish; a rerun resumes), summary.json and "
                        "accuracy_vs_tokens.png here")
    e.add_argument("--force", action="store_true",
                   help="write into --out even if it holds files r4b did not write (they are never touched)")
    e.add_argument("--temperature", type=finite_float, default=0.0, help="0 = greedy (default)")
    e.add_argument("--seed", type=seed_int, help="random seed when --temperature > 0")
    e.add_argument("--max-batch-size", type=positive_int, default=8, metavar="N",
                   help="in-process: requests decoded together (default 8; 1 = one prompt at a time)")
    e.add_argument("--max-seq-len", type=positive_int, metavar="N",
                   help="in-process: tokens per request slot, prompt + answer (default min(the model's "
                        "max_position_embeddings, --max-new-tokens + 4096))")
    add_quantize(e)
    add_image_options(e)
    remote = e.add_argument_group("an OpenAI-compatible server instead of the in-process model")
    remote.add_argument("--base-url", metavar="URL",
                        help="e.g. http://127.0.0.1:8000/v1 (r4b serve, vLLM, SGLang); --model then only supplies "
                             "the tokenizer that counts thinking tokens (optional)")
    remote.add_argument("--served-model", metavar="NAME", help="the model name to request (default: the first "
                                                               "one GET /models lists)")
    remote.add_argument("--api-key", metavar="KEY", help="sent as a bearer token (default: $OPENAI_API_KEY if set)")
    remote.add_argument("--concurrency", type=positive_int, default=8, metavar="N",
                        help="requests in flight at once (default 8)")
    remote.add_argument("--retries", type=int, default=3, metavar="N",
                        help="retries of a request after a connection error, 429 or 5xx (default 3)")
    return e


def _settings(args: argparse.Namespace, model_id: str) -> dict:
    """What the predictions depend on; a rerun into the same --out must give the same (modes and --limit
    may change: they only choose which items run)."""
    return {"data": str(args.data.expanduser().resolve()), "model": model_id, "dtype": args.dtype,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed,
            "backend": "remote" if args.base_url else "local",
            "quantize": None if args.base_url else args.quantize}


def run(args: argparse.Namespace) -> int:
    import math_verify  # noqa: F401  (a missing eval extra is reported before any work)
    from r4b_core.eval import EvalOutput, evaluate, expand_modes, format_table, load_benchmark

    if args.retries < 0:
        raise UsageError(f"--retries {args.retries}: must be 0 or more.")
    if args.base_url is None and (args.served_model or args.api_key):
        raise UsageError("--served-model and --api-key go with --base-url.")
    if args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature}: must be 0 (greedy) or more.")
    modes = expand_modes(args.thinking_mode)
    items = load_benchmark(args.data, args.limit)
    model_id, make_backend = _backend(args)  # checks the device, checkpoint, dtype and server; no weights yet
    out = None
    if args.out is not None:
        out = EvalOutput(args.out, _settings(args, model_id), force=args.force)
    try:
        if out is not None:
            skipped = sum(1 for item in items for mode in modes if (item.id, mode) in out.done)
            if skipped:
                progress_to_stderr(f"r4b eval: resuming: {skipped} of {len(items) * len(modes)} answers are already "
                                   f"in {args.out / 'predictions.jsonl'}")
        progress_to_stderr(f"r4b eval: {len(items)} items from {args.data}, modes {', '.join(modes)}")
        with make_backend() as backend:
            records, summary = evaluate(items, backend, modes, out=out, progress=True)
    except KeyboardInterrupt:
        if out is not None:
            progress_to_stderr(f"r4b eval: interrupted; {len(out.records)} answers kept in {args.out}; run the same "
                               "command again to resume")
        raise
    finally:
        if out is not None:
            out.close()
    print(format_table(summary))
    if out is not None:
        from r4b_core.eval import plot_png

        path = out.write_summary({"settings": _settings(args, model_id), "modes": summary})
        try:
            plot = out.write_plot(plot_png(summary, title=f"{args.data.name}: accuracy vs. output tokens"))
        except ImportError:
            plot = None
            progress_to_stderr("r4b eval: no plot (matplotlib is not installed: pip install -e '.[eval]')")
        progress_to_stderr(f"r4b eval: wrote {path}" + (f" and {plot}" if plot else ""))
    return 0


def _backend(args: argparse.Namespace) -> tuple[str, Callable[[], Any]]:
    """(model id for the run settings, a function making the backend): every check here, the weights later."""
    from r4b_core.generation_config import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, seed=args.seed)  # checks them
    if args.base_url is not None:
        from r4b_core.eval.remote import RemoteBackend

        count_tokens = None
        if args.model is not None:
            processor = set_up(args).load_processor()
            count_tokens = lambda text: len(processor.encode(text))  # noqa: E731
        backend = RemoteBackend(args.base_url, max_new_tokens=args.max_new_tokens, model=args.served_model,
                                api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or None,
                                concurrency=args.concurrency, retries=args.retries, count_tokens=count_tokens,
                                temperature=args.temperature, seed=args.seed)
        return f"{args.base_url} {backend.model}", lambda: backend
    setup = set_up(args, synthetic_note="its answers are random")

    def make_local():
        from r4b_core.eval.local import LocalBackend
        from r4b_core.models.fast_linears import fast_linears

        processor = setup.load_processor()
        model = setup.load_model()
        fast_linears(model, args.quantize)
        return LocalBackend(model, processor, max_new_tokens=args.max_new_tokens, max_batch_size=args.max_batch_size,
                            max_seq_len=args.max_seq_len, sampling=sampling, max_image_pixels=setup.max_image_pixels)

    return str(setup.directory), make_local


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as: r4b eval ...")
