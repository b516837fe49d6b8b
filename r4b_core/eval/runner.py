"""Run a benchmark through a backend for each thinking mode; score every reply; write and report.

    evaluate(items, backend, modes, out=EvalOutput | None)
      for each mode (auto, long, short: the same prompts): the jobs not already in ``out``
        ──backend.generate (batched / concurrent)──► Generation ──score()──► record ──► out.append
      ──► summarize(all records) (report.py)

``score(item, mode, generation)`` is the record of one reply (the predictions file's line): id, mode,
category, answer_type, gold, thinking, answer, thought, extracted, parseable, correct, output_tokens,
thinking_tokens, seconds, finish_reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from r4b_core.eval.benchmark import EvalItem
from r4b_core.eval.generation import Generation
from r4b_core.eval.output import EvalOutput
from r4b_core.eval.progress import Progress
from r4b_core.eval.report import MODES, summarize
from r4b_core.scoring import score_answer


class Backend(Protocol):
    name: str

    def generate(self, jobs: Iterable[tuple[EvalItem, str]]): ...  # -> Iterator[(item, mode, Generation)]


def expand_modes(thinking_mode: str) -> list[str]:
    """``--thinking-mode``: one of auto / long / short, or ``all`` (the three, in that order)."""
    if thinking_mode == "all":
        return list(MODES)
    if thinking_mode not in MODES:
        raise ValueError(f"thinking mode must be one of auto, long, short, all; got {thinking_mode!r}.")
    return [thinking_mode]


def score(item: EvalItem, mode: str, generation: Generation) -> dict[str, Any]:
    """The prediction record of one reply: its answer section scored against the item's gold answer."""
    result = score_answer(generation.answer, item.answer, item.answer_type, item.options)
    return {"id": item.id, "mode": mode, "category": item.category, "answer_type": item.answer_type,
            "gold": item.answer, "thinking": generation.thinking, "answer": generation.answer,
            "thought": generation.thought, "extracted": result.extracted, "parseable": result.parseable,
            "correct": result.correct, "output_tokens": generation.output_tokens,
            "thinking_tokens": generation.thinking_tokens, "seconds": round(generation.seconds, 4),
            "finish_reason": generation.finish_reason}


def evaluate(items: list[EvalItem], backend: Backend, modes: Iterable[str] = ("auto",), *,
             out: EvalOutput | None = None, progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(records, summary) of ``items`` under each mode; with ``out``, done (item, mode) pairs are skipped and
    every new record is appended as it finishes (a Ctrl-C keeps all finished ones). Records of items
    not in ``items`` (an earlier run with a larger --limit) are left out of the summary."""
    modes = list(modes)
    wanted = {(item.id, mode) for item in items for mode in modes}
    records = [r for r in (out.records if out is not None else []) if (r["id"], r["mode"]) in wanted]
    done = {(r["id"], r["mode"]) for r in records}
    for mode in modes:
        jobs = [(item, mode) for item in items if (item.id, mode) not in done]
        if not jobs:
            continue
        bar = Progress(len(jobs), f"{mode}") if progress else None
        try:
            for item, job_mode, generation in backend.generate(jobs):
                record = score(item, job_mode, generation)
                if out is not None:
                    out.append(record)
                records.append(record)
                if bar is not None:
                    bar.update()
        finally:
            if bar is not None:
                bar.close()
    return records, summarize(records)
