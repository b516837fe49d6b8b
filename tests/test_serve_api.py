"""`r4b serve` through the real `openai` client against servers started on 127.0.0.1 at free ports:
completions (JSON and SSE), an image data URI, thinking modes and the thinking budget, greedy tokens equal
generate()'s, 8 concurrent clients, alone vs among 7 others, every error object (and the server keeps
serving), a client that disconnects mid-stream, the API key, remote and local image policies.

One engine per module serves three apps: the main one (no key, small body limit), one with an API key
and the image sources opened up, and one whose queue is tiny (for 429)."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import picture
from openai import OpenAI

from r4b_core.generation.generate import GenerationConfig, generate
from r4b_core.processing.image_processing import load_image
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.processing.processor import THINK_END, R4BProcessor
from r4b_core.serve.api import ServerConfig, create_app
from r4b_core.serve.engine import Engine
from r4b_core.serve.images import ImagePolicy
from r4b_core.serve.server import BackgroundServer

MODEL = "r4b-tiny"
KEY = "test-key-123"
BODY_LIMIT = 512 * 1024


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoint):
    directory = tiny_checkpoint  # the session's shared one (conftest.py): read-only; the model is this file's own
    model = R4BForConditionalGeneration.from_pretrained(directory)
    processor = R4BProcessor.from_pretrained(directory)
    generation_config = GenerationConfig.from_pretrained(directory)
    engine = Engine(model, max_batch_size=8, max_seq_len=320, max_queue=32, eos_token_ids=processor.eos_token_ids,
                    pad_token_id=processor.pad_token_id)
    images_dir = tmp_path_factory.mktemp("allowed-images")
    picture(90, 60, 5).save(images_dir / "inside.png")
    outside = tmp_path_factory.mktemp("private") / "secret.png"
    picture(90, 60, 6).save(outside)
    (images_dir / "link.png").symlink_to(outside)
    main = create_app(engine, processor, ServerConfig(MODEL, max_body_bytes=BODY_LIMIT,
                                                      generation_config=generation_config))
    keyed = create_app(engine, processor, ServerConfig(
        MODEL, api_key=KEY, generation_config=generation_config,
        images=ImagePolicy(allow_remote=True, local_dir=images_dir, max_pixels=200_000)), manage_engine=False)
    servers = [BackgroundServer(main, engine).start(), BackgroundServer(keyed, engine).start()]
    yield {"model": model, "processor": processor, "engine": engine, "url": servers[0].url,
           "keyed_url": servers[1].url, "images_dir": images_dir, "outside": outside}
    for s in reversed(servers):
        s.stop()
    assert not engine.running  # the main app's lifespan stopped the engine


@pytest.fixture(scope="module")
def client(setup) -> OpenAI:
    return OpenAI(base_url=setup["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _data_uri(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _user(text: str, *image_urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def _create(client: OpenAI, messages, max_tokens: int = 16, mode: str | None = None, **extra):
    body = {"return_token_ids": True, **extra}
    if mode is not None:
        body["chat_template_kwargs"] = {"thinking_mode": mode}
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, extra_body=body)


def _generate_tokens(setup, messages, images=None, max_new_tokens: int = 16, mode: str = "auto") -> list[int]:
    processor, model = setup["processor"], setup["model"]
    inputs = processor(messages=messages, images=images, thinking_mode=mode)
    inputs.pop("attention_mask")
    ids = inputs.pop("input_ids")
    return generate(model, ids, max_new_tokens=max_new_tokens, eos_token_ids=processor.eos_token_ids,
                    pad_token_id=processor.pad_token_id, **inputs).tokens[0]


def _error(exc_info) -> dict:
    return exc_info.value.response.json()["error"]


def _wait_idle(url: str, timeout: float = 30.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        stats = httpx.get(url + "/health").json()
        if stats["active"] == 0 and stats["queued"] == 0:
            return stats
        assert time.monotonic() < end, f"engine still busy: {stats}"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# completions


def test_models_and_health(setup, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(setup["url"] + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["slots"] == 8


def test_non_streaming_completion_equals_generate(setup, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is the square?"}]
    response = _create(client, messages, max_tokens=24, mode="short")
    choice = response.choices[0]
    expected = _generate_tokens(setup, messages, max_new_tokens=24, mode="short")
    assert choice.token_ids == expected
    assert choice.message.role == "assistant" and choice.message.reasoning_content is None
    assert choice.message.content == setup["processor"].decode(expected)  # exact: nothing stripped
    assert choice.finish_reason == ("stop" if expected[-1] in setup["processor"].eos_token_ids else "length")
    assert response.usage.completion_tokens == len(expected)
    assert response.usage.prompt_tokens > 10 and response.model == MODEL and response.id.startswith("chatcmpl-")


def test_image_data_uri_tokens_equal_generate(setup, client, tmp_path):
    image = picture(150, 90, 1)
    path = tmp_path / "shapes.png"
    image.save(path)
    response = _create(client, _user("Describe this image.", _data_uri(image)), max_tokens=20)
    expected = _generate_tokens(setup, [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Describe this image."}]}], images=[load_image(path)],
        max_new_tokens=20)
    assert response.choices[0].token_ids == expected
    text_only = _create(client, _user("Describe this image."), max_tokens=20)
    assert text_only.choices[0].token_ids != expected  # the image mattered


def test_ignore_eos_generates_max_tokens(setup, client):
    messages = _user("Describe this image.", _data_uri(picture(150, 90, 0)))  # greedy ends early at eos
    stopped = _create(client, messages, max_tokens=40)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens < 40
    assert stopped.choices[0].token_ids[-1] in setup["processor"].eos_token_ids
    full = _create(client, messages, max_tokens=40, ignore_eos=True)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 40
    assert full.choices[0].token_ids[:len(stopped.choices[0].token_ids)] == stopped.choices[0].token_ids


def test_streaming_matches_non_streaming_and_ends_with_usage(setup, client):
    messages = _user("Count the shapes, then compare their sizes.")
    whole = _create(client, messages, max_tokens=30, mode="short")
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"chat_template_kwargs": {"thinking_mode": "short"},
                                                        "return_token_ids": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # the deltas concatenate exactly to the message
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert final.choices[0].finish_reason == whole.choices[0].finish_reason
    streamed_ids = [i for c in chunks if c.choices for i in (getattr(c.choices[0], "token_ids", None) or [])]
    assert streamed_ids == whole.choices[0].token_ids
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_sse_format_ends_with_done(setup):
    body = {"model": MODEL, "messages": _user("hello"), "max_tokens": 5, "stream": True}
    with httpx.stream("POST", setup["url"] + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    objects = [json.loads(line[6:]) for line in lines[:-1]]
    assert {o["object"] for o in objects} == {"chat.completion.chunk"} and len({o["id"] for o in objects}) == 1


def test_thinking_modes(setup, client):
    long = _create(client, _user("How many circles are there?"), max_tokens=12, mode="long")
    message = long.choices[0].message
    # the prompt opened <think>: everything generated (no </think> yet) is reasoning
    assert THINK_END not in setup["processor"].decode(long.choices[0].token_ids)
    assert message.reasoning_content and message.content is None  # no answer was produced: null
    short = _create(client, _user("How many circles are there?"), max_tokens=12, mode="short")
    assert short.choices[0].message.reasoning_content is None and short.choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, messages=_user("How many circles are there?"),
                                            max_tokens=12, stream=True,
                                            extra_body={"chat_template_kwargs": {"thinking_mode": "long"}})
    deltas = [c.choices[0].delta for c in stream if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning == message.reasoning_content
    assert not "".join(d.content or "" for d in deltas)


def test_thinking_budget_closes_the_thinking_and_the_answer_follows(setup, client):
    processor = setup["processor"]
    response = _create(client, _user("How many circles are there?"), max_tokens=30, mode="long",
                       max_thinking_tokens=5)
    tokens = response.choices[0].token_ids
    think_end = processor.tokenizer.token_to_id(THINK_END)
    separator = processor.encode("\n\n", add_special_tokens=False)
    assert tokens[5] == think_end and tokens[6:6 + len(separator)] == separator
    message = response.choices[0].message
    assert message.reasoning_content == processor.decode(tokens[:5])
    assert message.content and message.content == processor.decode(tokens[6:])  # the separator included
    assert response.usage.completion_tokens_details.reasoning_tokens == 6  # 5 thinking tokens + </think>


def test_stop_strings_cut_the_content(setup, client):
    whole = _create(client, _user("Describe the image in detail."), max_tokens=30, mode="short")
    text = whole.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = _create(client, _user("Describe the image in detail."), max_tokens=30, mode="short", stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == (text[:text.find(stop)] or None)


def test_eight_concurrent_clients_equal_their_runs_alone(setup, client):
    prompts = [_user(f"Question {i}: " + "what is in this photo? " * (i % 3 + 1)) for i in range(8)]
    alone = [_create(client, p, max_tokens=24).choices[0].token_ids for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: _create(client, p, max_tokens=24).choices[0].token_ids, prompts))
    assert together == alone
    assert alone[3] == _generate_tokens(setup, prompts[3], max_new_tokens=24)


def test_request_alone_equals_request_among_seven_others_streaming(setup, client):
    target = _user("The picture shows a red square.", _data_uri(picture(100, 80, 2)))
    alone = _create(client, target, max_tokens=32).choices[0].token_ids

    def busy(i: int) -> None:
        stream = client.chat.completions.create(model=MODEL, messages=_user("noise " * (i + 1)), stream=True,
                                                max_tokens=40 + 10 * i, temperature=0.7, seed=i)
        for _ in stream:
            pass

    with ThreadPoolExecutor(8) as pool:
        others = [pool.submit(busy, i) for i in range(7)]
        time.sleep(0.05)
        crowded = pool.submit(lambda: _create(client, target, max_tokens=32).choices[0].token_ids)
        assert crowded.result() == alone
        for f in others:
            f.result()


# ---------------------------------------------------------------------------------------------
# errors: the right status, OpenAI's error object, and the server keeps serving


def _post(setup, body, **kwargs) -> httpx.Response:
    return httpx.post(setup["url"] + "/v1/chat/completions", timeout=60, **kwargs,
                      **({"json": body} if body is not None else {}))


@pytest.mark.parametrize("body, param, fragment", [
    ({"model": MODEL, "messages": "hi"}, "messages", "list"),
    ({"model": MODEL, "messages": []}, "messages", "empty"),
    ({"model": MODEL}, "messages", "required"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "robot"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 3}]}, "messages[0].content", "string"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type",
     "audio"),
    ({"model": MODEL, "messages": _user("hi"), "max_tokens": "ten"}, "max_tokens", "integer"),
    ({"model": MODEL, "messages": _user("hi"), "max_tokens": 0}, "max_tokens", "at least 1"),
    ({"model": MODEL, "messages": _user("hi"), "temperature": "hot"}, "temperature", "number"),
    ({"model": MODEL, "messages": _user("hi"), "top_p": 0}, "top_p", "(0.0, 1.0]"),
    ({"model": MODEL, "messages": _user("hi"), "stream": "yes"}, "stream", "true or false"),
    ({"model": MODEL, "messages": _user("hi"), "stop": [1]}, "stop", "strings"),
    ({"model": MODEL, "messages": _user("hi"), "n": 9}, "n", "at most 8"),
    ({"model": MODEL, "messages": _user("hi"), "chat_template_kwargs": {"thinking_mode": "deep"}},
     "chat_template_kwargs.thinking_mode", "deep"),
    ({"model": MODEL, "messages": _user("hi"), "max_thinking_tokens": -1}, "max_thinking_tokens", "at least 0"),
    ({"model": MODEL, "messages": _user("hi"), "max_tokens": 1000}, "max_tokens", "at most 308 new tokens"),
    ({"model": MODEL, "messages": _user("word " * 400)}, "messages", "leaves no room"),
    ({"model": MODEL, "messages": _user("hi"), "tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"model": MODEL, "messages": _user("hi", "data:image/png;base64,aGVsbG8=")}, "messages[0].content[0].image_url",
     "cannot decode"),
    ({"model": MODEL, "messages": _user("hi", "data:image/png;base64,@@@")}, "messages[0].content[0].image_url",
     "base64"),
    ({"model": MODEL, "messages": _user("hi", "http://127.0.0.1:9/x.png")}, "messages[0].content[0].image_url",
     "--allow-remote-images"),
    ({"model": MODEL, "messages": _user("hi", "/etc/hostname")}, "messages[0].content[0].image_url",
     "--allow-local-images"),
    ({"model": MODEL, "messages": [{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, "messages[0].content[0]", "user messages only"),
])
def test_invalid_requests_get_400_with_an_error_object(setup, body, param, fragment):
    r = _post(setup, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert fragment in error["message"], error["message"]
    assert _post(setup, {"model": MODEL, "messages": _user("still serving?"), "max_tokens": 2}).status_code == 200


def test_malformed_bodies_unknown_model_and_routes(setup):
    for raw in (b"{not json", b"\xff\xfe", b"[1, 2]"):
        r = _post(setup, None, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = _post(setup, {"model": "gpt-9", "messages": _user("hi")})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.get(setup["url"] + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    big = {"model": MODEL, "messages": _user("x" * (BODY_LIMIT + 10))}
    r = _post(setup, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "--max-body-mb" in r.json()["error"]["message"]  # the flag that exists (issue 21)
    assert _post(setup, {"model": MODEL, "messages": _user("still serving?"), "max_tokens": 2}).status_code == 200


def test_image_over_the_pixel_limit_and_client_errors_through_openai(setup):
    keyed = OpenAI(base_url=setup["keyed_url"] + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        _create(keyed, _user("hi", _data_uri(picture(600, 400, 0))))  # 240,000 pixels > 200,000
    assert _error(e)["code"] == "image_too_large" and "240000 pixels" in _error(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        _create(keyed, _user("hi"), n=30)
    assert _error(e)["param"] == "n"


def test_api_key(setup):
    url = setup["keyed_url"] + "/v1"
    for key in ("wrong-key", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(url + "/chat/completions", json={"model": MODEL, "messages": _user("hi")}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=url, api_key="wrong-key", max_retries=0).models.list()
    good = OpenAI(base_url=url, api_key=KEY, max_retries=0)
    assert good.models.list().data[0].id == MODEL
    assert httpx.get(setup["keyed_url"] + "/health").status_code == 200  # health needs no key


def test_local_and_remote_image_policies(setup, tmp_path):
    keyed = OpenAI(base_url=setup["keyed_url"] + "/v1", api_key=KEY, max_retries=0)
    inside = setup["images_dir"] / "inside.png"
    ok = _create(keyed, _user("Describe.", f"file://{inside}"), max_tokens=8)
    via_data = _create(keyed, _user("Describe.", _data_uri(picture(90, 60, 5))), max_tokens=8)
    assert ok.choices[0].token_ids == via_data.choices[0].token_ids
    for url in (f"file://{setup['outside']}", str(setup["images_dir"] / "link.png"),
                str(setup["images_dir"] / ".." / setup["outside"].parent.name / "secret.png")):
        with pytest.raises(openai.BadRequestError) as e:
            _create(keyed, _user("Describe.", url))
        assert "outside" in _error(e)["message"]

    picture(90, 60, 5).save(tmp_path / "remote.png")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path), **k)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        remote = _create(keyed, _user("Describe.", f"{base}/remote.png"), max_tokens=8)
        assert remote.choices[0].token_ids == via_data.choices[0].token_ids
        with pytest.raises(openai.BadRequestError) as e:
            _create(keyed, _user("Describe.", f"{base}/missing.png"))
        assert _error(e)["code"] == "image_download_failed"
    finally:
        httpd.shutdown()


def test_disconnect_mid_stream_frees_the_slot(setup):
    before = _wait_idle(setup["url"])
    body = {"model": MODEL, "messages": _user("Tell me everything."), "max_tokens": 250, "stream": True}
    with httpx.stream("POST", setup["url"] + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        assert httpx.get(setup["url"] + "/health").json()["active"] == 1
    after = _wait_idle(setup["url"])  # closing the stream cancelled the request
    assert after.get("finished_cancelled", 0) == before.get("finished_cancelled", 0) + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 250


def test_disconnect_while_waiting_for_a_non_streamed_answer_frees_the_slot(setup):
    before = _wait_idle(setup["url"])
    body = {"model": MODEL, "messages": _user("Tell me everything."), "max_tokens": 280}
    with pytest.raises(httpx.TimeoutException):  # the client gives up long before 280 batched steps are done
        httpx.post(setup["url"] + "/v1/chat/completions", json=body, timeout=0.2)
    after = _wait_idle(setup["url"])
    assert after.get("finished_cancelled", 0) == before.get("finished_cancelled", 0) + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 280
