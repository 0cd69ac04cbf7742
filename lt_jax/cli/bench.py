"""`lt-jax bench MODEL`: speed and memory per method (`lt_jax.eval.bench`), or with --throughput the largest batch a
memory budget fits and its throughput."""
from __future__ import annotations

import re
from pathlib import Path

from lt_jax.cli.flags import (POSITIVE, load_model, model_argument, parse_list, plan_flag_values, plan_flags,
                              run_flags)
from lt_jax.errors import LtJaxError

NAME = "bench"
HELP = ("prefill/decode speed, time to first token, KV bytes, peak memory and compile times per method; "
        "--throughput: the largest batch a memory budget fits and its throughput relative to full")
INTERRUPTED = "nothing was written; rerun the same command to measure again"
DEFAULT_CONTEXTS = {False: "2048,4096", True: "4096,8192,16384,32768"}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30, "t": 2**40, "tib": 2**40}


def add_arguments(s):
    run_flags(s)
    model_argument(s)
    plan_flags(s, with_plan=False)
    s.add_argument("--methods", default="full,lighttransfer",
                   help="comma-separated plans, each measured against full in the same run (full, lighttransfer, "
                        "streaming, first, last, random[:SEED], PLAN.json; default: full,lighttransfer)")
    s.add_argument("--contexts", default=None,
                   help="cache slots: a prompt of CONTEXT - NEW_TOKENS random tokens, then the new tokens "
                        f"(default {DEFAULT_CONTEXTS[False]}; with --throughput {DEFAULT_CONTEXTS[True]})")
    s.add_argument("--batches", default="1,4", help="batch sizes of the default mode (default 1,4)")
    s.add_argument("--new-tokens", type=POSITIVE, default=32, help="tokens generated per row (default 32)")
    s.add_argument("--repeats", type=POSITIVE, default=1,
                   help="runs of the timed generation loop; the fastest counts (default 1)")
    s.add_argument("--seed", type=int, default=0, help="random token ids (default 0)")
    s.add_argument("--throughput", action="store_true",
                   help="the largest batch that fits --memory-budget per method and context, and the decode "
                        "throughput at that batch relative to full")
    s.add_argument("--memory-budget", default="8GiB",
                   help="--throughput: weights + XLA's peak buffer plan must fit this (e.g. 8GiB, 512MiB, 2GB; "
                        "default 8GiB)")
    s.add_argument("--prefill-every-row", action="store_true",
                   help="--throughput: prefill every row from its own prompt as an engine would (batch times "
                        "the prefill time); default: prefill one prompt and insert it into every row")
    s.add_argument("--transformers", action="store_true",
                   help="--throughput: also transformers' fp32 generate at full's batch (needs an HF model)")


def parse_budget(text: str) -> int:
    """'8GiB', '512MiB', '1.5GiB' (powers of 2), '2GB' (powers of 10), or plain bytes -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and _UNITS.get(m.group(2).lower())
    if not unit or float(m.group(1)) * unit < 1:
        raise LtJaxError(f"--memory-budget {text!r} is not a size like 8GiB, 512MiB, 2GB or 1.5GiB.")
    return int(float(m.group(1)) * unit)


def parse_ints(text: str, flag: str) -> list[int]:
    """'1,4,8' -> [1, 4, 8], each at least 1."""
    values = parse_list(str(text), int, flag)
    if min(values) < 1:
        raise LtJaxError(f"{flag} must list integers of at least 1; got {text!r}.")
    return values


def hf_dir_of(name: str, model) -> Path:
    """The HF directory behind MODEL: itself, or an asset's (smollm2, qwen2.5-coder) HF checkpoint."""
    from checkpoints_conv import is_checkpoint
    from lt_jax import assets
    path = Path(model.path) if model.path is not None else None
    if path is not None and (path / "config.json").exists() and not is_checkpoint(path):
        return path
    for key, asset in assets.MODELS.items():
        if name == key or path == assets.cache_dir() / "lt" / asset.name:
            return assets.hf_dir(asset)
    raise LtJaxError(f"--transformers needs a Hugging Face model directory or an asset name (smollm2, "
                     f"qwen2.5-coder); {name} is neither.")


def measure(args, model, executables=None) -> dict:
    """The flags -> `lt_jax.eval.bench.run`'s parameters, checked, then the measurement."""
    from lt_jax.eval import bench
    if args.new_tokens < 1 or args.repeats < 1:
        raise LtJaxError(f"--new-tokens ({args.new_tokens}) and --repeats ({args.repeats}) must be at least 1.")
    contexts = parse_ints(args.contexts or DEFAULT_CONTEXTS[args.throughput], "--contexts")
    batches = parse_ints(args.batches, "--batches")
    budget = parse_budget(args.memory_budget) if args.throughput else None
    if args.transformers and not args.throughput:
        raise LtJaxError("--transformers is a baseline of the --throughput mode; add --throughput.")
    if min(contexts) <= args.new_tokens:
        raise LtJaxError(f"context {min(contexts)} leaves no prompt before {args.new_tokens} new tokens; give "
                         f"larger --contexts.")
    specs = [s.strip() for s in args.methods.split(",") if s.strip()]
    specs = (["full"] if "full" not in specs else []) + specs  # every ratio is against full, measured here
    flags = {k: v for k, v in plan_flag_values(args).items() if k != "protect"}
    plans = {s: model.plan(s, **flags) for s in specs}
    hf_dir = hf_dir_of(getattr(args, "model", str(model.path)), model) if args.transformers else None
    return bench.run(model, plans, contexts, batches, args.new_tokens, args.repeats, args.seed, budget,
                     args.prefill_every_row, hf_dir, executables)


def run(args) -> dict:
    from lt_jax.eval.bench import markdown
    result = measure(args, load_model(args))
    if not args.json:
        print(markdown(result))
    return result
