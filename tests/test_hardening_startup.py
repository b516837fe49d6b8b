"""Start-up and interruption (issue 21 items 3 and 6), each a replay of a finding of the new-user trial:

- `r4b serve` on a port in use, an unresolvable --host, an address not of this machine, or missing / wrong
  TLS files: one line `r4b: error: ...` naming the flag and value, exit 1, before the weights load (it
  loaded them first, then exited 3 with uvicorn's own log lines; a non-loopback --host also printed a
  warning line before the error);
- a client that hangs up mid-upload, mid-stream or mid-response: one log line, no traceback (two
  tracebacks before);
- Ctrl-C during the start-up imports: one line, exit 130 (a KeyboardInterrupt traceback before), for
  `r4b` and scripts/train.py; during loading, generating, evaluating, benchmarking: the same;
- one load-time figure: "loaded ... in 0.0 s" then "weights loaded in 1.8 s" before (the progress line
  timed the tensor reads only, the summary the whole load).
"""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from r4b_core.cli import main
from r4b_core.cli.common import CommandSetup

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Fails the test if a command gets as far as loading the processor or the weights."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("the weights were being loaded")
    monkeypatch.setattr(CommandSetup, "load_model", refuse)
    monkeypatch.setattr(CommandSetup, "load_processor", refuse)


def _only_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("r4b: error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# r4b serve: start-up failures before the weights load


def test_a_port_in_use_is_one_line_before_the_weights_load(tiny_checkpoint, no_weight_loading, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tiny_checkpoint), "--port", str(port)]) == 1
    line = _only_error_line(capsys)
    assert f"--port {port}" in line and "already in use" in line


@pytest.mark.parametrize("host, says", [
    ("no-such-host.invalid", "cannot resolve"),  # a name nothing resolves (RFC 6761's .invalid)
    ("300.1.2.3", "cannot resolve"),             # not an IPv4 address, so a name, which does not resolve
    ("192.0.2.1", "not an address of this machine"),  # TEST-NET-1: valid, but no machine's own address
])
def test_a_bad_host_is_one_line_naming_it_before_the_weights_load(host, says, tiny_checkpoint, no_weight_loading,
                                                                  capsys):
    assert main(["serve", "--model", str(tiny_checkpoint), "--host", host, "--port", "8000"]) == 1
    line = _only_error_line(capsys)  # and no "listening on ... without --api-key" warning before it
    assert f"--host {host}" in line.replace("'", "") and says in line


def _self_signed_pair(directory: Path) -> tuple[Path, Path] | None:
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True,
                       timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return cert, key


def test_tls_files_that_are_missing_or_wrong_are_one_line_naming_the_flag(tiny_checkpoint, tmp_path,
                                                                          no_weight_loading, capsys):
    model = ["serve", "--model", str(tiny_checkpoint)]
    missing = tmp_path / "missing.pem"
    assert main([*model, "--ssl-certfile", str(missing), "--ssl-keyfile", str(missing)]) == 1
    assert f"--ssl-certfile {missing}: no such file" in _only_error_line(capsys)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert main([*model, "--ssl-certfile", str(junk), "--ssl-keyfile", str(junk)]) == 1
    assert f"--ssl-certfile {junk} --ssl-keyfile {junk}: not a PEM certificate" in _only_error_line(capsys)
    assert main([*model, "--ssl-keyfile", str(junk)]) == 1
    assert "--ssl-keyfile" in _only_error_line(capsys)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = _self_signed_pair(tmp_path / "a"), _self_signed_pair(tmp_path / "b")
    if first is not None and second is not None:  # a real certificate with a key it was not issued for
        assert main([*model, "--ssl-certfile", str(first[0]), "--ssl-keyfile", str(second[1])]) == 1
        assert "not a PEM certificate and its private key" in _only_error_line(capsys)


