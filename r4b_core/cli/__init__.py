"""The ``r4b`` command line: ``main.py`` holds the parser, the error wrapper and the command list;
``common.py`` the options every command shares; each other module is one command."""

from r4b_core.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
