"""vLLM-style cases for `r4b serve` through the real `openai` client (tiny fp32 checkpoint, loopback server):
logprobs equal to the model's own log-softmax (a forward computed here), plain and streamed; n choices;
return_token_ids; stop_token_ids; min_tokens; include_reasoning; thinking_token_budget; strict validation
(Content-Type, int64 seed, image_url objects, roles, GET /v1/models/{id}); /v1/completions with text and
token-id prompts, echo, prompt logprobs, max_tokens 0, stop and streaming; response_format json_object /
json_schema constrained by llguidance, always valid on random weights."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import torch
from openai import OpenAI

from r4b_core.generation.generate import GenerationConfig
from r4b_core.serve.api import ServerConfig, create_app
from r4b_core.serve.engine import Engine
from r4b_core.serve.server import BackgroundServer

MODEL = "r4b-tiny"
TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tiny_model, tiny_processor):
    processor = tiny_processor
    engine = Engine(tiny_model, max_batch_size=8, max_seq_len=320, max_queue=32,
                    eos_token_ids=processor.eos_token_ids, pad_token_id=processor.pad_token_id)
    app = create_app(engine, processor, ServerConfig(MODEL, generation_config=GenerationConfig.from_pretrained(
        tiny_checkpoint)))
    server = BackgroundServer(app, engine).start()
    yield {"model": tiny_model, "processor": processor, "url": server.url}
    server.stop()


@pytest.fixture(scope="module")
def client(setup) -> OpenAI:
    return OpenAI(base_url=setup["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _chat(client, text="Describe the shapes.", mode="short", max_tokens=12, **extra):
    return client.chat.completions.create(model=MODEL, messages=_user(text), max_tokens=max_tokens,
                                          extra_body={"chat_template_kwargs": {"thinking_mode": mode}, **extra})


def _prompt_ids(setup, text: str, mode: str = "short") -> list[int]:
    return setup["processor"](messages=_user(text), thinking_mode=mode)["input_ids"][0].tolist()


def _forward_logprobs(setup, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's fp32 logits at every position of ``ids`` (no cache): [T, V]."""
    with torch.no_grad():
        logits = setup["model"](torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


# ---------------------------------------------------------------------------------------------
# logprobs


def test_chat_logprobs_equal_the_models_log_softmax_plain_and_streamed(setup, client):
    text = "Count the shapes."
    response = _chat(client, text, max_tokens=10, logprobs=True, top_logprobs=5, return_token_ids=True)
    choice = response.choices[0]
    prompt, tokens = _prompt_ids(setup, text), choice.token_ids
    assert response.prompt_token_ids == prompt
    reference = _forward_logprobs(setup, prompt + tokens)[len(prompt) - 1:-1]  # row i predicts tokens[i]
    entries = choice.logprobs.content
    assert len(entries) == len(tokens)
    for i, entry in enumerate(entries):
        assert abs(entry.logprob - reference[i, tokens[i]].item()) <= TOL
        top_values, top_ids = reference[i].topk(5)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top_values.tolist(), abs=TOL)
        assert [t.token for t in entry.top_logprobs] == [setup["processor"].decode([j]) for j in top_ids.tolist()]
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=TOL)  # greedy: the top token
    stream = client.chat.completions.create(
        model=MODEL, messages=_user(text), max_tokens=10, stream=True, logprobs=True, top_logprobs=5,
        extra_body={"chat_template_kwargs": {"thinking_mode": "short"}})
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob, [t.logprob for t in e.top_logprobs]) for e in streamed] == \
        [(e.token, e.logprob, [t.logprob for t in e.top_logprobs]) for e in entries]


