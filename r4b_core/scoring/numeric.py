"""Numbers and math expressions checked with math-verify (HuggingFace's maintained verifier).

math-verify parses LaTeX (``\\frac{1}{2}``, ``\\boxed{..}``, ``$..$``) and plain expressions into sympy and
compares them (``0.5`` == ``1/2``, ``1,000`` == ``1000``, ``x^2+1`` == ``1+x^2``); r4b does no number
parsing of its own. Its timeouts use ``signal.alarm``, which works only on the main thread, so off the
main thread they are switched off (the answer text is capped at ``MAX_ANSWER_CHARS`` instead).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

MAX_ANSWER_CHARS = 4000  # the tail is kept: final answers come last
_TIMEOUT_S = 5


def _timeout() -> int | None:
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _quiet_math_verify() -> None:
    # math-verify logs a warning on every call made without a timeout
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def parse_math(text: str, *, gold: bool = False) -> list[Any]:
    """math-verify's parse of ``text`` (a list; empty when nothing could be parsed)."""
    try:
        from math_verify import parse
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("scoring numbers and math needs math-verify: pip install 'math-verify[antlr4_13_2]' "
                          "(or pip install -e '.[eval]')") from error
    _quiet_math_verify()
    text = text[-MAX_ANSWER_CHARS:]
    if gold and "$" not in text:
        text = f"${text}$"  # a bare gold answer, e.g. \frac{1}{2} or x^2+1, read as LaTeX
    return parse(text, parsing_timeout=_timeout())


def verify_math(gold: list[Any], predicted: list[Any]) -> bool:
    """math-verify's equivalence of two parsed answers."""
    from math_verify import verify

    _quiet_math_verify()
    if not gold or not predicted:
        return False
    return bool(verify(gold, predicted, timeout_seconds=_timeout()))


def shown(parsed: list[Any]) -> str | None:
    """A short text of a parsed answer for the predictions file (math-verify keeps the matched string last)."""
    if not parsed:
        return None
    return str(parsed[-1]) if isinstance(parsed[-1], str) else str(parsed[0])
