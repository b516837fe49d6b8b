"""scripts/load_test.py: its SSE reader (shared with scripts/serve_scenarios.py) and a short soak end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import load_test  # scripts/load_test.py (conftest puts scripts/ on the path)

ROOT = Path(__file__).resolve().parents[1]


class _Lines:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def iter_lines(self):
        return iter(self.lines)


def _data(obj: dict) -> str:
    return "data: " + json.dumps(obj)


def test_sse_chunks_yields_each_chunk_then_none_for_done_and_skips_other_lines():
    lines = [": keep-alive", _data({"choices": [{"delta": {"content": "a"}}]}), "", _data({"usage": {"x": 1}}),
             "data: [DONE]", _data({"after": "done"})]
    assert list(load_test.sse_chunks(_Lines(lines))) == [{"choices": [{"delta": {"content": "a"}}]},
                                                         {"usage": {"x": 1}}, None]


def test_sse_chunks_without_done_ends_without_none_and_an_error_chunk_raises():
    assert list(load_test.sse_chunks(_Lines([_data({"a": 1})]))) == [{"a": 1}]  # broken off: lost
    reader = load_test.sse_chunks(_Lines([_data({"a": 1}), _data({"error": {"message": "boom"}})]))
    assert next(reader) == {"a": 1}
    with pytest.raises(load_test.StreamError, match="boom"):
        next(reader)


@pytest.mark.slow
def test_a_short_soak_on_the_tiny_preset_completes_every_request():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "load_test.py"), "soak", "--preset", "tiny",
                          "--requests", "10", "--warmup-requests", "2", "--concurrency", "4", "--max-tokens", "8",
                          "--threads", "1", "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert (report["completed"], report["failed"], report["lost"]) == (10, 0, 0)
