"""Per-mode report of prediction records: accuracy, thinking rate, tokens; the table and the plot.

``summarize(records)`` -> ``{mode: {...}}`` with, per thinking mode:

    items, labelled (items with a gold answer), correct, unparseable, accuracy (correct / labelled;
    unparseable answers count as wrong), by_category {category: {items, correct, accuracy}},
    thought (answers with a non-empty thinking section), thinking_rate (thought / items),
    accuracy_thought, accuracy_not_thought (accuracy within each group; None for an empty group),
    output_tokens / thinking_tokens {mean, median} (thinking over the records that know it),
    tokens_per_s (output tokens / request seconds, summed over the records: per-request decode speed)

Everything but tokens_per_s depends only on the set of records, not their order, so a resumed run
reports what an uninterrupted one does.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

MODES = ("auto", "long", "short")


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _accuracy(records: list[dict[str, Any]]) -> tuple[int, int, float | None]:
    labelled = [r for r in records if r.get("correct") is not None]
    correct = sum(1 for r in labelled if r["correct"])
    return len(labelled), correct, _ratio(correct, len(labelled))


def _stats(values: list[int]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None}
    return {"mean": statistics.fmean(values), "median": float(statistics.median(values))}


def summarize_mode(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The report of one mode's records (see the module docstring)."""
    labelled, correct, accuracy = _accuracy(records)
    by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_category[str(r.get("category") or "")].append(r)
    categories = {}
    for name in sorted(by_category):
        n, k, acc = _accuracy(by_category[name])
        categories[name or "(none)"] = {"items": len(by_category[name]), "correct": k, "accuracy": acc}
    thought = [r for r in records if r["thought"]]
    not_thought = [r for r in records if not r["thought"]]
    seconds = sum(r.get("seconds") or 0.0 for r in records)
    output_tokens = [int(r["output_tokens"]) for r in records]
    return {
        "items": len(records), "labelled": labelled, "correct": correct, "accuracy": accuracy,
        "unparseable": sum(1 for r in records if not r["parseable"]),
        "by_category": categories,
        "thought": len(thought), "thinking_rate": _ratio(len(thought), len(records)),
        "accuracy_thought": _accuracy(thought)[2], "accuracy_not_thought": _accuracy(not_thought)[2],
        "output_tokens": _stats(output_tokens),
        "thinking_tokens": _stats([int(r["thinking_tokens"]) for r in records if r.get("thinking_tokens") is not None]),
        "tokens_per_s": sum(output_tokens) / seconds if seconds > 0 else None,
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{mode: summarize_mode(records of that mode)}``, modes in auto, long, short order."""
    by_mode: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_mode[r["mode"]].append(r)
    order = [m for m in MODES if m in by_mode] + sorted(m for m in by_mode if m not in MODES)
    return {mode: summarize_mode(by_mode[mode]) for mode in order}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The summary as a plain-text table: one row per mode, then accuracy per category."""
    head = ("mode", "items", "acc", "unparse", "think%", "acc|thought", "acc|not", "out mean", "out med",
            "think mean", "tok/s")
    rows = [head]
    for mode, s in summary.items():
        rows.append((mode, str(s["items"]), _pct(s["accuracy"]), str(s["unparseable"]), _pct(s["thinking_rate"]),
                     _pct(s["accuracy_thought"]), _pct(s["accuracy_not_thought"]), _num(s["output_tokens"]["mean"]),
                     _num(s["output_tokens"]["median"]), _num(s["thinking_tokens"]["mean"]),
                     _num(s["tokens_per_s"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    categories = sorted({c for s in summary.values() for c in s["by_category"]})
    if len(categories) > 1:
        lines.append("")
        lines.append("accuracy by category: " + ", ".join(summary))
        width = max(len(c) for c in categories)
        for c in categories:
            cells = [_pct(s["by_category"].get(c, {}).get("accuracy")) for s in summary.values()]
            lines.append(f"  {c.ljust(width)}  " + "  ".join(cell.rjust(6) for cell in cells))
    return "\n".join(lines)


def plot_png(summary: dict[str, dict[str, Any]], title: str = "") -> bytes:
    """A PNG of accuracy against mean output tokens, one labelled point per mode (the paper's efficiency
    picture). Needs matplotlib (r4b's 'eval' extra); drawn on a bare Figure (no pyplot, no display)."""
    import io

    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 4), dpi=100)
    axes = figure.subplots()
    for mode, s in summary.items():
        x, y = s["output_tokens"]["mean"], s["accuracy"]
        if x is None or y is None:
            continue
        axes.scatter([x], [100 * y], s=60)
        axes.annotate(mode, (x, 100 * y), textcoords="offset points", xytext=(6, 6))
    axes.set_xlabel("mean output tokens per answer")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(title or "accuracy vs. output tokens by thinking mode")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
