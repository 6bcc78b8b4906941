"""The `sovereignd` command line (split into its command groups in the next commit)."""

from sovereignd.cli.integrity import build_parser, main

__all__ = ["build_parser", "main"]
