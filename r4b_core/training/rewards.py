"""Rule-based rewards on a completed rollout: the answer after ``</think>`` checked against the gold one,
plus a format check.

    reward(completion) -> float          one rule
    RewardSet([("correct", correct_answer, 1.0), ("format", format_ok, 0.1)]).score(completions)
        -> totals [N] (the weighted sum) and each rule's values, for the logs

The answer check is r4b_core.scoring's (the one ``r4b eval`` uses): the thinking is split off first and
only the answer section is read; numbers and math through math-verify (a maintained verifier that
parses LaTeX / plain numbers and compares values symbolically: "12", "12.0" and "\\boxed{12}" agree),
multiple-choice letters through the option matcher, text by normalized exact match (lower case, no
punctuation, no articles). R-4B's BPO used rule-based answer rewards like these (math, checkable answers);
the format reward is r4b's addition for small models that have not yet learnt the template.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from r4b_core.processing.processor import THINK_END, THINK_START
from r4b_core.scoring.score import score_answer, split_answer


@dataclass(frozen=True)
class Completion:
    """What a reward sees of one rollout. ``text``: the decoded response with the mode prefix (so it starts
    with ``<think>`` in both forced modes); ``mode``: "long" / "short" (forced) or "auto"."""

    text: str
    mode: str
    finish_reason: str  # "eos" or "length"
    gold: str
    answer_type: str = "text"
    options: dict[str, str] | None = None


Reward = Callable[[Completion], float]


def correct_answer(c: Completion) -> float:
    """1.0 when the answer section is right (r4b_core.scoring.score_answer), else 0.0 (unparseable too)."""
    split = split_answer(c.text, started_in_thinking=False)
    return 1.0 if score_answer(split.answer, c.gold, c.answer_type, c.options).correct else 0.0


def format_ok(c: Completion) -> float:
    """1.0 when the response has the template's shape for its mode, else 0.0:

    ``<think>`` ... ``</think>`` exactly once each, in that order, at the start; a non-empty answer after
    it; ended by the stop token (not cut at the length limit); a thought in "long" mode, none in "short"
    (either in "auto")."""
    text = c.text.lstrip()
    if c.finish_reason != "eos" or not text.startswith(THINK_START):
        return 0.0
    if text.count(THINK_START) != 1 or text.count(THINK_END) != 1:
        return 0.0
    split = split_answer(text)
    if not split.answer:
        return 0.0
    if (c.mode == "long" and not split.thought) or (c.mode == "short" and split.thought):
        return 0.0
    return 1.0


class RewardSet:
    """Named rules with weights; ``score`` gives the weighted totals and every rule's values."""

    def __init__(self, rules: Sequence[tuple[str, Reward, float]]) -> None:
        if not rules:
            raise ValueError("RewardSet needs at least one (name, reward, weight) rule.")
        names = [name for name, _, _ in rules]
        if len(set(names)) != len(names):
            raise ValueError(f"RewardSet: rule names must differ; got {names}.")
        self.rules = list(rules)

    def score(self, completions: Sequence[Completion]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(totals [N], {rule name: values [N]}) as fp32 tensors."""
        parts = {name: torch.tensor([float(rule(c)) for c in completions], dtype=torch.float32)
                 for name, rule, _ in self.rules}
        total = torch.zeros(len(completions), dtype=torch.float32)
        for name, _, weight in self.rules:
            total += weight * parts[name]
        return total, parts


def default_rewards(format_weight: float = 0.1) -> RewardSet:
    """Correctness (weight 1) plus the format check (``format_weight``; 0 leaves it out)."""
    rules: list[tuple[str, Reward, float]] = [("correct", correct_answer, 1.0)]
    if format_weight:
        rules.append(("format", format_ok, format_weight))
    return RewardSet(rules)
