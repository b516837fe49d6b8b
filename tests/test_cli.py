"""The `r4b` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from r4b_core.cli import main


def test_inspect_preset_runs_and_checks_cached_decode(capsys):
    assert main(["inspect", "--preset", "tiny", "--prompt-tokens", "8", "--new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "cached decode equals uncached decode" in out
    assert "19,521,920" in out  # tiny decoder: 2 x 151936 x 64 embeddings/head + 2 layers


def test_inspect_checkpoint_reads_headers_and_loads(hf_qwen3_dir, capsys):
    directory, hf = hf_qwen3_dir
    assert main(["inspect", str(directory), "--load"]) == 0
    out = capsys.readouterr().out
    n_params = sum(p.numel() for p in hf.parameters())
    assert f"{n_params:,d} parameters" in out
    assert "text-only (qwen3)" in out and "loaded" in out


def test_inspect_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "no such checkpoint directory" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["inspect", str(tmp_path)]) == 1
    assert "required key 'num_attention_heads' is missing" in capsys.readouterr().err
    assert main(["inspect"]) == 2


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "r4b_core.cli", "inspect", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--preset" in result.stdout
