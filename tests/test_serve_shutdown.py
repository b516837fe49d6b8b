"""`r4b serve` as a real process: the CLI checks its options before loading, the bounded queue answers 429,
and SIGTERM / SIGINT stop admitting, let queued and running requests finish (or cancel them at the
deadline, telling their clients) and exit with status 0 (SIGTERM) or 130 (SIGINT, Ctrl-C's status)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from r4b_core.serve.server import free_port

MESSAGES = [{"role": "user", "content": "Describe the picture in detail."}]


class ServerProcess:
    def __init__(self, checkpoint, tmp_path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"server-{self.port}.log"
        command = [sys.executable, "-m", "r4b_core.cli", "serve", "--model", str(checkpoint), "--port", str(self.port),
                   "--log-level", "warning", *extra]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> ServerProcess:
        end = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, f"server exited early:\n{self.log.read_text()}"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "server did not start"
            time.sleep(0.1)
        return self

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def wait_exit(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()


SHUTDOWN_FLAGS = {
    "sigterm": ("--max-batch-size", "1", "--max-queue", "1", "--max-seq-len", "4096", "--shutdown-timeout", "60"),
    "sigint": ("--max-batch-size", "2", "--shutdown-timeout", "0"),
}


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, tmp_path_factory):
    """Both tests' servers, started at once (their start-ups overlap); each test signals its own to stop."""
    started = {name: ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp(name), *flags)
               for name, flags in SHUTDOWN_FLAGS.items()}
    yield started
    for server in started.values():
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


def _stream_lines(url: str, body: dict, out: list, started: threading.Event) -> None:
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line:
                out.append(line)
                started.set()
    started.set()


def _post_json(url: str, body: dict, out: list) -> None:
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    out.append((r.status_code, r.json()))


def test_sigterm_finishes_running_and_queued_requests_and_exits_0(servers):
    server = servers["sigterm"].wait_ready()
    try:
        streamed, started = [], threading.Event()
        # forced past the random model's EOS (min_tokens), so it still runs while the second request queues
        running = threading.Thread(target=_stream_lines, args=(server.url, {"messages": MESSAGES, "max_tokens": 600, "min_tokens": 600},
                                                               streamed, started))
        running.start()
        assert started.wait(60)
        queued_result: list = []
        queued = threading.Thread(target=_post_json, args=(server.url, {"messages": MESSAGES, "max_tokens": 4},
                                                           queued_result))
        queued.start()
        end = time.monotonic() + 30
        while server.health()["queued"] == 0:
            assert time.monotonic() < end and running.is_alive(), f"the second request never queued: {server.health()}"
            time.sleep(0.005)
        refused = httpx.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        stats = server.health()
        assert stats["active"] == 1 and stats["queued"] == 1 and stats["generated_tokens"] < 600  # both in flight
        server.process.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.log.read_text()
        running.join(10)
        queued.join(10)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert streamed[-1] == "data: [DONE]"
    final = json.loads(streamed[-2].removeprefix("data: "))
    assert final["choices"][0]["finish_reason"] == "length"  # ran to its end after SIGTERM
    assert sum('"content"' in line for line in streamed) > 1
    assert queued_result[0][0] == 200 and queued_result[0][1]["usage"]["completion_tokens"] == 4
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=2)


def test_sigint_past_the_deadline_cancels_with_an_error_and_exits_130(servers):
    server = servers["sigint"].wait_ready()
    try:
        streamed, started = [], threading.Event()
        running = threading.Thread(target=_stream_lines, args=(server.url, {"messages": MESSAGES, "max_tokens": 3000},
                                                               streamed, started))
        running.start()
        assert started.wait(60)
        server.process.send_signal(signal.SIGINT)
        assert server.wait_exit() == 130, server.log.read_text()
        assert "Traceback" not in server.log.read_text()
        running.join(10)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert streamed[-1] == "data: [DONE]"
    error = json.loads(streamed[-2].removeprefix("data: "))["error"]
    assert error["code"] == "cancelled" and "shut down" in error["message"]


def test_cli_checks_options_before_loading(tiny_checkpoint, tmp_path):
    from r4b_core.cli import main

    assert main(["serve", "--model", str(tiny_checkpoint), "--allow-local-images", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--model", str(tiny_checkpoint), "--max-seq-len", "100000"]) == 2
    assert main(["serve", "--model", str(tmp_path / "no-such-checkpoint")]) == 1
    with pytest.raises(SystemExit):
        main(["serve", "--port", "70000"])
