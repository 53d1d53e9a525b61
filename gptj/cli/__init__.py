"""The `gptj` command, the top floor of the package: nothing imports it."""

from gptj.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
