#!/usr/bin/env python
"""Continuous batching versus static batches, side by side in one run, on the same prompts (random ids of mixed
lengths, each with its own token budget; no stop ids, so every row runs exactly its budget and both paths produce
the same tokens):

(a) continuous: `Model.generate_stream` (each prompt prefilled alone into a free row of a batch of B, decoded in
    compiled chunks, a finished row taking the next prompt at once; prompts grouped by length bucket, one cache
    per bucket), and the same with one cache for all prompts (`group_by_length=False`);
(b) static: the prompts in input order, B at a time, through `Model.generate`: each batch left padded to its
    longest prompt and decoded until its largest budget is spent (a row's tokens past its own budget are waste).

tokens/s = the budgets' sum / wall seconds of the whole path (prefill and decode). Compilation is excluded: both
paths first run on one prompt per shape they will meet (same prompt buckets, cache lengths, batch shapes).

Usage: python scripts/bench_serving.py [--model smollm2] [--prompts 64] [--min-len 32] [--max-len 1000]
       [--min-new 8] [--max-new 64] [--batch-size 8] [--plan full] [--chunk 8] [--seed 0] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def workload(vocab: int, n: int, lengths: tuple[int, int], budgets: tuple[int, int], seed: int):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, int(t)).tolist() for t in rng.integers(*lengths, n, endpoint=True)]
    return prompts, [int(b) for b in rng.integers(*budgets, n, endpoint=True)]


def continuous(model, prompts, budgets, args, by_length: bool = True) -> int:
    rows = model.generate_stream(prompts, args.plan, batch_size=args.batch_size, max_new_tokens=budgets,
                                 stop_ids=(), chunk=args.chunk, group_by_length=by_length)
    return sum(len(r["ids"]) for r in rows)


def static(model, prompts, budgets, args) -> tuple[int, int]:
    """(tokens within the budgets, tokens decoded in all: rows run until their batch's largest budget)."""
    useful = decoded = 0
    for start in range(0, len(prompts), args.batch_size):
        batch, wanted = prompts[start:start + args.batch_size], budgets[start:start + args.batch_size]
        out = model.generate(batch, args.plan, max_new_tokens=max(wanted), stop_ids=())
        useful += sum(min(len(r["ids"]), b) for r, b in zip(out, wanted))
        decoded += sum(len(r["ids"]) for r in out)
    return useful, decoded


def warm(model, prompts, budgets, args):
    """Compile what both paths will run, on one prompt per shape: (a) per length bucket its longest prompt and
    largest budget (so the same cache length); (b) per static batch a batch of its longest prompt."""
    from lt_jax.batching import bucket
    from lt_jax.serving import Request, groups
    context = model.config.max_position_embeddings
    reqs = groups([Request(i, p, b) for i, (p, b) in enumerate(zip(prompts, budgets))], context)
    longest = [max((r.ids for r in g), key=len) for g in reqs]
    continuous(model, longest, [max(r.budget for r in g) for g in reqs], args)
    continuous(model, longest, [max(budgets)] * len(reqs), args, by_length=False)  # the same cache length as all
    seen = set()
    for start in range(0, len(prompts), args.batch_size):
        batch, wanted = prompts[start:start + args.batch_size], budgets[start:start + args.batch_size]
        longest = max(batch, key=len)
        key = (len(batch), min(bucket(len(longest)), context), model.cache_len(len(longest), max(wanted)),
               bucket(max(wanted)))
        if key not in seen:
            seen.add(key)
            static(model, [longest] * len(batch), [max(wanted)] * len(batch), args)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="an asset name or a checkpoint dir (default smollm2)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=1000)
    p.add_argument("--min-new", type=int, default=8)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--plan", default="full", help="a plan spec (default full)")
    p.add_argument("--chunk", type=int, default=8, help="decode steps per compiled call of (a) (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import lt_jax
    from lt_jax import assets
    if args.model in ("smollm2", "qwen2.5-coder"):
        assets.fetch(qwen=args.model == "qwen2.5-coder")
    model = lt_jax.load(args.model)
    prompts, budgets = workload(model.config.vocab_size, args.prompts, (args.min_len, args.max_len),
                                (args.min_new, args.max_new), args.seed)
    say = lambda msg: print(f"[bench_serving] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"{model.label}: {len(prompts)} prompts of {args.min_len}..{args.max_len} tokens, budgets "
        f"{args.min_new}..{args.max_new}, batch {args.batch_size}, plan {args.plan}; warming both paths ...")
    t0 = time.perf_counter()
    warm(model, prompts, budgets, args)
    say(f"warm-up (compilation) {time.perf_counter() - t0:.1f} s; continuous ...")
    t0 = time.perf_counter()
    tokens_a = continuous(model, prompts, budgets, args)
    seconds_a = time.perf_counter() - t0
    say(f"continuous {seconds_a:.1f} s; continuous with one cache ...")
    t0 = time.perf_counter()
    tokens_c = continuous(model, prompts, budgets, args, by_length=False)
    seconds_c = time.perf_counter() - t0
    say(f"one cache {seconds_c:.1f} s; static ...")
    t0 = time.perf_counter()
    tokens_b, decoded_b = static(model, prompts, budgets, args)
    seconds_b = time.perf_counter() - t0
    assert tokens_a == tokens_b == tokens_c == sum(budgets), (tokens_a, tokens_b, tokens_c, sum(budgets))
    result = {"model": model.label, "plan": args.plan, "prompts": len(prompts), "batch_size": args.batch_size,
              "prompt_tokens": sum(map(len, prompts)), "new_tokens": sum(budgets), "chunk": args.chunk,
              "continuous": {"seconds": round(seconds_a, 2), "tokens_per_s": round(tokens_a / seconds_a, 2)},
              "continuous_one_cache": {"seconds": round(seconds_c, 2),
                                       "tokens_per_s": round(tokens_c / seconds_c, 2)},
              "static": {"seconds": round(seconds_b, 2), "tokens_per_s": round(tokens_b / seconds_b, 2),
                         "decoded_tokens": decoded_b},
              "speedup": round(seconds_b / seconds_a, 3), "speedup_one_cache": round(seconds_b / seconds_c, 3)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"continuous batching  {result['continuous']['tokens_per_s']:8.2f} tokens/s  ({seconds_a:.1f} s)")
        print(f"  one cache          {result['continuous_one_cache']['tokens_per_s']:8.2f} tokens/s  "
              f"({seconds_c:.1f} s; group_by_length=False)")
        print(f"static batches       {result['static']['tokens_per_s']:8.2f} tokens/s  ({seconds_b:.1f} s; "
              f"{decoded_b} tokens decoded for {tokens_b})")
        print(f"ratio                {result['speedup']:.2f}x (one cache: {result['speedup_one_cache']:.2f}x)")
    return result


if __name__ == "__main__":
    main()
