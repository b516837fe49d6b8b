"""The `r4b` command as a user runs it: shared options, the one error wrapper, and `r4b inspect`."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from r4b_core.cli import build_parser, main
from r4b_core.cli import inspect as inspect_command
from r4b_core.cli.main import COMMANDS

SHARED_FLAGS = ["--model PATH_OR_HUB_ID", "--revision REVISION", "--device DEVICE",
                "--dtype {auto,float32,bfloat16,float16}"]


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_every_subcommand_help_lists_the_shared_flags_with_the_same_names():
    subcommands = subcommand_parsers()
    assert {"inspect", "make-synthetic", "generate", "parity", "bench"} <= set(subcommands)
    assert len(subcommands) == len(COMMANDS)
    for name, sub in subcommands.items():
        text = sub.format_help()
        for flag in SHARED_FLAGS:
            assert flag in text, f"r4b {name} --help does not list {flag}"
        assert "--new-tokens" not in text.replace("--max-new-tokens", ""), f"r4b {name} still spells --new-tokens"
    for name in ("inspect", "generate", "parity", "bench"):  # every command that generates tokens
        assert "--max-new-tokens N" in subcommands[name].format_help(), name


def test_console_module_help():
    result = subprocess.run([sys.executable, "-m", "r4b_core.cli", "bench", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert all(flag in result.stdout for flag in SHARED_FLAGS) and "--max-new-tokens" in result.stdout


@pytest.mark.parametrize("argv", [
    ["inspect"],
    ["inspect", "--load"],
    ["generate", "--prompt", "hi"],
    ["parity"],
    ["bench", "--no-compile", "--no-transformers"],
])
def test_a_missing_checkpoint_dir_is_one_error_line_and_exit_1(argv, tmp_path, capsys):
    missing = tmp_path / "no-such-checkpoint"
    assert main([*argv, "--model", str(missing)]) == 1
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("r4b: error: ") and str(missing) in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_config_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["inspect", str(tmp_path)]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("r4b: error: ")
    assert f"{tmp_path / 'config.json'}: required key '" in lines[0] and "' is missing" in lines[0]


def test_keyboard_interrupt_exits_130_without_a_traceback(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_command, "run", interrupted)
    assert main(["inspect", "--preset", "tiny"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_a_missing_optional_dependency_is_one_line_but_an_internal_import_error_is_not_hidden(monkeypatch, capsys):
    def needs(module):
        def run(args):
            raise ModuleNotFoundError(f"No module named '{module}'", name=module)
        return run

    monkeypatch.setattr(inspect_command, "run", needs("transformers"))
    assert main(["inspect", "--preset", "tiny"]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("r4b: error: No module named 'transformers'")
    assert "pip install" in lines[0] and "parity" in lines[0]
    monkeypatch.setattr(inspect_command, "run", needs("r4b_core.renamed_module"))
    with pytest.raises(ModuleNotFoundError):  # a bug in r4b keeps its traceback
        main(["inspect", "--preset", "tiny"])


def test_a_device_torch_cannot_use_is_refused_before_anything_loads(tmp_path, capsys):
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path / "never-read"), "--device", "gpu0"]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "--device 'gpu0'" in lines[0]
    if not torch.cuda.is_available():
        assert main(["parity", "--device", "cuda"]) == 1
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and lines[0].startswith("r4b: error: --device cuda")


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["inspect"]) == 2
    assert "give a CHECKPOINT (or --model) or --preset" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "a"), "--model", str(tmp_path / "b")]) == 2
    assert "two checkpoints given" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--model", str(tmp_path)]) == 2
    assert main(["make-synthetic", str(tmp_path / "a"), "--model", str(tmp_path / "b")]) == 2
    assert main(["make-synthetic", str(tmp_path / "a"), "--revision", "main"]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before writing anything
    with pytest.raises(SystemExit) as exit_info:  # argparse's own check of the value
        main(["inspect", "--preset", "tiny", "--max-new-tokens", "0"])
    assert exit_info.value.code == 2


def test_inspect_preset_runs_and_checks_cached_decode(capsys):
    assert main(["inspect", "--preset", "tiny", "--prompt-tokens", "8", "--max-new-tokens", "5"]) == 0
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


def test_inspect_positional_and_model_flag_agree(hf_qwen3_dir, capsys):
    directory, _ = hf_qwen3_dir
    assert main(["inspect", str(directory)]) == 0
    positional = capsys.readouterr().out
    assert main(["inspect", "--model", str(directory)]) == 0
    flag = capsys.readouterr().out
    assert positional == flag and f"checkpoint   {directory}" in flag
    assert main(["inspect", str(directory), "--model", str(directory)]) == 0  # the same one twice is fine
    assert capsys.readouterr().out == flag
