"""``r4b serve``: an OpenAI-compatible chat server over a continuous-batching engine.

    engine.py   Engine: slots over one static KV cache, a bounded queue, one thread that owns the model
    schema.py   the OpenAI chat-completions request (validated) and response / chunk / error objects
    images.py   image parts (data: URIs; http(s) and local files only when allowed) -> RGB images
    output.py   generated ids -> reasoning_content / content deltas (UTF-8-safe, stop strings)
    api.py      the FastAPI app: /v1/chat/completions (JSON or SSE), /v1/models, /health
    server.py   uvicorn with graceful SIGTERM / SIGINT shutdown; BackgroundServer for tests

The engine needs only torch; api.py and server.py need the ``serve`` extra (fastapi, uvicorn).
"""
