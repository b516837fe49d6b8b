"""A thinking budget: after N thinking tokens, close the thinking and let the model answer.

R-4B thinks between ``<think>`` and ``</think>``. With ``max_thinking_tokens = N``, once N tokens
have been generated inside the thinking, the next tokens are not sampled but forced: ``</think>``
and the chat template's separator after it (``"\\n\\n"`` in Qwen3's ChatML), as token ids; then
sampling resumes and the model writes its answer. The count starts when the thinking opens (the
prompt's own ``<think>`` in ``long`` mode, or a ``<think>`` the model writes in ``auto`` mode). The
forced tokens are generated tokens like the others: they count towards ``max_new_tokens``.

``ThinkingBudget`` is a per-sequence state machine over token ids, so every decoding loop can share
it: call it with each sampled token and emit (and feed back) what it returns. ``chat()`` /
``ChatStream`` and the server's engine use it.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_SEPARATOR = "\n\n"


class ThinkingBudget:
    """``budget(sampled_token) -> token to emit``; see the module docstring.

    ``close_ids``: the forced tokens, ``</think>`` first. ``in_thinking``: the prompt already opened
    the thinking (long mode). ``max_thinking_tokens=None`` never forces anything.
    """

    def __init__(self, max_thinking_tokens: int | None, think_start_id: int, think_end_id: int,
                 close_ids: Sequence[int], in_thinking: bool = False) -> None:
        if max_thinking_tokens is not None and (
                isinstance(max_thinking_tokens, bool) or not isinstance(max_thinking_tokens, int)
                or max_thinking_tokens < 0):
            raise ValueError(f"max_thinking_tokens must be an integer >= 0 (or None for no limit); "
                             f"got {max_thinking_tokens!r}.")
        if not close_ids or close_ids[0] != think_end_id:
            raise ValueError(f"close_ids must start with the </think> id {think_end_id}; got {list(close_ids)!r}.")
        self.max_thinking_tokens = max_thinking_tokens
        self.think_start_id, self.think_end_id = think_start_id, think_end_id
        self.close_ids = [int(i) for i in close_ids]
        self.in_thinking = in_thinking
        self.thinking_tokens = 0  # tokens generated inside the thinking (tags and forced tokens excluded)
        self.forced_tokens = 0  # tokens this budget forced so far
        self.pending: list[int] = []
        if in_thinking and max_thinking_tokens == 0:
            self.pending = list(self.close_ids)

    @property
    def exhausted(self) -> bool:
        """The budget closed (or is closing) the thinking."""
        return self.forced_tokens > 0 or bool(self.pending)

    def __call__(self, token: int) -> int:
        if self.pending:
            token = self.pending.pop(0)
            self.forced_tokens += 1
            self._observe(token, forced=True)
        else:
            self._observe(token, forced=False)
        return token

    def _observe(self, token: int, forced: bool) -> None:
        if token == self.think_start_id:
            self.in_thinking = True
            if self.max_thinking_tokens == 0 and not forced:
                self.pending = list(self.close_ids)
        elif token == self.think_end_id:
            self.in_thinking = False
        elif self.in_thinking and not forced and self.max_thinking_tokens is not None:
            self.thinking_tokens += 1
            if self.thinking_tokens >= self.max_thinking_tokens:
                self.pending = list(self.close_ids)


def prompt_opens_thinking(prompt_ids: Sequence[int], think_start_id: int, think_end_id: int) -> bool:
    """Whether the prompt ends inside an open thinking (its last ``<think>`` has no ``</think>`` after it)."""
    ids = list(prompt_ids)
    last_start = max((i for i, t in enumerate(ids) if t == think_start_id), default=-1)
    last_end = max((i for i, t in enumerate(ids) if t == think_end_id), default=-1)
    return last_start > last_end


def thinking_separator(processor) -> str:
    """What the chat template writes after ``</think>`` before the answer: read from its ``short``-mode
    generation prompt (an empty thought), else ``DEFAULT_SEPARATOR``."""
    from r4b_core.processing.processor import THINK_END, ChatTemplateError

    try:
        prompt = processor.apply_chat_template([{"role": "user", "content": "hi"}], thinking_mode="short")
    except (ChatTemplateError, ValueError):
        return DEFAULT_SEPARATOR
    cut = prompt.rfind(THINK_END)
    tail = prompt[cut + len(THINK_END):] if cut != -1 else ""
    return tail if tail and not tail.strip() else DEFAULT_SEPARATOR


def thinking_budget_for(processor, prompt_ids: Sequence[int], max_thinking_tokens: int | None) -> ThinkingBudget | None:
    """The budget of one prompt (None when ``max_thinking_tokens`` is None or the vocabulary lacks the tags)."""
    from r4b_core.processing.processor import THINK_END, THINK_START

    if max_thinking_tokens is None:
        return None
    start, end = processor.tokenizer.token_to_id(THINK_START), processor.tokenizer.token_to_id(THINK_END)
    if start is None or end is None:
        raise ValueError(f"max_thinking_tokens needs {THINK_START!r} and {THINK_END!r} in the vocabulary; "
                         "this tokenizer lacks them.")
    close = [end, *processor.encode(thinking_separator(processor), add_special_tokens=False)]
    return ThinkingBudget(max_thinking_tokens, start, end, close,
                          in_thinking=prompt_opens_thinking(prompt_ids, start, end))
