"""Multiple-choice extraction from an answer text: by option letter, then by option text.

Modelled on VLMEvalKit's rule-based matching (``can_infer_option`` then ``can_infer_text`` in
vlmeval/utils/matching_util.py), which it runs before falling back to a judge model; r4b has no
judge model, so what these rules cannot decide is "unparseable". Written from its documented
behaviour, not copied:

1. letters: punctuation ``.()[],:;!*#{}`` becomes spaces, the text is split on whitespace, and if
   exactly one option letter appears as a whole token (case-sensitive, so the article "a" is not
   option A) that letter is the answer; ``\\boxed{B}``, ``(B)``, ``B.``, ``Answer: B`` all work;
2. option text: if the answer is not longer than twice the options' total text, and exactly one
   option's text (lower-cased) is a substring of the lower-cased answer, that option's letter.

Divergences, deliberate: VLMEvalKit's refusal phrases (mapped to a "Z" option there) are simply
unparseable here, and recent VLMEvalKit versions' rule that the letter must not be among the last
tokens is not applied (it rejects a bare "B").
"""

from __future__ import annotations

import string

_PUNCTUATION_TO_SPACE = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def option_letters(options: dict[str, str] | None, gold: str | None = None) -> list[str]:
    """The candidate letters: the keys of ``options``; without options A-D (or up to the gold letter)."""
    if options:
        return [str(key) for key in options]
    last = "D"
    if gold and len(gold.strip()) == 1 and gold.strip().upper() in string.ascii_uppercase:
        last = max(last, gold.strip().upper())
    return list(string.ascii_uppercase[: string.ascii_uppercase.index(last) + 1])


def choice_by_letter(answer: str, letters: list[str]) -> str | None:
    """The one option letter that appears as a whole token of ``answer``, else None (none or several)."""
    tokens = set(answer.translate(_PUNCTUATION_TO_SPACE).split())
    found = [letter for letter in letters if letter in tokens]
    return found[0] if len(found) == 1 else None


def choice_by_text(answer: str, options: dict[str, str] | None) -> str | None:
    """The letter of the one option whose text occurs in ``answer`` (case-insensitive), else None."""
    if not options:
        return None
    texts = {str(letter): str(text).strip().lower() for letter, text in options.items()}
    if len(answer) > 2 * sum(len(text) for text in texts.values()):
        return None  # a long answer mentions many options; VLMEvalKit gives up here too
    lowered = answer.lower()
    found = [letter for letter, text in texts.items() if text and text in lowered]
    return found[0] if len(found) == 1 else None


def extract_choice(answer: str, options: dict[str, str] | None, gold: str | None = None) -> str | None:
    """The chosen option letter of ``answer`` (letter rule, then text rule), or None when undecidable."""
    letters = option_letters(options, gold)
    return choice_by_letter(answer, letters) or choice_by_text(answer, options)


def gold_letter(gold: str, options: dict[str, str] | None) -> str:
    """The gold answer as a letter: a letter as is, an option's text mapped to its letter."""
    stripped = gold.strip()
    if options and stripped not in options:
        for letter, text in options.items():
            if str(text).strip().lower() == stripped.lower():
                return str(letter)
    return stripped.upper() if len(stripped) == 1 else stripped
