"""scripts/device_check.sh --dry-run: the GPU check's code paths on the CPU, so the script cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), R4B_CACHE=str(tmp_path / "cache"), PATH=os.environ["PATH"])
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the test's python first
    result = subprocess.run(["bash", "scripts/device_check.sh", "--dry-run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    kernel = json.loads((tmp_path / "kernel.json").read_text())
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert kernel["correctness"] and all(r["passed"] for r in kernel["correctness"])
    assert {r["context"] for r in kernel["timing"]["rows"]} == {64, 128}
    assert bench["decode_tokens_per_s_float32"] > 0 and bench["batch1_throughput_ratio_ours_vs_transformers"] > 0
    agreement = json.loads((tmp_path / "agreement.json").read_text())
    assert agreement["requests"] == 4 and agreement["tokens"] == 16 and agreement["mode"] == "default"
    table = result.stdout.splitlines()
    assert any(line.startswith("engine greedy tokens alone vs 2 together (cpu") for line in table)
    assert any(line.startswith("== device check") for line in table)  # the short table comes last
    assert "ours / transformers" in table[-1]
