"""The `lt-jax` command line: `main` (the entry point) and its parser."""
from lt_jax.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
