"""Generated token ids -> OpenAI text: reasoning vs content, UTF-8-safe deltas, stop strings.

    token ──<think> / </think>?──► switch section ("reasoning" inside the thinking, else "content";
                                   the tags themselves are never text)
          ──TextStreamer of that section (holds back an incomplete UTF-8 character)──► delta
          ──stop strings: cut at the first match (that section's text only), hold back a tail that
            could still become a match──► (section, delta) pairs

Like vLLM's reasoning parsers, the thinking goes to ``reasoning_content`` and the answer to ``content``.
A prompt that opened the thinking (``long`` mode) starts in "reasoning". The streamed deltas are
the raw text; ``reasoning_text()`` / ``content_text()`` give the non-streamed message (stripped, as
``chat()`` strips ``thinking`` / ``answer``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from r4b_core.generation.chat import TextStreamer

REASONING, CONTENT = "reasoning", "content"


class ChatOutput:
    """Feed tokens with ``push``; call ``finish`` once at the end. Both return [(section, delta)]."""

    def __init__(self, decode: Callable[[list[int]], str], think_start_id: int | None, think_end_id: int | None,
                 in_thinking: bool = False, stop: Sequence[str] = ()) -> None:
        self.think_start_id, self.think_end_id = think_start_id, think_end_id
        self.section = REASONING if in_thinking else CONTENT
        self.thought = in_thinking
        self.stop = [s for s in stop if s]
        self.streamers = {REASONING: TextStreamer(decode), CONTENT: TextStreamer(decode)}
        self.held = {REASONING: "", CONTENT: ""}  # text held back because it may start a stop string
        self.emitted = {REASONING: "", CONTENT: ""}
        self.stopped = False  # a stop string was found; nothing more is emitted

    def push(self, token: int) -> list[tuple[str, str]]:
        if self.stopped:
            return []
        if token == self.think_start_id:
            self.section, self.thought = REASONING, True
            return []
        if token == self.think_end_id:
            out = self._flush(REASONING)
            self.section = CONTENT
            return out
        return self._emit(self.section, self.streamers[self.section].push(token), final=False)

    def finish(self) -> list[tuple[str, str]]:
        return [*self._flush(REASONING), *self._flush(CONTENT)]

    def reasoning_text(self) -> str | None:
        """The thinking, stripped; None when the model did not think."""
        return self.emitted[REASONING].strip() if self.thought else None

    def content_text(self) -> str:
        return self.emitted[CONTENT].strip()

    # ------------------------------------------------------------------------------------------

    def _flush(self, section: str) -> list[tuple[str, str]]:
        if self.stopped:
            return []
        return self._emit(section, self.streamers[section].flush(), final=True)

    def _emit(self, section: str, delta: str, final: bool) -> list[tuple[str, str]]:
        text = self.held[section] + delta
        self.held[section] = ""
        if self.stop and text:
            hits = [i for i in (text.find(s) for s in self.stop) if i != -1]
            if hits:
                text, self.stopped = text[:min(hits)], True
            elif not final:
                keep = _partial_stop_suffix(text, self.stop)
                if keep:
                    text, self.held[section] = text[:-keep], text[-keep:]
        if not text:
            return []
        self.emitted[section] += text
        return [(section, text)]


def _partial_stop_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