def test_top_logprobs_bounds_and_zero(client):
    response = _chat(client, logprobs=True, top_logprobs=0, max_tokens=3)
    assert all(e.top_logprobs == [] for e in response.choices[0].logprobs.content)
    assert _chat(client, max_tokens=3).choices[0].logprobs is None
    for extra, param in (({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                         ({"top_logprobs": 2}, "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, **extra)
        assert e.value.response.json()["error"]["param"] == param


# ---------------------------------------------------------------------------------------------
# n, ids, stops, reasoning fields


def test_n_choices_sampled_differ_and_greedy_agree(client):
    sampled = _chat(client, max_tokens=12, n=3, temperature=1.0, seed=7, return_token_ids=True)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in sampled.choices}) > 1
    assert sampled.usage.completion_tokens == sum(len(c.token_ids) for c in sampled.choices)
    again = _chat(client, max_tokens=12, n=3, temperature=1.0, seed=7, return_token_ids=True)
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in sampled.choices]  # seeded: reproducible
    greedy = _chat(client, max_tokens=8, n=2, return_token_ids=True)
    assert greedy.choices[0].token_ids == greedy.choices[1].token_ids
    stream = client.chat.completions.create(model=MODEL, messages=_user("Describe the shapes."), max_tokens=8,
                                            n=2, stream=True, extra_body={"chat_template_kwargs":
                                                                          {"thinking_mode": "short"}})
    texts = {0: "", 1: ""}
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts[0] == texts[1] == greedy.choices[0].message.content


def test_stop_token_ids_and_min_tokens(setup, client):
    whole = _chat(client, max_tokens=20, return_token_ids=True, ignore_eos=True)
    tokens = whole.choices[0].token_ids
    stop = tokens[4]
    first = tokens.index(stop)
    cut = _chat(client, max_tokens=20, return_token_ids=True, stop_token_ids=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].token_ids == tokens[:first + 1]
    early = _chat(client, "Describe this image.", max_tokens=40, return_token_ids=True)
    n = len(early.choices[0].token_ids)
    assert early.choices[0].finish_reason == "stop" and n < 30  # greedy ends early at eos
    held = _chat(client, "Describe this image.", max_tokens=40, return_token_ids=True, min_tokens=30)
    ids = held.choices[0].token_ids
    assert len(ids) >= 30 and not set(ids[:29]) & set(setup["processor"].eos_token_ids)
    for extra, param in (({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
                         ({"stop_token_ids": [10**7]}, "stop_token_ids"), ({"stop_token_ids": "x"}, "stop_token_ids")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=_user("hi"), max_tokens=extra.pop("max_tokens", 5),
                                           extra_body=extra)
        assert e.value.response.json()["error"]["param"] == param


def test_include_reasoning_and_thinking_token_budget(setup, client):
    question = "How many circles are there?"
    with_budget = _chat(client, question, mode="long", max_tokens=20, thinking_token_budget=4, return_token_ids=True)
    alias = _chat(client, question, mode="long", max_tokens=20, max_thinking_tokens=4, return_token_ids=True)
    assert with_budget.choices[0].token_ids == alias.choices[0].token_ids
    think_end = setup["processor"].tokenizer.token_to_id("</think>")
    assert with_budget.choices[0].token_ids[4] == think_end
    assert with_budget.usage.completion_tokens_details.reasoning_tokens == 5
    hidden = _chat(client, question, mode="long", max_tokens=20, thinking_token_budget=4, include_reasoning=False)
    assert getattr(hidden.choices[0].message, "reasoning_content", None) is None
    assert hidden.choices[0].message.content == with_budget.choices[0].message.content
    for extra, param in (({"thinking_token_budget": -1}, "thinking_token_budget"),
                         ({"thinking_token_budget": 3, "max_thinking_tokens": 4}, "thinking_token_budget"),
                         ({"include_reasoning": "no"}, "include_reasoning")):
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, **extra)
        assert e.value.response.json()["error"]["param"] == param


# ---------------------------------------------------------------------------------------------
# validation


def _post(setup, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(setup["url"] + path, timeout=60, **kwargs, **({"json": body} if body is not None else {}))


@pytest.mark.parametrize("body, param, fragment", [
    ({"seed": 2**63}, "seed", "at most"),
    ({"seed": "7"}, "seed", "seed: expected an integer"),  # named seed, not temperature (issue 21)
    ({"seed": -2**63 - 1}, "seed", "at least"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:,"}]}]},
     "messages[0].content[0].image_url", "object"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].image_url.url", "non-empty string"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "unknown role"),
    ({"temperature": 3}, "temperature", "[0.0, 2.0]"),
    ({"n": 0}, "n", "at least 1"),
    ({"response_format": {"type": "yaml"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema", "nonsense"),
    ({"logit_bias": {"5": 10}}, "logit_bias", "not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"repetition_penalty": 1.2}, "repetition_penalty", "not supported"),
    ({"guided_json": {"type": "object"}}, "guided_json", "response_format"),
    ({"echo": True}, "echo", "only false"),
])
def test_invalid_chat_fields_get_400(setup, body, param, fragment):
    full = {"model": MODEL, "messages": _user("hi"), "max_tokens": 2, **body}
    error = _error(_post(setup, "/v1/chat/completions", full), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert fragment in error["message"], error["message"]


def test_seed_extremes_are_accepted(setup):
    for seed in (2**63 - 1, -2**63, -1):
        r = _post(setup, "/v1/chat/completions", {"model": MODEL, "messages": _user("hi"), "max_tokens": 2,
                                                  "seed": seed, "temperature": 1.0})
        assert r.status_code == 200, r.text


def test_content_type_models_by_id_and_unknown_model(setup, client):
    body = json.dumps({"model": MODEL, "messages": _user("hi"), "max_tokens": 2})
    error = _error(_post(setup, "/v1/chat/completions", None, content=body, headers={"content-type": "text/plain"}),
                   415)
    assert "application/json" in error["message"]
    ok = _post(setup, "/v1/chat/completions", None, content=body,
               headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert "gpt-9" in e.value.response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=2)
    assert "gpt-9" in e.value.response.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------
# /v1/completions


def test_completions_text_and_token_prompts_agree(setup, client):
    text = "The square is"
    ids = setup["processor"].encode(text)
    by_text = client.completions.create(model=MODEL, prompt=text, max_tokens=8, extra_body={"return_token_ids": True})
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, extra_body={"return_token_ids": True})
    assert by_text.object == "text_completion" and by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.choices[0].text == setup["processor"].decode(by_text.choices[0].token_ids)
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens == 8
    batch = client.completions.create(model=MODEL, prompt=[text, "A circle"], max_tokens=4)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == by_text.choices[0].text[:len(
        batch.choices[0].text)]
    stream = client.completions.create(model=MODEL, prompt=text, max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == by_text.choices[0].text


def test_completions_echo_prompt_logprobs_like_lm_eval(setup, client):
    context, continuation = "The picture shows", " a red square"
    ctx_ids = setup["processor"].encode(context)
    ids = ctx_ids + setup["processor"].encode(continuation)
    reference = _forward_logprobs(setup, ids)
    # lm-eval local-completions loglikelihood: echo, max_tokens 1 (or 0), logprobs 1, temperature 0
    for max_tokens in (0, 1):
        r = client.completions.create(model=MODEL, prompt=[ids], max_tokens=max_tokens, echo=True, logprobs=1,
                                      temperature=0)
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + max_tokens and lp.token_logprobs[0] is None
        assert lp.top_logprobs[0] is None
        for i in range(1, len(ids)):
            assert abs(lp.token_logprobs[i] - reference[i - 1, ids[i]].item()) <= TOL
            assert max(lp.top_logprobs[i].values()) == pytest.approx(reference[i - 1].max().item(), abs=TOL)
        assert r.choices[0].text.startswith(setup["processor"].decode(ids))
        assert r.usage.completion_tokens == max_tokens
    streamed = client.completions.create(model=MODEL, prompt=[ids], max_tokens=1, echo=True, logprobs=1, stream=True)
    values = [v for c in streamed if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert values == lp.token_logprobs
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=0)
    assert e.value.response.json()["error"]["param"] == "max_tokens"


def test_completions_stop_and_prompt_errors(setup, client):
    whole = client.completions.create(model=MODEL, prompt="The square is", max_tokens=16).choices[0].text
    stop = whole[len(whole) // 2: len(whole) // 2 + 2]
    cut = client.completions.create(model=MODEL, prompt="The square is", max_tokens=16, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == whole[:whole.find(stop)]
    for prompt in ("", [], [[]], [10**7], [1.5], {"x": 1}):
        r = _post(setup, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2})
        assert _error(r, 400)["param"] == "prompt"


# ---------------------------------------------------------------------------------------------
# structured output

SCHEMA = {"type": "object", "properties": {
    "colour": {"type": "string", "enum": ["red", "green", "blue"]},
    "count": {"type": "integer", "minimum": 0, "maximum": 99},
    "label": {"type": "string", "maxLength": 6},
    "filled": {"type": "boolean"}},
    "required": ["colour", "count", "label", "filled"], "additionalProperties": False}


def test_json_schema_responses_always_validate_on_random_weights(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA}}
    for seed in range(4):
        r = client.chat.completions.create(model=MODEL, messages=_user("Describe one shape as JSON."), max_tokens=80,
                                           temperature=1.0, seed=seed, response_format=fmt,
                                           extra_body={"chat_template_kwargs": {"thinking_mode": "short"}})
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    plain = _chat(client, "Describe one shape as JSON.", max_tokens=30, temperature=1.0, seed=0)
    with pytest.raises(json.JSONDecodeError):  # the constraint did the work: unconstrained it is not JSON
        json.loads(plain.choices[0].message.content or "")


def test_json_object_streamed_equals_plain(client):
    kwargs = dict(model=MODEL, messages=_user("JSON please."), max_tokens=60, response_format={"type": "json_object"},
                  extra_body={"chat_template_kwargs": {"thinking_mode": "short"}})
    plain = client.chat.completions.create(**kwargs).choices[0]
    assert plain.message.content.startswith("{")
    if plain.finish_reason == "stop":
        assert isinstance(json.loads(plain.message.content), dict)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert streamed == plain.message.content


def test_json_schema_applies_to_the_answer_after_the_thinking(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA}}
    r = client.chat.completions.create(model=MODEL, messages=_user("Think, then answer as JSON."), max_tokens=80,
                                       temperature=1.0, seed=3, response_format=fmt,
                                       extra_body={"chat_template_kwargs": {"thinking_mode": "long"},
                                                   "thinking_token_budget": 3})
    message = r.choices[0].message
    assert message.reasoning_content is not None and r.usage.completion_tokens_details.reasoning_tokens == 4
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(message.content), SCHEMA)  # the separator before it is whitespace: json allows it
