#!/usr/bin/env python
"""Two checkouts of lt-jax side by side on this machine: decode tokens/s and prefill seconds of each, in rounds
alternated between them (the machine's speed drifts over minutes), best of N each, and their ratio. For a change
that must keep the CPU speed: `git worktree add ../before HEAD~1`, then

    python scripts/bench_ab.py ../before . [--model DIR] [--context 4096] [--batch 4] [--steps 16]
                               [--prefill 2048,8192] [--rounds 5] [--json]

Each checkout runs in a process of its own (PYTHONPATH = that checkout), loads the model once (fp32), compiles,
then times one round per line it reads: `generate_loop` under `full` and a 50 % hybrid (`last`, S=4, W=1020) over
a cache filled to --context, and exact prefill at each --prefill length."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, numpy as np, jax.numpy as jnp, lt_jax
from lt_jax.cache import init_cache, write_positions
from lt_jax.eval.bench import block, timed
from lt_jax.inference import Sampling, generate_loop, prefill
model = lt_jax.load(sys.argv[1], dtype="float32")
context, batch, steps = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
lengths = [int(t) for t in sys.argv[5].split(",") if t]
cfg = model.config
plans = {"full": model.plan("full"), "hybrid-50%": model.plan("last", lazy_fraction=0.5)}

def decode_args(plan):
    cache = init_cache(cfg, plan, batch, context + steps)
    positions = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (batch, context))
    cache = write_positions(cache, positions, plan.sink, plan.window)
    return block((model.params, jnp.zeros((batch, cfg.vocab_size), jnp.float32), cache, plan.layers(cfg),
                  Sampling(steps, stop_ids=()).prepared()))

def decode(plan):
    args = decode_args(plan)  # the loop donates its cache
    return timed(lambda: block(generate_loop(*args, cfg, plan.shape)))[1]

def prefill_s(T):
    plan = plans["full"]
    ids = np.random.default_rng(T).integers(0, cfg.vocab_size, (1, T)).astype(np.int32)
    pos = np.arange(T, dtype=np.int32)[None]
    return timed(lambda: block(prefill(model.params, ids, pos, init_cache(cfg, plan, 1, T), plan.layers(cfg), cfg,
                                       plan.shape)))[1]

def round_():
    out = {name: decode(plan) for name, plan in plans.items()}
    out.update({f"prefill-{T}": prefill_s(T) for T in lengths})
    return out

round_()  # compiles
print("ready", flush=True)
for _ in sys.stdin:
    print(json.dumps(round_()), flush=True)
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="checkout A (e.g. the code before a change)")
    p.add_argument("b", help="checkout B")
    p.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M-Instruct under the assets)")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prefill", default="2048,8192", help="exact prefill lengths (comma list; empty: none)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    trees = {name: Path(path).resolve() for name, path in (("a", args.a), ("b", args.b))}
    for name, tree in trees.items():
        if not (tree / "lt_jax" / "__init__.py").is_file():
            print(f"bench_ab: {tree} is not an lt-jax checkout (no lt_jax/__init__.py).", file=sys.stderr)
            return 2
    model = args.model or str(Path(os.environ.get("LT_JAX_ASSETS", ".assets")) / "lt" / "smollm2-135m-instruct")
    children = {}
    for name, tree in trees.items():
        env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        children[name] = subprocess.Popen(
            [sys.executable, "-c", CHILD, model, str(args.context), str(args.batch), str(args.steps), args.prefill],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if children[name].stdout.readline().strip() != "ready":  # one at a time: compiles do not overlap
            print(f"bench_ab: checkout {trees[name]} failed to start (its error is above).", file=sys.stderr)
            return 1
    times = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, child in children.items():
            child.stdin.write("go\n")
            child.stdin.flush()
            times[name].append(json.loads(child.stdout.readline()))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    for child in children.values():
        child.stdin.close()
        child.wait()
    best = {name: {k: min(t[k] for t in rounds) for k in rounds[0]} for name, rounds in times.items()}
    tokens = args.batch * args.steps
    rows = []
    for key in best["a"]:
        a, b = best["a"][key], best["b"][key]
        if key.startswith("prefill"):
            rows.append({"measure": f"{key} s", "a": round(a, 4), "b": round(b, 4), "b_over_a": round(b / a, 3)})
        else:
            rows.append({"measure": f"decode {key} tokens/s", "a": round(tokens / a, 1), "b": round(tokens / b, 1),
                         "b_over_a": round(a / b, 3)})
    out = {"a": str(trees["a"]), "b": str(trees["b"]), "context": args.context, "batch": args.batch,
           "steps": args.steps, "rounds": args.rounds, "rows": rows}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"A = {trees['a']}\nB = {trees['b']}\ncontext {args.context}, batch {args.batch}, {args.steps} steps; "
              f"best of {args.rounds} alternated rounds")
        for row in rows:
            print(f"{row['measure']:32} A {row['a']:>10} B {row['b']:>10}  B/A {row['b_over_a']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
