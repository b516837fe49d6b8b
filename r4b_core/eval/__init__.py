"""``r4b eval``: local benchmark files (VLMEvalKit TSV, JSONL), batched generation per thinking mode, per-mode reports.

Python API (docs/eval.md)::

    items = load_benchmark("bench.tsv", limit=None)              # -> [EvalItem]
    with LocalBackend(model, processor, max_new_tokens=1024) as backend:   # or RemoteBackend(base_url, ...)
        records, summary = evaluate(items, backend, ["auto", "long", "short"])
    score(item, mode, generation) -> record;  summarize(records) -> {mode: {...}};  format_table(summary)
"""

from r4b_core.eval.benchmark import BenchmarkFileError, EvalItem, load_benchmark
from r4b_core.eval.generation import Generation
from r4b_core.eval.output import EvalOutput
from r4b_core.eval.report import format_table, plot_png, summarize
from r4b_core.eval.runner import evaluate, expand_modes, score


def __getattr__(name: str):
    # the backends pull in torch and the engine (local) or nothing much (remote): imported on first use
    if name == "LocalBackend":
        from r4b_core.eval.local import LocalBackend

        return LocalBackend
    if name == "RemoteBackend":
        from r4b_core.eval.remote import RemoteBackend

        return RemoteBackend
    raise AttributeError(f"module 'r4b_core.eval' has no attribute {name!r}")


__all__ = ["BenchmarkFileError", "EvalItem", "EvalOutput", "Generation", "LocalBackend", "RemoteBackend",
           "evaluate", "expand_modes", "format_table", "load_benchmark", "plot_png", "score", "summarize"]
