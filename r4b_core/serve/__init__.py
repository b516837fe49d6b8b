"""``r4b serve``: an OpenAI-compatible chat server over a continuous-batching engine.

    engine.py   Engine: slots over one static KV cache, a bounded queue, one thread that owns the model
    token_picker.py  per-request token choice: thinking-budget forcing, logits processors, min tokens,
                sampling, logprobs (the engine calls it where it picks tokens)
    schema.py   the OpenAI request (validated: chat and the fields completions shares) and APIError
    responses.py  the response / chunk / logprobs / usage / model objects
    images.py   image parts (data: URIs; http(s) and local files only when allowed) -> RGB images
    choices.py  one response's choices in flight: the one request-event loop of chat and completions
    requests.py  validated request -> engine requests (token room, sampling, stop ids); ServerConfig
    chat_api.py  /v1/chat/completions: thinking -> reasoning_content, answer -> content
    completions.py  /v1/completions: text or token-id prompts, echo, prompt logprobs
    structured.py  response_format json_object / json_schema through llguidance
    api.py      the FastAPI app: routes, errors, auth, body checks
    server.py   uvicorn with graceful SIGTERM / SIGINT shutdown; BackgroundServer for tests

The engine needs only torch; api.py and server.py need the ``serve`` extra (fastapi, uvicorn,
llguidance).
"""
