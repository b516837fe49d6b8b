"""Answer extraction and checking after ``</think>``: option letters, option text, numbers and math
(math-verify), exact text; used by r4b eval and the training rewards.

Public API (imported by r4b_core/eval and r4b_core/training's rewards)::

    split_answer(text, *, started_in_thinking=False, thinking_mode=None) -> AnswerSplit(thinking, answer, thought)
    score_answer(answer, gold, answer_type, options=None) -> Score(correct, extracted, parseable)
    score_text(text, gold, answer_type, options=None, *, started_in_thinking=False, thinking_mode=None)
        -> (AnswerSplit, Score)
"""

from r4b_core.scoring.score import (ANSWER_TYPES, AnswerSplit, Score, normalize_text, score_answer, score_text,
                                    split_answer)

__all__ = ["ANSWER_TYPES", "AnswerSplit", "Score", "normalize_text", "score_answer", "score_text", "split_answer"]
