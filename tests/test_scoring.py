"""r4b_core/scoring: fixed predictions against hand-written expectations."""

import pytest

from r4b_core.scoring import Score, score_answer, score_text, split_answer

OPTIONS = {"A": "a red cat", "B": "a blue dog", "C": "three birds", "D": "no animals"}


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"),
    ("B.", "B"),
    ("(C)", "C"),
    ("The answer is D.", "D"),
    ("Answer: A", "A"),
    ("\\boxed{C}", "C"),
    ("**B**: a blue dog", "B"),
    ("It shows a blue dog.", "B"),            # option text, no letter
    ("THREE BIRDS", "C"),                      # option text, case-insensitive
    ("a cat", None),                           # lower-case article is not option A; text matches nothing whole
    ("A or B", None),                          # two letters: undecidable
    ("I don't know", None),
    ("", None),
])
def test_choice_extraction(answer, expected):
    score = score_answer(answer, "B", "choice", OPTIONS)
    assert score.extracted == expected
    assert score.parseable is (expected is not None)
    assert score.correct is (expected == "B")


def test_choice_gold_given_as_option_text():
    assert score_answer("C", "three birds", "choice", OPTIONS).correct is True


def test_choice_without_options_uses_letters_only():
    assert score_answer("The answer is (B)", "B", "choice", None) == Score(True, "B", True)
    assert score_answer("blue dog", "B", "choice", None) == Score(False, None, False)


@pytest.mark.parametrize("answer, gold, correct, parseable", [
    ("42", "42", True, True),
    ("The answer is 42.", "42", True, True),
    ("0.5", "1/2", True, True),
    ("1,000", "1000", True, True),
    ("41", "42", False, True),
    ("$\\frac{3}{4}$", "0.75", True, True),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True, True),
    ("\\boxed{\\frac{2}{3}}", "\\frac{1}{2}", False, True),
    ("no number here", "7", False, False),
])
def test_number_and_math(answer, gold, correct, parseable):
    for answer_type in ("number", "math"):
        score = score_answer(answer, gold, answer_type)
        assert (score.correct, score.parseable) == (correct, parseable), (answer_type, answer)


def test_math_expression_equivalence():
    assert score_answer("$x^2 + 1$", "1 + x^2", "math").correct is True
    assert score_answer("$x^2 - 1$", "1 + x^2", "math").correct is False


@pytest.mark.parametrize("answer, gold, correct", [
    ("The Eiffel Tower.", "eiffel tower", True),
    ("  eiffel   TOWER ", "The Eiffel Tower", True),
    ("Big Ben", "eiffel tower", False),
])
def test_text_exact_match(answer, gold, correct):
    assert score_answer(answer, gold, "text").correct is correct


def test_text_unparseable_and_unlabelled():
    assert score_answer("...", "paris", "text") == Score(False, None, False)
    assert score_answer("Paris", "", "text").correct is None


def test_unknown_answer_type_is_refused():
    with pytest.raises(ValueError, match="answer_type"):
        score_answer("x", "x", "essay")


@pytest.mark.parametrize("text, started, expected", [
    ("<think>\nLet me look.\n</think>\n\nB", False, ("Let me look.", "B", True)),
    ("<think>\n\n</think>\n\nB", False, ("", "B", False)),
    ("B", False, ("", "B", False)),                               # short mode: the prompt held the empty thought
    ("Let me look.\n</think>\n\nB", True, ("Let me look.", "B", True)),   # long mode: prompt ended in <think>
    ("Let me look and look", True, ("Let me look and look", "", True)),   # long mode, thinking never finished
])
def test_split_answer(text, started, expected):
    assert tuple(split_answer(text, started_in_thinking=started)) == expected


def test_only_the_answer_section_is_scored():
    split, score = score_text("<think>Maybe A? No, B is wrong.</think>\n\nC", "C", "choice", OPTIONS)
    assert split.thought and score == Score(True, "C", True)
    _, unfinished = score_text("<think>It is B", "B", "choice", OPTIONS)
    assert unfinished == Score(False, None, False)


@pytest.mark.parametrize("text, mode, expected", [
    ("Let me look.\n</think>\n\nB", "long", ("Let me look.", "B", True)),
    ("still thinking", "long", ("still thinking", "", True)),
    ("B", "short", ("", "B", False)),
    ("<think>stray</think>B", "short", ("", "B", False)),      # short: never thought, by construction
    ("<think>\nhmm\n</think>\n\nB", "auto", ("hmm", "B", True)),
])
def test_split_answer_by_thinking_mode(text, mode, expected):
    assert tuple(split_answer(text, thinking_mode=mode)) == expected
