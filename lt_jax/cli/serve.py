"""`lt-jax serve MODEL [--plan ...] [--host 127.0.0.1] [--port 8000] [--max-batch N] [--mesh ...]`: an
OpenAI-compatible server over the hybrid engine (`lt_jax.server`; needs the `serve` extra). It runs until SIGTERM
or Ctrl-C, finishing the requests in flight."""
from __future__ import annotations

from lt_jax.cli.flags import (POSITIVE, check_plans, load_model, model_argument, plan_flag_values, plan_flags,
                              plan_from_args, run_flags)

NAME = "serve"
HELP = "serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming, echo logprobs)"


def add_arguments(s):
    run_flags(s)
    model_argument(s)
    plan_flags(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--max-batch", type=POSITIVE, default=8, help="rows per decode batch (default 8)")
    s.add_argument("--chunk", type=POSITIVE, default=8,
                   help="decode steps per compiled call: tokens stream in chunks of this many (default 8)")
    s.add_argument("--name", default=None, help="the model's name in the API (default: the model's label)")


def run(args) -> dict:
    from lt_jax.server import serve
    check_plans(args, {args.plan: plan_flag_values(args)})
    model = load_model(args)
    plan = plan_from_args(model, args)
    serve(model, args.host, args.port, plan, args.max_batch, args.chunk, args.name)
    return {"served": args.host + ":" + str(args.port)}
