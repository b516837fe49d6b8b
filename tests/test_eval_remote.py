"""r4b eval --base-url against an ``r4b serve`` this test starts (127.0.0.1, a free port): the same greedy
predictions as the in-process run on the tiny checkpoint."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from r4b_core.cli.main import main
from r4b_core.serve.server import free_port
from tests.test_eval import write_jsonl, write_tsv

COMPARED = ("id", "mode", "thinking", "answer", "thought", "extracted", "parseable", "correct", "output_tokens",
            "finish_reason")


@pytest.fixture(scope="module")
def r4b_server(tiny_checkpoint):
    """One `r4b serve` for the module's tests (a start-up is seconds); the eval runs only read from it."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "r4b_core.cli", "serve", "--model", str(tiny_checkpoint), "--port", str(port),
         "--max-batch-size", "4", "--log-level", "warning", "--threads", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None:
                    pytest.fail(f"r4b serve exited: {process.stderr.read().decode()[-2000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("r4b serve did not come up within 120 s")
                time.sleep(0.2)
        yield f"{url}/v1"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _records(directory):
    lines = (directory / "predictions.jsonl").read_text().splitlines()
    return sorted(({k: json.loads(line)[k] for k in COMPARED} for line in lines), key=lambda r: (r["id"], r["mode"]))


def test_base_url_gives_the_in_process_predictions(tiny_checkpoint, r4b_server, tmp_path, capsys):
    data = write_tsv(tmp_path / "bench.tsv")
    common = ["eval", "--data", str(data), "--max-new-tokens", "8", "--threads", "1"]
    assert main(common + ["--model", str(tiny_checkpoint), "--out", str(tmp_path / "local")]) == 0
    assert main(common + ["--base-url", r4b_server, "--concurrency", "3", "--model", str(tiny_checkpoint),
                          "--out", str(tmp_path / "remote")]) == 0
    local, remote = _records(tmp_path / "local"), _records(tmp_path / "remote")
    assert len(local) == 12
    assert remote == local
    summary = json.loads((tmp_path / "remote" / "summary.json").read_text())["modes"]
    assert summary["long"]["thinking_rate"] == 1.0 and summary["short"]["thinking_rate"] == 0.0


def test_jsonl_over_base_url(r4b_server, tmp_path, capsys):
    data = write_jsonl(tmp_path / "open.jsonl")
    assert main(["eval", "--data", str(data), "--max-new-tokens", "4", "--thinking-mode", "auto",
                 "--base-url", r4b_server]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["auto", "4"]


def test_unreachable_server_is_one_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "open.jsonl")
    port = free_port()
    assert main(["eval", "--data", str(data), "--base-url", f"http://127.0.0.1:{port}/v1", "--retries", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("r4b: error: --base-url") and "cannot reach the server" in err[0]
