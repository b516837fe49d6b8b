"""Generated ids -> section text (r4b_core/generation/sections.py): UTF-8-safe deltas, thinking vs answer by
the <think> tokens, raw text (never stripped), stop strings cut exactly and held back while they may still
match."""

from __future__ import annotations

from r4b_core.processing.processor import THINK_END, THINK_START
from r4b_core.generation.sections import ANSWER, THINKING, SectionStreamer


def _output(tiny_processor, in_thinking: bool = False, stop=()) -> SectionStreamer:
    tok = tiny_processor.tokenizer
    return SectionStreamer(tiny_processor.decode, tok.token_to_id(THINK_START), tok.token_to_id(THINK_END),
                           in_thinking, stop)


def _run(output: SectionStreamer, ids: list[int]) -> list[tuple[str, str]]:
    pieces = []
    for token in ids:
        pieces += output.push(token)
    return pieces + output.finish()


def test_multibyte_characters_never_arrive_split(tiny_processor):
    text = "a 😀 b é ✓ 日本"
    ids = tiny_processor.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # the small byte-level BPE splits these characters over several tokens
    pieces = _run(_output(tiny_processor), ids)
    assert all("\ufffd" not in delta for _, delta in pieces)
    assert "".join(delta for _, delta in pieces) == text and {s for s, _ in pieces} == {ANSWER}


def test_think_tokens_switch_sections_and_are_not_text(tiny_processor):
    tok = tiny_processor.tokenizer
    think, end = tok.token_to_id(THINK_START), tok.token_to_id(THINK_END)
    ids = [think, *tiny_processor.encode("count the shapes", add_special_tokens=False), end,
           *tiny_processor.encode("\n\nThe answer is 3.", add_special_tokens=False), *tiny_processor.eos_token_ids[:1]]
    output = _output(tiny_processor)
    pieces = _run(output, ids)
    assert "".join(d for s, d in pieces if s == THINKING) == "count the shapes"
    assert "".join(d for s, d in pieces if s == ANSWER) == "\n\nThe answer is 3."  # eos is not text
    assert output.text(THINKING) == "count the shapes" and output.text(ANSWER) == "\n\nThe answer is 3."
    assert output.thought and output.tokens[THINKING] == len(ids) - output.tokens[ANSWER]
    long = _output(tiny_processor, in_thinking=True)  # long mode: the prompt opened <think>
    _run(long, [*tiny_processor.encode("hmm", add_special_tokens=False), end,
                *tiny_processor.encode("ok", add_special_tokens=False)])
    assert long.thought and long.text(THINKING) == "hmm" and long.text(ANSWER) == "ok"
    short = _output(tiny_processor)
    _run(short, tiny_processor.encode("ok", add_special_tokens=False))
    assert not short.thought and short.text(ANSWER) == "ok"


def test_stop_strings_are_cut_exactly_and_held_back_until_decided(tiny_processor):
    text = "The picture shows a red square, a blue circle and a green triangle."
    ids = tiny_processor.encode(text, add_special_tokens=False)
    output = _output(tiny_processor, stop=["blue circle", "zzz"])
    pieces, stopped_at = [], None
    for i, token in enumerate(ids):
        pieces += output.push(token)
        if output.stopped and stopped_at is None:
            stopped_at = i
    pieces += output.finish()
    streamed = "".join(d for _, d in pieces)
    assert streamed == "The picture shows a red square, a "
    assert "blue" not in streamed and stopped_at is not None and stopped_at < len(ids) - 1
    # a partial match is held back, then released when it turns out not to be a stop string
    partial = _output(tiny_processor, stop=["square, a green"])
    held = []
    for token in ids:
        partial.push(token)
        held.append(partial.held[ANSWER])
    partial.finish()
    assert any(h.startswith("square") for h in held)
    assert partial.emitted[ANSWER] == text and not partial.stopped
