"""What a backend hands back for one (item, thinking mode) job: ``Generation``; and the thinking-token count."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Generation:
    """One generated reply, already split into its thinking and answer sections (scoring.split_answer)."""

    thinking: str
    answer: str
    thought: bool
    output_tokens: int  # generated tokens, </think> and the stop token included
    thinking_tokens: int | None  # tokens inside the thinking (tags excluded); None: the backend cannot tell
    seconds: float  # submit -> finish of this request (its latency, queueing included)
    finish_reason: str  # "stop" | "length" | "error" (...)


def thinking_token_count(tokens: list[int], thinking_mode: str, thought: bool, think_start: int | None,
                         think_end: int | None) -> int:
    """Generated tokens inside the thinking section (0 when the answer was not thought).

    ``long``: the prompt opened the thinking, so everything before the first ``</think>`` (all of it if the
    thinking never closed); otherwise the tokens between the first ``<think>`` and the ``</think>`` after it.
    """
    if not thought:
        return 0
    start = -1
    if thinking_mode != "long":
        if think_start not in tokens:
            return 0
        start = tokens.index(think_start)
    rest = tokens[start + 1:]
    return rest.index(think_end) if think_end in rest else len(rest)
