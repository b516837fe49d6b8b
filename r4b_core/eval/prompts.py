"""The user prompt of a benchmark item, the same for every thinking mode and backend.

Multiple choice follows the layout of VLMEvalKit's image-MCQ prompt (hint, question, one option per line,
then an instruction to pick one); open questions are the question itself, with a hint before it when the
item has one. The images come first in the message, then the text (as R-4B's chat template expects).
"""

from __future__ import annotations

from r4b_core.eval.benchmark import EvalItem

CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices."


def prompt_text(item: EvalItem) -> str:
    """The text part of the item's user message."""
    lines = []
    if item.hint:
        lines.append(f"Hint: {item.hint}")
    if item.options:
        lines.append(f"Question: {item.question}")
        lines.append("Options:")
        lines.extend(f"{letter}. {text}" for letter, text in item.options.items())
        lines.append(CHOICE_INSTRUCTION)
    else:
        lines.append(item.question)
    return "\n".join(lines)


def user_message(item: EvalItem, image_parts: list[dict]) -> dict:
    """One user message: ``image_parts`` (one content part per image, in the backend's form), then the text."""
    return {"role": "user", "content": [*image_parts, {"type": "text", "text": prompt_text(item)}]}
