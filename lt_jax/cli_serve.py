"""`lt-jax serve MODEL [--plan ...] [--host 127.0.0.1] [--port 8000] [--max-batch N] [--mesh ...]`: an
OpenAI-compatible server over the hybrid engine (`lt_jax.server`; needs the `serve` extra)."""
from __future__ import annotations

import argparse
import sys

from lt_jax.errors import LtJaxError

NAME = "serve"
HELP = "serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming, echo logprobs)"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("model", help="checkpoint, Hugging Face model directory, or asset name (smollm2, ...)")
    parser.add_argument("--plan", default=None,
                        help="the server's plan: full | streaming | first | last | random[:SEED] | lighttransfer | "
                             "retrieval-aware[:PROBE] | PLAN.json (default: the model's stored plan, else full); a "
                             "request may choose another with the body field lt_plan")
    parser.add_argument("--lazy-fraction", type=float, default=0.5, help="fraction of lazy layers (default 0.5)")
    parser.add_argument("--sink", type=int, default=None, help="sink tokens S of streaming layers (default 4)")
    parser.add_argument("--window", type=_positive, default=None, help="window W of streaming layers (default 1020)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-batch", type=_positive, default=8, help="rows per decode batch (default 8)")
    parser.add_argument("--chunk", type=_positive, default=8,
                        help="decode steps per compiled call: tokens stream in chunks of this many (default 8)")
    parser.add_argument("--name", default=None, help="the model's name in the API (default: the model's label)")
    parser.add_argument("--mesh", default=None, help="device mesh AXIS=SIZE,... e.g. data=2,model=4 (default: one "
                                                     "device)")


def run(args) -> int:
    import lt_jax
    from lt_jax.server import serve
    try:
        model = lt_jax.load(args.model, mesh=args.mesh)
        plan = model.plan(args.plan, lazy_fraction=args.lazy_fraction, sink=args.sink, window=args.window)
        return serve(model, args.host, args.port, plan, args.max_batch, args.chunk, args.name)
    except LtJaxError as e:
        print(f"lt-jax serve: error: {e}", file=sys.stderr)
        return 2
