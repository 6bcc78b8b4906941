"""The `sovereignd` command line: `main` (in `main`, the only place that turns errors into exit
statuses) and one module per command group, which registers its subcommands and handles them."""

from sovereignd.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
