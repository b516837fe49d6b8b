"""What ``r4b parity`` reports: one ``Stage`` per compared activation, gathered in a ``ParityReport``.

A stage holds the largest absolute difference between r4b's and the reference's tensor, the tolerance,
and how many NaN / Inf values each side's tensor holds, so a broken checkpoint (a NaN weight) still gives
the full table with the stage where the non-finite values first appear marked: NaN never passes, and the
first failing stage is the reported divergence. ``table()`` is the text the command prints, ``as_dict()``
its ``--json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Tolerances per compute dtype: (activations, logits). Pixel values and greedy tokens must be exact.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 2.5e-1), torch.float16: (1e-2, 5e-2)}


def nonfinite_counts(t: torch.Tensor | None) -> dict[str, int]:
    """{"nan": n, "inf": m} of a tensor (zeros for None or an integer tensor)."""
    if t is None or not t.is_floating_point():
        return {"nan": 0, "inf": 0}
    return {"nan": int(torch.isnan(t).sum()), "inf": int(torch.isinf(t).sum())}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |a - b| (inf for different shapes, NaN where either side holds NaN)."""
    if a.shape != b.shape:
        return float("inf")
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class Stage:
    name: str
    max_abs_diff: float
    tolerance: float
    skipped: str | None = None  # why the reference could not give this stage (remote code only)
    nonfinite: dict[str, dict[str, int]] = field(default_factory=dict)  # {"r4b": {"nan", "inf"}, "reference": ...}
    note: str | None = None  # why a failing stage could not be computed (e.g. no greedy tokens from NaN logits)

    @classmethod
    def compared(cls, name: str, ours: torch.Tensor, theirs: torch.Tensor, tolerance: float) -> "Stage":
        return cls(name, max_abs_diff(ours, theirs), tolerance,
                   nonfinite={"r4b": nonfinite_counts(ours), "reference": nonfinite_counts(theirs)})

    @property
    def passed(self) -> bool:
        if self.skipped is not None:
            return True
        return self.max_abs_diff <= self.tolerance and not self.has_nonfinite  # NaN never passes

    @property
    def has_nonfinite(self) -> bool:
        return any(n for side in self.nonfinite.values() for n in side.values())

    def nonfinite_text(self) -> str:
        """e.g. 'r4b 12 NaN; reference 12 NaN 3 Inf' ('' when every value is finite)."""
        parts = []
        for side, counts in self.nonfinite.items():
            found = " ".join(f"{n} {kind.upper() if kind == 'nan' else 'Inf'}".replace("NAN", "NaN")
                             for kind, n in counts.items() if n)
            if found:
                parts.append(f"{side} {found}")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        d = {"name": self.name, "max_abs_diff": _json_number(self.max_abs_diff), "tolerance": self.tolerance,
             "passed": self.passed}
        if self.nonfinite:
            d["nonfinite"] = self.nonfinite
        if self.skipped:
            d["skipped"] = self.skipped
        if self.note:
            d["note"] = self.note
        return d


@dataclass
class ParityReport:
    checkpoint: str
    dtype: str
    stages: list[Stage]

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.stages)

    @property
    def first_divergence(self) -> str | None:
        return next((s.name for s in self.stages if not s.passed), None)

    @property
    def logits_max_abs_diff(self) -> float:
        return next(s.max_abs_diff for s in self.stages if s.name == "logits")

    def as_dict(self) -> dict:
        """The ``--json`` object: strict JSON, a difference that is NaN or Inf (non-finite values, shapes that
        differ) is null there (the stage's ``passed`` and ``nonfinite`` say why)."""
        return {"passed": self.passed, "checkpoint": self.checkpoint, "dtype": self.dtype,
                "first_divergence": self.first_divergence,
                "logits_max_abs_diff": _json_number(self.logits_max_abs_diff),
                "stages": [s.as_dict() for s in self.stages]}

    def table(self) -> str:
        lines = [f"{'stage':<28} {'max abs diff':>14} {'tolerance':>11}  result"]
        first = self.first_divergence
        for s in self.stages:
            if s.skipped:
                value = "n/a" if s.max_abs_diff != s.max_abs_diff else f"{s.max_abs_diff:.3e}"  # NaN: n/a
                lines.append(f"{s.name:<28} {value:>14} {s.tolerance:>11.1e}  skipped: {s.skipped}")
                continue
            result = "ok" if s.passed else "FAIL" + (" <- first divergence" if s.name == first else "")
            extra = "; ".join(x for x in (s.nonfinite_text() and f"non-finite: {s.nonfinite_text()}", s.note) if x)
            lines.append(f"{s.name:<28} {s.max_abs_diff:>14.3e} {s.tolerance:>11.1e}  {result}"
                         + (f"  ({extra})" if extra else ""))
        verdict = "PASSED: every stage within tolerance" if self.passed else (
            f"FAILED: first divergence at '{first}'")
        first_stage = next((s for s in self.stages if s.name == first), None)
        if first_stage is not None and first_stage.nonfinite and all(any(side.values()) for side in
                                                                     first_stage.nonfinite.values()):
            verdict += (" (NaN/Inf on both sides from there on: the checkpoint's weights or the dtype, not r4b's "
                        "code; check them with r4b inspect --load)")
        return "\n".join(lines + [verdict])
