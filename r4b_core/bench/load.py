"""Load time and peak memory for ``r4b bench``: r4b's loader vs transformers' ``from_pretrained``.

Each load runs in a fresh Python process (``python -m r4b_core.bench.load``), so neither side inherits
the other's allocations or warm imports; the runs alternate (r4b, transformers, r4b, ...) over the
same checkpoint directory, whose files the first run brings into the page cache for both. A child
imports what it needs first, then times only the load call, and reports:
- ``load_s``: the load call (r4b: ``R4BForConditionalGeneration.from_pretrained``; transformers:
  ``LlavaOnevisionForConditionalGeneration.from_pretrained`` with R-4B's projector grafted on, from
  r4b_core/reference/parity.py);
- ``peak_rss_bytes``: the child's peak resident set (VmHWM), imports included;
- ``rss_after_import_bytes``: the resident set before the load, so the load's own share can be read off.
Ratios below 1 mean r4b is faster / smaller.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

SIDES = ("ours", "transformers")
_RESULT_PREFIX = "R4B_BENCH_LOAD "


def _rss_bytes() -> int:
    """This process's peak resident set so far: VmHWM from /proc (Linux; reset by exec, unlike getrusage's
    ru_maxrss, which a child inherits from the parent that forked it), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _child(side: str, directory: str, dtype_name: str) -> dict:
    import torch  # noqa: F401  (imported before the clock starts, on both sides)

    from r4b_core.config import R4BConfig
    from r4b_weights import resolve_dtype

    dtype = resolve_dtype(dtype_name)
    if side == "ours":
        import r4b_weights.loader  # noqa: F401  (from_pretrained imports it; not part of the timed load)
        from r4b_core.models.r4b import R4BForConditionalGeneration

        def load() -> object:
            return R4BForConditionalGeneration.from_pretrained(directory, dtype=dtype)
    else:
        from r4b_core.reference.parity import load_reference_pretrained, reference_config

        reference_config(R4BConfig.from_pretrained(directory))  # imports transformers before the clock starts

        def load() -> object:
            return load_reference_pretrained(directory, dtype=dtype)
    after_import = _rss_bytes()
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return {"side": side, "load_s": seconds, "peak_rss_bytes": _rss_bytes(), "rss_after_import_bytes": after_import,
            "parameters": params}


def load_once(side: str, directory: Path, dtype_name: str, timeout_s: float = 900.0) -> dict:
    """Run one load in a fresh process; its result dict. A failed child is a RuntimeError with its stderr tail."""
    import torch

    command = [sys.executable, "-m", "r4b_core.bench.load", side, str(directory), dtype_name]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the parent's thread choice
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"the {side} load of {directory} failed in its subprocess (exit {done.returncode}): {tail}")
    return json.loads(lines[-1][len(_RESULT_PREFIX):])


def time_loads(directory: Path, dtype_name: str, repeats: int, sides: tuple[str, ...] = SIDES,
               progress: Callable[[str], None] = print) -> dict:
    """``repeats`` alternating fresh-process loads per side; medians, and ours/transformers ratios."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(repeats):
        for side in sides:
            progress(f"load {r + 1}/{repeats}: {side}, fresh process ...")
            runs[side].append(load_once(side, directory, dtype_name))
    result: dict = {"checkpoint": str(directory), "dtype": dtype_name}
    for side, values in runs.items():
        seconds = [v["load_s"] for v in values]
        result[side] = {"load_s_median": statistics.median(seconds), "load_s_min": min(seconds),
                        "load_s_max": max(seconds), "runs": len(values),
                        "peak_rss_bytes": statistics.median(v["peak_rss_bytes"] for v in values),
                        "rss_after_import_bytes": statistics.median(v["rss_after_import_bytes"] for v in values),
                        "parameters": values[0]["parameters"]}
    if set(SIDES) <= set(runs):
        ours, ref = result["ours"], result["transformers"]
        result["load_time_ratio_ours_vs_transformers"] = ours["load_s_median"] / ref["load_s_median"]
        result["peak_rss_ratio_ours_vs_transformers"] = ours["peak_rss_bytes"] / ref["peak_rss_bytes"]
        result["load_rss_increase_ratio_ours_vs_transformers"] = (
            (ours["peak_rss_bytes"] - ours["rss_after_import_bytes"])
            / max(ref["peak_rss_bytes"] - ref["rss_after_import_bytes"], 1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r4b_core.bench.load",
                                     description="one timed load in this process (r4b bench runs it)")
    parser.add_argument("side", choices=SIDES)
    parser.add_argument("directory")
    parser.add_argument("dtype")
    args = parser.parse_args(argv)
    print(_RESULT_PREFIX + json.dumps(_child(args.side, args.directory, args.dtype)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
