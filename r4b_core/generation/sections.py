"""Generated token ids -> text deltas per section: the thinking and the answer.

    token ──<think> / </think>?──► switch section ("thinking" inside the thinking, else "answer";
                                   the tags themselves are never text)
          ──TextStreamer of that section (holds back an incomplete UTF-8 character)──► delta
          ──stop strings: cut at the first match (that section's text only), hold back a tail that
            could still become a match──► (section, delta) pairs

One streamer for every consumer: ``chat.ChatStream`` yields its pairs, and the server maps the two
sections onto OpenAI's fields at its edge (thinking -> ``reasoning_content``, answer -> ``content``).
The deltas are the raw text, never stripped: their concatenation is exactly ``text(section)``, so a
streamed response and a non-streamed one are equal. A prompt that opened the thinking (``long`` mode)
starts in "thinking".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

THINKING, ANSWER = "thinking", "answer"


class TextStreamer:
    """Turns a growing token list into UTF-8-safe text deltas.

    Byte-level BPE can split one character over several tokens; until the last character is
    complete the decoded text ends in U+FFFD, and that tail is held back.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[self.emitted:], len(text)
        return delta

    def flush(self) -> str:
        text = self.decode(self.ids)
        delta, self.emitted = text[self.emitted:], len(text)
        return delta


class SectionStreamer:
    """Feed tokens with ``push``; call ``finish`` once at the end. Both return [(section, delta)].

    ``think_start_id`` / ``think_end_id``: the tag ids (None: the vocabulary has none, all is answer).
    ``stop``: stop strings; after the first match nothing more is emitted and ``stopped`` is True.
    ``tokens[section]`` counts the tokens generated in each section (a tag counts for the thinking).
    """

    def __init__(self, decode: Callable[[list[int]], str], think_start_id: int | None, think_end_id: int | None,
                 in_thinking: bool = False, stop: Sequence[str] = ()) -> None:
        self.think_start_id, self.think_end_id = think_start_id, think_end_id
        self.section = THINKING if in_thinking else ANSWER
        self.thought = in_thinking  # the thinking was opened (by the prompt or a generated <think>)
        self.stop = [s for s in stop if s]
        self.streamers = {THINKING: TextStreamer(decode), ANSWER: TextStreamer(decode)}
        self.held = {THINKING: "", ANSWER: ""}  # text held back because it may start a stop string
        self.emitted = {THINKING: "", ANSWER: ""}
        self.tokens = {THINKING: 0, ANSWER: 0}
        self.stopped = False

    def push(self, token: int) -> list[tuple[str, str]]:
        if self.stopped:
            return []
        if token == self.think_start_id:
            self.section, self.thought = THINKING, True
            self.tokens[THINKING] += 1
            return []
        if token == self.think_end_id:
            self.tokens[THINKING] += 1
            out = self._flush(THINKING)
            self.section = ANSWER
            return out
        self.tokens[self.section] += 1
        return self._emit(self.section, self.streamers[self.section].push(token), final=False)

    def finish(self) -> list[tuple[str, str]]:
        return [*self._flush(THINKING), *self._flush(ANSWER)]

    def text(self, section: str) -> str:
        """Everything emitted in ``section`` so far (exactly the concatenated deltas)."""
        return self.emitted[section]

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
