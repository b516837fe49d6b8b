"""Score one generated answer: split off the thinking, then check only the answer section.

    split_answer(text)                       -> AnswerSplit(thinking, answer, thought)
    score_answer(answer, gold, answer_type)  -> Score(correct, extracted, parseable)

``answer_type``: ``choice`` (option letter, then option text; scoring/choice.py), ``number`` and ``math``
(math-verify; scoring/numeric.py), ``text`` (normalized exact match). An answer whose choice / value
cannot be found is *unparseable*: ``parseable=False``, ``correct=False``, counted separately in reports.
An empty gold answer gives ``correct=None`` (unlabelled item).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import NamedTuple

from r4b_core.generation.chat import split_thinking
from r4b_core.scoring.choice import extract_choice, gold_letter
from r4b_core.scoring.numeric import parse_math, shown, verify_math

ANSWER_TYPES = ("choice", "number", "math", "text")


class AnswerSplit(NamedTuple):
    thinking: str  # "" when the model did not think
    answer: str  # the text after </think> (the whole text when there is no thinking section)
    thought: bool  # a non-empty thinking section


@dataclass(frozen=True)
class Score:
    correct: bool | None  # None: no gold answer to compare with
    extracted: str | None  # the option letter / value / normalized text found in the answer
    parseable: bool  # False: no choice or value could be found in the answer


def split_answer(text: str, *, started_in_thinking: bool = False, thinking_mode: str | None = None) -> AnswerSplit:
    """Thinking and answer sections of a generated text (the text the model produced, not the prompt).

    ``started_in_thinking``: the prompt ended inside ``<think>`` (``long`` mode), so text without any
    ``</think>`` is all unfinished thinking and the answer is empty. ``thinking_mode`` (the mode the
    prompt was built with) sets it: ``long`` opens the thinking; ``short`` closed it with an empty thought,
    so the answer never counts as thought (any stray ``<think>..</think>`` the model writes is dropped
    from the answer, not counted as thinking); ``auto`` / None: the tags decide. The tags follow
    generation/chat.py's ``split_thinking``.
    """
    if thinking_mode == "long":
        started_in_thinking = True
    if started_in_thinking and "</think>" not in text and "<think>" not in text:
        thinking = text.strip()
        return AnswerSplit(thinking, "", bool(thinking))
    thinking, answer = split_thinking(text)
    if thinking_mode == "short":
        return AnswerSplit("", answer.strip(), False)
    thinking = (thinking or "").strip()
    return AnswerSplit(thinking, answer.strip(), bool(thinking))


def normalize_text(text: str) -> str:
    """Lower case, no punctuation, no articles (a/an/the), single spaces (SQuAD-style normalization)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def score_answer(answer: str, gold: str, answer_type: str, options: dict[str, str] | None = None) -> Score:
    """Check ``answer`` (the answer section only) against ``gold``; see the module docstring."""
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {', '.join(ANSWER_TYPES)}; got {answer_type!r}")
    gold = "" if gold is None else str(gold)
    labelled = bool(gold.strip())
    if answer_type == "choice":
        extracted = extract_choice(answer, options, gold if labelled else None)
        if extracted is None:
            return Score(False if labelled else None, None, False)
        return Score(extracted == gold_letter(gold, options) if labelled else None, extracted, True)
    if answer_type in ("number", "math"):
        predicted = parse_math(answer)
        if not predicted:
            return Score(False if labelled else None, None, False)
        correct = verify_math(parse_math(gold, gold=True), predicted) if labelled else None
        return Score(correct, shown(predicted), True)
    normalized = normalize_text(answer)
    if not normalized:
        return Score(False if labelled else None, None, False)
    return Score(normalized == normalize_text(gold) if labelled else None, normalized, True)


def score_text(text: str, gold: str, answer_type: str, options: dict[str, str] | None = None, *,
               started_in_thinking: bool = False, thinking_mode: str | None = None) -> tuple[AnswerSplit, Score]:
    """Split a whole generated text (``split_answer``) and score its answer section."""
    split = split_answer(text, started_in_thinking=started_in_thinking, thinking_mode=thinking_mode)
    return split, score_answer(split.answer, gold, answer_type, options)
