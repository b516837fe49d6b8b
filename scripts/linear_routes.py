"""The CPU decode routes tried for issue 13, timed side by side (the figures in BENCHMARKS.md).

    python scripts/linear_routes.py gemv  [--rows 1] [--repeats 15]   one [rows, 1024] x [151936, 1024]^T product
    python scripts/linear_routes.py steps [--batch 1] [--repeats 8]   whole decode steps of the small preset

``gemv`` times the lm_head product of the small preset (the largest weight a decode step reads) by
each route: fp32 and bf16 ``F.linear``, oneDNN with the weight prepacked (``mkldnn._linear_pointwise``),
``torch._C._nn.mkldnn_linear`` on an mkldnn-layout weight, ``aten._weight_int8pack_mm`` (int8 weight,
bf16 activations), and inductor-generated reductions (bf16 and int8 weights), plus a 256 MB copy.
``steps`` times decode steps of the whole small-preset decoder (prompt 128, batch ``--batch``) in
float32, plain bf16, prepacked bf16, int8, and compiled: default inductor, inductor with freezing, and
freezing + max-autotune (inductor's C++ GEMM templates); ``--routes`` picks a subset. Routes
alternate round by round in one process; medians (and min) are printed. Use ``--threads`` to set torch's
thread count (on a shared machine, 1 gives the steadiest comparison).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

GEMV_ROUTES = ("fp32-linear", "fp32-prepacked", "bf16-linear", "bf16-prepacked", "bf16-mkldnn-linear",
               "int8-pack-mm", "bf16-inductor-reduction", "int8-inductor-reduction", "copy")
STEP_ROUTES = ("fp32", "fp32-prepacked", "bf16", "bf16-prepacked", "int8", "fp32-compiled", "bf16-compiled",
               "bf16-compiled-freezing", "bf16-compiled-freezing-autotune", "int8-compiled")


def alternate(routes: dict[str, Callable[[], object]], repeats: int, warm_up: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each route, the routes taking turns in every round."""
    for fn in routes.values():
        for _ in range(warm_up):
            fn()
    times: dict[str, list[float]] = {name: [] for name in routes}
    for _ in range(repeats):
        for name, fn in routes.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def gemv_routes(rows: int, chosen: tuple[str, ...]) -> dict[str, tuple[Callable[[], object], int]]:
    """route -> (call, bytes of weight it reads) for the lm_head product of the small preset."""
    n, k = 151936, 1024
    gen = torch.Generator().manual_seed(0)
    w32 = torch.randn(n, k, generator=gen) * 0.02
    x32 = torch.randn(rows, k, generator=gen)
    wb, xb = w32.bfloat16(), x32.bfloat16()
    scales = (w32.abs().amax(1) / 127).bfloat16()
    w8 = torch.round(w32 / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)

    def reduction(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # [M, K] x [N, K] -> [M, N], fp32 sums
        return (x[:, None, :].float() * w[None].float()).sum(-1)

    routes: dict[str, tuple[Callable[[], object], int]] = {}
    for name in chosen:
        if name == "fp32-linear":
            routes[name] = (lambda: F.linear(x32, w32), 4 * n * k)
        elif name == "fp32-prepacked":
            packed32 = torch.ops.mkldnn._reorder_linear_weight(w32, rows)
            routes[name] = (lambda p=packed32: torch.ops.mkldnn._linear_pointwise(x32, p, None, "none", [], ""),
                            4 * n * k)
        elif name == "bf16-linear":
            routes[name] = (lambda: F.linear(xb, wb), 2 * n * k)
        elif name == "bf16-prepacked":
            packed = torch.ops.mkldnn._reorder_linear_weight(wb, rows)
            routes[name] = (lambda p=packed: torch.ops.mkldnn._linear_pointwise(xb, p, None, "none", [], ""), 2 * n * k)
        elif name == "bf16-mkldnn-linear":
            wm = wb.to_mkldnn()
            routes[name] = (lambda: torch._C._nn.mkldnn_linear(xb.to_mkldnn(), wm, None).to_dense(), 2 * n * k)
        elif name == "int8-pack-mm":
            routes[name] = (lambda: torch.ops.aten._weight_int8pack_mm(xb, w8, scales), n * k)
        elif name == "bf16-inductor-reduction":
            compiled = torch.compile(reduction, dynamic=False)
            routes[name] = (lambda c=compiled: c(x32, wb), 2 * n * k)
        elif name == "int8-inductor-reduction":
            compiled = torch.compile(reduction, dynamic=False)
            routes[name] = (lambda c=compiled: c(x32, w8) * scales.float(), n * k)
        elif name == "copy":
            src = torch.randn(64 * 1024**2)  # written pages: an untouched tensor reads the shared zero page
            dst = torch.empty_like(src)
            routes[name] = (lambda: dst.copy_(src), 2 * src.numel() * 4)
    return routes


def step_routes(batch: int, chosen: tuple[str, ...]) -> dict[str, Callable[[], object]]:
    """route -> one decode step of the small preset (prompt of 128 tokens already in the cache)."""
    from r4b_core.config import preset
    from r4b_core.generation.generate import decode_step, prefill
    from r4b_core.models.kv_cache import KVCache
    from r4b_core.models.fast_linears import quantize_model
    from r4b_core.reference.synthetic import build_synthetic_model

    base = build_synthetic_model(preset("small"), seed=0, dtype=torch.float32)
    ids = torch.randint(0, 1000, (batch, 128), generator=torch.Generator().manual_seed(0))
    routes: dict[str, Callable[[], object]] = {}
    for name in chosen:
        dtype = torch.float32 if name.startswith("fp32") else torch.bfloat16
        model = base if name in ("fp32", "fp32-compiled") else copy.deepcopy(base)
        if name.startswith("int8"):
            quantize_model(model, "int8")
        model = model.to(dtype)
        if name.endswith("prepacked"):
            quantize_model(model, "prepacked")
        step: Callable = decode_step
        config: dict = {}
        if "compiled" in name:
            # freezing is read while dynamo traces (parameters become constants), i.e. at the first call:
            # patched around every call, not passed as compile options
            config = {"freezing": "freezing" in name, "max_autotune": "autotune" in name}
            # a code object of its own per route: dynamo caches compiled graphs per code object, and its guards
            # would let one route run another's graph
            own = types.FunctionType(decode_step.__code__.replace(co_name=name.replace("-", "_")),
                                     decode_step.__globals__, name.replace("-", "_"))
            step = torch.compile(own, fullgraph=True, dynamic=False)
        cache = KVCache.for_model(model.config.text_config, batch, 256, dtype=dtype)
        with torch.inference_mode():
            prefill(model, ids, cache)

        def run(model=model, cache=cache, step=step, config=config) -> None:
            with torch.inference_mode(), torch._inductor.config.patch(config):
                cache.seq_lens.fill_(128)  # the same position every call: a steady context length
                step(model, ids[:, -1:], cache)

        routes[name] = run
    return routes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["gemv", "steps"])
    parser.add_argument("--routes", help="comma-separated subset of the routes (default: all)")
    parser.add_argument("--rows", type=int, default=1, help="gemv: rows of the activation (batch)")
    parser.add_argument("--batch", type=int, default=1, help="steps: sequences per decode step")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    every = GEMV_ROUTES if args.what == "gemv" else STEP_ROUTES
    chosen = tuple(args.routes.split(",")) if args.routes else every
    unknown = [r for r in chosen if r not in every]
    if unknown:
        parser.error(f"unknown routes {unknown}; choose from {', '.join(every)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.what}, "
          f"{'rows ' + str(args.rows) if args.what == 'gemv' else 'batch ' + str(args.batch)}")
    if args.what == "gemv":
        routes = gemv_routes(args.rows, chosen)
        times = alternate({k: fn for k, (fn, _) in routes.items()}, args.repeats)
        for name, values in times.items():
            med = statistics.median(values)
            print(f"{name:<26} {1e3 * med:8.2f} ms median (min {1e3 * min(values):.2f})  "
                  f"{routes[name][1] / med / 1e9:5.1f} GB/s")
    else:
        times = alternate(step_routes(args.batch, chosen), args.repeats)
        for name, values in times.items():
            med = statistics.median(values)
            print(f"{name:<32} {1e3 * med:8.2f} ms median (min {1e3 * min(values):.2f})  "
                  f"{args.batch / med:7.1f} tokens/s")


if __name__ == "__main__":
    main()
