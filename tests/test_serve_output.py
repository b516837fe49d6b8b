"""Generated ids -> OpenAI text (r4b_core/serve/output.py): UTF-8-safe deltas, reasoning vs content by the
<think> tokens, stop strings cut exactly and held back while they may still match."""

from __future__ import annotations

import pytest

from r4b_core.processing.processor import THINK_END, THINK_START, R4BProcessor
from r4b_core.serve.output import CONTENT, REASONING, ChatOutput


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return R4BProcessor.from_pretrained(tiny_checkpoint)  # the session's shared checkpoint (conftest.py)


def _output(processor, in_thinking: bool = False, stop=()) -> ChatOutput:
    tok = processor.tokenizer
    return ChatOutput(processor.decode, tok.token_to_id(THINK_START), tok.token_to_id(THINK_END), in_thinking, stop)


def _run(output: ChatOutput, ids: list[int]) -> list[tuple[str, str]]:
    pieces = []
    for token in ids:
        pieces += output.push(token)
    return pieces + output.finish()


def test_multibyte_characters_never_arrive_split(processor):
    text = "a 😀 b é ✓ 日本"
    ids = processor.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # the small byte-level BPE splits these characters over several tokens
    pieces = _run(_output(processor), ids)
    assert all("\ufffd" not in delta for _, delta in pieces)
    assert "".join(delta for _, delta in pieces) == text and {s for s, _ in pieces} == {CONTENT}


def test_think_tokens_switch_sections_and_are_not_text(processor):
    tok = processor.tokenizer
    think, end = tok.token_to_id(THINK_START), tok.token_to_id(THINK_END)
    ids = [think, *processor.encode("count the shapes", add_special_tokens=False), end,
           *processor.encode("\n\nThe answer is 3.", add_special_tokens=False), *processor.eos_token_ids[:1]]
    output = _output(processor)
    pieces = _run(output, ids)
    assert "".join(d for s, d in pieces if s == REASONING) == "count the shapes"
    assert "".join(d for s, d in pieces if s == CONTENT) == "\n\nThe answer is 3."  # eos is not text
    assert output.reasoning_text() == "count the shapes" and output.content_text() == "The answer is 3."
    long = _output(processor, in_thinking=True)  # long mode: the prompt opened <think>
    _run(long, [*processor.encode("hmm", add_special_tokens=False), end,
                *processor.encode("ok", add_special_tokens=False)])
    assert long.reasoning_text() == "hmm" and long.content_text() == "ok"
    short = _output(processor)
    _run(short, processor.encode("ok", add_special_tokens=False))
    assert short.reasoning_text() is None and short.content_text() == "ok"


def test_stop_strings_are_cut_exactly_and_held_back_until_decided(processor):
    text = "The picture shows a red square, a blue circle and a green triangle."
    ids = processor.encode(text, add_special_tokens=False)
    output = _output(processor, stop=["blue circle", "zzz"])
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
    partial = _output(processor, stop=["square, a green"])
    held = []
    for token in ids:
        partial.push(token)
        held.append(partial.held[CONTENT])
    partial.finish()
    assert any(h.startswith("square") for h in held)
    assert partial.emitted[CONTENT] == text and not partial.stopped