# ---------------------------------------------------------------------------------------------------
# r4b serve: clients that hang up


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_and_log(tiny_model, tiny_processor):
    from r4b_core.serve.api import ServerConfig, create_app
    from r4b_core.serve.engine import Engine
    from r4b_core.serve.server import BackgroundServer

    engine = Engine(tiny_model, max_batch_size=2, max_seq_len=4096, eos_token_ids=tiny_processor.eos_token_ids,
                    pad_token_id=tiny_processor.pad_token_id)
    app = create_app(engine, tiny_processor, ServerConfig("r4b-tiny"))
    records = _Records()
    loggers = [logging.getLogger(name) for name in ("r4b.serve", "uvicorn", "uvicorn.error")]
    with BackgroundServer(app, engine) as server:
        for logger in loggers:  # after uvicorn configured its logging
            logger.addHandler(records)
        try:
            yield server, records
        finally:
            for logger in loggers:
                logger.removeHandler(records)


def _post_then_hang_up(port: int, body: bytes, declared_length: int, wait_for_response: bool) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % declared_length + body)
        if wait_for_response:
            assert s.recv(100).startswith(b"HTTP/1.1 200")  # the stream's head: generation is running
        else:
            time.sleep(0.3)


def _wait_for(condition, timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("when", ["mid-upload", "mid-stream", "mid-response"])
def test_a_client_hanging_up_is_one_log_line_without_a_traceback(when, server_and_log):
    server, records = server_and_log
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000, "min_tokens": 3000,
               "stream": when == "mid-stream"}
    body = json.dumps(request).encode()
    if when == "mid-upload":
        _post_then_hang_up(server.port, body[: len(body) // 2], len(body), wait_for_response=False)
    else:
        _post_then_hang_up(server.port, body, len(body), wait_for_response=when == "mid-stream")
    _wait_for(lambda: records.records)
    _wait_for(lambda: server.engine.stats()["active"] == 0)  # the abandoned generation was cancelled
    time.sleep(0.2)  # a second line or traceback would follow at once
    lines = [(r.name, r.getMessage(), r.exc_info is not None) for r in records.records]
    assert len(lines) == 1 and not lines[0][2], lines
    assert ("before its request body was complete" if when == "mid-upload" else "went away") in lines[0][1]


# ---------------------------------------------------------------------------------------------------
# Ctrl-C


def _interrupt_during_imports(command: list[str], timeout_s: float = 60.0) -> tuple[int, str]:
    """Run ``command`` under ``python -X importtime`` and send SIGINT once torch's import is under way."""
    process = subprocess.Popen([sys.executable, "-X", "importtime", *command], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output, sent = [], False
    end = time.monotonic() + timeout_s
    try:
        for line in process.stdout:
            output.append(line)
            if not sent and line.split("|")[-1].strip() == "torch._utils_internal":  # early in torch's import
                process.send_signal(signal.SIGINT)
                sent = True
            assert time.monotonic() < end, "timed out"
        status = process.wait(timeout=max(1.0, end - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
    assert sent, "torch was not imported"
    return status, "".join(line for line in output if not line.startswith("import time:"))


@pytest.mark.parametrize("program", ["r4b", "train.py", "bpo.py"])  # bpo.py: a traceback (no handling) before
def test_ctrl_c_during_the_start_up_imports_exits_130_in_one_line(program, tiny_checkpoint, tmp_path):
    command = {"r4b": ["-m", "r4b_core.cli", "generate", "--model", str(tiny_checkpoint), "--prompt", "hi",
                       "--max-new-tokens", "2"],
               "train.py": ["scripts/train.py", "--checkpoint", str(tiny_checkpoint), "--steps", "1",
                            "--eval-examples", "0", "--out", str(tmp_path / "run")],
               "bpo.py": ["scripts/bpo.py", "--out", str(tmp_path / "run")]}[program]
    status, output = _interrupt_during_imports(command)
    assert status == 130, output
    assert "Traceback" not in output and output.strip().endswith("interrupted"), output


def _raise_keyboard_interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("phase", ["weight loading", "generating"])
def test_ctrl_c_in_generate_exits_130_in_one_line(phase, tiny_checkpoint, monkeypatch, capsys):
    if phase == "weight loading":
        from r4b_weights import loader

        monkeypatch.setattr(loader, "_assign", _raise_keyboard_interrupt)
    else:
        from r4b_core.generation.chat import ChatStream

        monkeypatch.setattr(ChatStream, "__iter__", _raise_keyboard_interrupt)
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--max-new-tokens", "2"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "r4b: interrupted"


# ---------------------------------------------------------------------------------------------------
# one load-time figure


def test_generate_prints_one_load_time_figure(tiny_checkpoint, monkeypatch, capsys):
    """The meta build (here slowed to 0.3 s, as torch's first meta-device use is in a fresh process) is
    part of the load: the progress line and the summary show the same figure."""
    from r4b_core.models.r4b import R4BForConditionalGeneration

    build = R4BForConditionalGeneration.__init__

    def slow_build(self, *args, **kwargs):
        time.sleep(0.3)
        build(self, *args, **kwargs)

    monkeypatch.setattr(R4BForConditionalGeneration, "__init__", slow_build)
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    figures = [float(x) for x in re.findall(r"loaded (?:in|.*? tensors in) (\d+\.\d) s", err)]
    assert len(figures) == 2 and figures[0] >= 0.3, err
    assert abs(figures[0] - figures[1]) <= 0.1, err  # the same load (0.1: rounding of two timers)


@pytest.mark.slow  # the engine step must outlast uvicorn's graceful timeout (2 s past a 0 s deadline): ~4 s
def test_requests_cancelled_by_the_shutdown_deadline_are_not_logged_as_clients_going_away(tiny_model, tiny_processor,
                                                                                           capfd):
    """A shutdown whose deadline passes while the engine is inside a long step: uvicorn cancels the handlers
    (its graceful timeout) before the engine's own cancellation arrives. The log line said "a client went
    away" and uvicorn printed a CancelledError traceback; now one line says the shutdown cancelled it."""
    from r4b_core.serve.api import ServerConfig, create_app
    from r4b_core.serve.engine import Engine
    from r4b_core.serve.server import BackgroundServer

    engine = Engine(tiny_model, max_batch_size=2, max_seq_len=4096, eos_token_ids=tiny_processor.eos_token_ids,
                    pad_token_id=tiny_processor.pad_token_id)
    decode, slow, inside = engine._decode, threading.Event(), threading.Event()

    def slow_decode(*args, **kwargs):  # once ``slow`` is set: a step outlasting uvicorn's graceful timeout (2 s)
        if slow.is_set() and not inside.is_set():
            inside.set()
            time.sleep(2.8)
        return decode(*args, **kwargs)

    engine._decode = slow_decode
    records = _Records()
    logger = logging.getLogger("r4b.serve")
    server = BackgroundServer(create_app(engine, tiny_processor, ServerConfig("r4b-tiny")), engine, deadline_s=0.0)
    with server:
        logger.addHandler(records)
        try:
            body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000,
                               "min_tokens": 3000, "stream": True}).encode()
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body)
                assert s.recv(100).startswith(b"HTTP/1.1 200")  # streaming: generation is running
                slow.set()
                assert inside.wait(20)
                server.server.handle_exit(signal.SIGTERM, None)  # what SIGTERM does in `r4b serve`
                server.thread.join(20)
        finally:
            logger.removeHandler(records)
    messages = [r.getMessage() for r in records.records]
    assert messages and not any("went away" in m for m in messages), messages
    assert any("shut" in m and "--shutdown-timeout" in m for m in messages), messages
    assert "Traceback" not in capfd.readouterr().err  # uvicorn printed one for the cancelled handler


def test_docs_serving_lists_every_serve_flag():
    """docs/serving.md's flag table names every option of `r4b serve --help` (--ssl-certfile / --ssl-keyfile
    and 19 others were missing)."""
    import argparse

    from r4b_core.cli.main import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = {f for action in subparsers.choices["serve"]._actions for f in action.option_strings
             if f.startswith("--") and f != "--help"}
    doc = (REPO / "docs" / "serving.md").read_text(encoding="utf-8")
    assert len(flags) > 20 and sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", doc)) == []
