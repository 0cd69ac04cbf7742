"""`lt-jax fetch`: the real model and the essays, fetched and converted once."""
from __future__ import annotations

NAME = "fetch"
HELP = "fetch and convert the real model and the essays (idempotent)"


def add_arguments(s):
    s.add_argument("--qwen", action="store_true", help="also Qwen2.5-Coder-0.5B-Instruct (about 500 MB)")


def run(args) -> dict:
    from lt_jax import assets
    return assets.fetch(qwen=args.qwen)
