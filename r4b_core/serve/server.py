"""Running the app with uvicorn: graceful shutdown on SIGTERM / SIGINT, and a background server.

``serve_forever`` (what ``r4b serve`` runs): on the first SIGTERM or SIGINT the engine stops admitting
(new requests get 503), uvicorn stops accepting connections, running and queued requests finish
or, past ``deadline_s``, are cancelled (their clients get an error), the engine thread ends and the
process exits (``r4b serve``: status 0 after SIGTERM, 130 after Ctrl-C / SIGINT, as for any r4b command).
A second SIGINT quits at once (uvicorn's force exit). Should an engine step outlast the deadline by more
than uvicorn's graceful timeout (``deadline_s`` + 2 s), uvicorn cancels the request handlers: each logs one
line (serve/choices.py) and ends without the traceback uvicorn would print for it.

``BackgroundServer`` runs the same server in a thread of this process (no signal handlers), for
tests and notebooks: ``with BackgroundServer(app, engine) as server: server.url``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from r4b_core.serve.engine import Engine


class _GracefulServer(uvicorn.Server):
    """uvicorn.Server whose exit signal first tells the engine to stop admitting and to wind down."""

    def __init__(self, config: uvicorn.Config, engine: Engine, deadline_s: float) -> None:
        super().__init__(config)
        self.engine, self.deadline_s = engine, deadline_s
        self.stop_signal: int | None = None  # the first SIGTERM / SIGINT received

    def handle_exit(self, sig, frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = sig
        self.engine.begin_shutdown(self.deadline_s)
        super().handle_exit(sig, frame)
        # uvicorn re-raises a captured signal after its shutdown (so the process dies of it, with a
        # traceback for SIGINT); here the caller gets the signal from serve_forever and picks the status
        self._captured_signals.clear()


def _quiet_at_shutdown(app, engine: Engine):
    """``app``, except that a request task uvicorn cancels at its graceful-shutdown timeout ends quietly:
    uvicorn logs such a CancelledError as "Exception in ASGI application" with a traceback. Outside a
    shutdown (the engine still accepting) a cancellation propagates as usual."""
    async def quiet(scope, receive, send) -> None:
        try:
            await app(scope, receive, send)
        except asyncio.CancelledError:
            if engine.accepting:
                raise
    return quiet


def _uvicorn_config(app, host: str, port: int, deadline_s: float, log_level: str,
                    ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                          timeout_graceful_shutdown=deadline_s + 2.0, access_log=log_level == "debug",
                          ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)


def serve_forever(app, engine: Engine, host: str = "127.0.0.1", port: int = 8000, deadline_s: float = 30.0,
                  log_level: str = "info", sockets: list[socket.socket] | None = None,
                  ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> int | None:
    """Serve until SIGTERM / SIGINT (see the module docstring); returns the signal that stopped it (None if
    none did) after a graceful shutdown. ``sockets``: already bound sockets to listen on instead of binding
    ``host``:``port`` (``r4b serve`` binds before loading the weights, so a taken port fails at once).
    ``ssl_certfile`` / ``ssl_keyfile``: serve HTTPS with this PEM certificate chain and key."""
    config = _uvicorn_config(_quiet_at_shutdown(app, engine), host, port, deadline_s, log_level, ssl_certfile,
                             ssl_keyfile)
    server = _GracefulServer(config, engine, deadline_s)
    server.run(sockets=sockets)
    return server.stop_signal


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """The app served on ``host``:``port`` (a free port by default) from a thread of this process."""

    def __init__(self, app, engine: Engine, host: str = "127.0.0.1", port: int | None = None,
                 deadline_s: float = 5.0, log_level: str = "warning") -> None:
        self.host, self.port = host, port or free_port(host)
        self.engine, self.deadline_s = engine, deadline_s
        self.server = _GracefulServer(_uvicorn_config(_quiet_at_shutdown(app, engine), self.host, self.port,
                                                      deadline_s, log_level), engine, deadline_s)
        self.thread = threading.Thread(target=self.server.run, name="r4b-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "BackgroundServer":
        self.thread.start()
        end = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"the r4b server did not start on {self.url}.")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
