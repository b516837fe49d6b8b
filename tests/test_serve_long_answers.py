"""The server as ``r4b serve`` builds it by default admits what R-4B's model card asks for: an image prompt
plus ``max_tokens=16384`` (long thinking), over HTTP. The stream is read until its first tokens and then
dropped; the engine must cancel the request and give its KV blocks back (nothing waits for 16k tokens)."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import torch
from conftest import picture

from r4b_core.cli.main import build_parser
from r4b_core.config import preset
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.serve.api import ServerConfig, create_app
from r4b_core.serve.engine import Engine
from r4b_core.serve.server import BackgroundServer


def _default_engine(processor) -> Engine:
    """The engine ``r4b serve --model DIR`` builds with no flags, for a tiny model with R-4B's context."""
    config = preset("tiny")
    config.text_config.max_position_embeddings = 40960  # R-4B's (r4b_spec: text_config.max_position_embeddings)
    torch.manual_seed(0)
    model = R4BForConditionalGeneration(config).eval()
    args = build_parser().parse_args(["serve"])  # every flag at its default, as run() reads them
    return Engine(model, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, max_queue=args.max_queue,
                  eos_token_ids=processor.eos_token_ids, pad_token_id=processor.pad_token_id,
                  kv_cache_tokens=args.kv_cache_tokens, kv_cache_gb=args.kv_cache_gb,
                  token_budget=args.max_num_batched_tokens, prefix_caching=not args.no_prefix_caching,
                  exact=args.exact)


def test_the_default_server_admits_an_image_prompt_with_max_tokens_16384(tiny_processor):
    engine = _default_engine(tiny_processor)
    app = create_app(engine, tiny_processor, ServerConfig("r4b"))
    buffer = io.BytesIO()
    picture(96, 64, 3).save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {"model": "r4b", "max_tokens": 16384, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": "think about this picture"}]}]}
    server = BackgroundServer(app, engine).start()
    try:
        tokens = 0
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    delta = chunk["choices"][0]["delta"]
                    tokens += bool(delta.get("content") or delta.get("reasoning_content"))
                if tokens >= 3:
                    break  # the client goes away mid-answer
        assert tokens >= 3
        deadline = time.monotonic() + 30
        while (health := httpx.get(server.url + "/health", timeout=10).json())["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health["active"] == 0 and health["finished_cancelled"] == 1, health
        assert health["kv_blocks_used"] == 0 or health["kv_blocks_cached"] == health["kv_blocks_used"], health
        assert health["vision_runs"] == 1 and health["generated_tokens"] < 16384
        assert health["max_seq_len"] >= 16384 + 3 * 64
    finally:
        server.stop()
