"""Helpers of the bad-input tests (test_bad_input_*.py): the one-line errors a command prints, and the ids
of the synthetic tokenizer's control tokens. Not a test module."""

from __future__ import annotations

import pytest

from r4b_core.cli import main

CONTROL_IDS = range(151643, 151670)  # Qwen3's added tokens and <image> in the synthetic tokenizer
IMAGE_ID = 151669


def err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def one_error(capsys) -> str:
    lines = err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("r4b: error: "), lines
    return lines[0]


def usage_error(capsys, argv: list[str]) -> str:
    """The argparse error line of a command line refused by its parser (exit 2)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return err_lines(capsys)[-1]
