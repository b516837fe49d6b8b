"""The thinking budget (r4b_core/generation/thinking_budget.py): the state machine, and on the synthetic checkpoint
the thinking stops at the budget and an answer follows, in the engine, in chat()/ChatStream and in
`r4b generate --max-thinking-tokens`."""

from __future__ import annotations

import json
import queue

import pytest

from r4b_core.generation.chat import ChatStream, chat
from r4b_core.generation.generate import generate
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.processing.processor import THINK_END, THINK_START, R4BProcessor
from r4b_core.serve.engine import Engine, EngineRequest
from r4b_core.generation.thinking_budget import ThinkingBudget, prompt_opens_thinking, thinking_budget_for, thinking_separator

QUESTION = [{"role": "user", "content": "How many circles are there?"}]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    directory = tiny_checkpoint  # the session's shared one (conftest.py): read-only; the model is this file's own
    return directory, R4BForConditionalGeneration.from_pretrained(directory), R4BProcessor.from_pretrained(directory)


def _ids(processor, token: str) -> int:
    return processor.tokenizer.token_to_id(token)


def _free_run(model, processor, mode: str, n: int) -> list[int]:
    """What the model writes without a budget."""
    ids = processor(messages=QUESTION, thinking_mode=mode)["input_ids"]
    return generate(model, ids, max_new_tokens=n, eos_token_ids=processor.eos_token_ids,
                    pad_token_id=processor.pad_token_id).tokens[0]



def test_thinking_budget_state_machine():
    start, end, sep = 1, 2, 9
    budget = ThinkingBudget(3, start, end, [end, sep], in_thinking=True)
    out = [budget(t) for t in (5, 6, 7, 8, 8, 8, 4)]
    assert out == [5, 6, 7, end, sep, 8, 4]  # 3 thinking tokens, then </think> + separator forced
    assert budget.thinking_tokens == 3 and budget.forced_tokens == 2 and not budget.in_thinking

    auto = ThinkingBudget(2, start, end, [end, sep])
    assert [auto(t) for t in (4, start, 5, 6, 7, 7, 3)] == [4, start, 5, 6, end, sep, 3]
    natural = ThinkingBudget(5, start, end, [end, sep], in_thinking=True)
    assert [natural(t) for t in (5, end, 6, 7, 8, 9, 10)] == [5, end, 6, 7, 8, 9, 10]  # closed by the model
    zero = ThinkingBudget(0, start, end, [end, sep], in_thinking=True)
    assert [zero(t) for t in (5, 6, 7)] == [end, sep, 7]
    unlimited = ThinkingBudget(None, start, end, [end, sep], in_thinking=True)
    assert [unlimited(t) for t in range(3, 40)] == list(range(3, 40))
    with pytest.raises(ValueError, match="max_thinking_tokens"):
        ThinkingBudget(-1, start, end, [end])
    with pytest.raises(ValueError, match="close_ids"):
        ThinkingBudget(1, start, end, [sep, end])
    assert prompt_opens_thinking([3, start, 4], start, end) and not prompt_opens_thinking([start, 4, end], start, end)


def test_engine_closes_the_thinking_at_the_budget_and_an_answer_follows(tiny):
    _, model, processor = tiny
    assert thinking_separator(processor) == "\n\n"  # read from the template's short-mode prompt
    think_start, think_end = _ids(processor, THINK_START), _ids(processor, THINK_END)
    prompt = processor(messages=QUESTION, thinking_mode="long")["input_ids"]
    free = _free_run(model, processor, "long", 40)
    assert think_end not in free[:20]  # without a budget the random model keeps thinking
    budget = thinking_budget_for(processor, prompt[0].tolist(), 6)
    assert budget.in_thinking and budget.close_ids[0] == think_end
    separator = budget.close_ids[1:]
    assert processor.decode(separator) == "\n\n"
    events: queue.Queue = queue.Queue()
    engine = Engine(model, max_batch_size=2, max_seq_len=128, eos_token_ids=processor.eos_token_ids,
                    pad_token_id=processor.pad_token_id).start()
    try:
        request = EngineRequest(prompt, 40, on_event=events.put, thinking_budget=budget)
        engine.submit(request)
        while events.get(timeout=60).kind != "finish":
            pass
    finally:
        engine.stop()
    tokens = request.tokens
    assert tokens[:6] == free[:6]  # the thinking is the model's own, up to the budget
    assert tokens[6] == think_end and tokens[7:7 + len(separator)] == separator
    answer = tokens[7 + len(separator):]
    assert answer and think_start not in answer
    assert processor.decode(answer).strip()  # an answer follows


def test_chat_and_chat_stream_stop_thinking_at_the_budget(tiny):
    _, model, processor = tiny
    think_end = _ids(processor, THINK_END)
    free = _free_run(model, processor, "long", 30)
    assert think_end not in free
    result = chat(model, processor, QUESTION, thinking_mode="long", max_new_tokens=30, max_thinking_tokens=4)
    assert result.tokens[:4] == free[:4] and result.tokens[4] == think_end
    assert result.thinking == processor.decode(free[:4]).strip()
    assert result.answer and result.answer == processor.decode(result.tokens[5:]).strip()
    stream = ChatStream(model, processor, QUESTION, thinking_mode="long", max_new_tokens=30, max_thinking_tokens=4)
    pieces = list(stream)
    assert stream.result.tokens == result.tokens
    sections = [s for s, _ in pieces]
    first_answer = sections.index("answer")
    assert sections[0] == "thinking" and "thinking" not in sections[first_answer:]
    assert "".join(d for s, d in pieces if s == "answer").strip() == result.answer
    unlimited = chat(model, processor, QUESTION, thinking_mode="long", max_new_tokens=30)
    assert unlimited.tokens == free and unlimited.answer == ""


def test_generate_command_max_thinking_tokens(tiny, capsys):
    from r4b_core.cli import main

    directory, _, processor = tiny
    assert main(["generate", "--model", str(directory), "--prompt", "How many circles are there?", "--thinking-mode",
                 "long", "--max-new-tokens", "30", "--max-thinking-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"][3] == _ids(processor, THINK_END) and out["answer"]
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--max-thinking-tokens", "-1"])
