#!/usr/bin/env python
"""Hybrid-inference benchmark on SmolLM2-135M-Instruct, fp32, this machine; every ratio measured side by side in
one run.

1. Decode tokens/s, plan `full` versus a 50 % hybrid (`last`, S=4, W=1020), at contexts 2K/4K/8K and batch 1/4/8,
   next to the bytes one decode step must read (weights + the KV buffers it attends over). The cache is filled to
   the context synthetically (decode speed does not depend on the values); the cache holds context + new tokens.
   The two plans run alternated, best of 3 each.
2. Our decode versus transformers' cached decode (greedy, its own KV cache, the steps `generate` runs) on the
   same 2K prompt, batch 1, in rounds alternated with ours (best of 5 each); and the same decode loop over both
   storages of the weights, alternated: a buffer per layer as a loaded `Model` holds them (unrolled), and stacked
   on a layer axis (scanned).
3. Prefill time versus transformers' forward at 2K and 8K (batch 1), our exact and hybrid modes; peak RSS of a
   fresh process that prefills 8K tokens.
Compile times (first call minus a warm call) are reported next to each.

Usage: python scripts/bench_inference.py [--contexts 2048,4096,8192] [--batches 1,4,8] [--steps 16] [--json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from lt_jax.eval.bench import block, timed

RSS_CHILD = r"""
def peak_rss():  # VmHWM: ru_maxrss survives exec on Linux and would report the parent's peak
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024
import sys, numpy as np, jax.numpy as jnp, lt_jax
m = lt_jax.load(sys.argv[1]); T = int(sys.argv[2]); plan = m.plan(sys.argv[3], prefill=sys.argv[4])
ids = np.random.default_rng(0).integers(0, m.config.vocab_size, (1, T)).astype(np.int32)
m.prefill(ids, plan, T).logits.block_until_ready()
print(peak_rss())
"""

# transformers' decode of the 2K prompt, in a process of its own (torch's idle OpenMP threads spin for a while after
# each op and would slow whatever runs next in the same process), one round per line read from stdin, alternated
# with ours: its bare cached steps (what generate runs, minus its overheads) from a fresh prefill, then generate(1)
# and generate(steps + 1) (`hf_generate_times`). Prints each round's seconds as one JSON line.
HF_DECODE_CHILD = r"""
import json, sys, numpy as np, torch
from transformers import AutoModelForCausalLM
from lt_jax.eval.bench import hf_generate_times, timed
ref = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
T, steps = int(sys.argv[2]), int(sys.argv[3])
x = torch.from_numpy(np.random.default_rng(1).integers(0, ref.config.vocab_size, (1, T))).long()

def cached_steps(past):
    token = torch.zeros((1, 1), dtype=torch.long)
    for _ in range(steps):
        out = ref(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

with torch.no_grad():
    for _ in sys.stdin:
        past = ref(x, use_cache=True).past_key_values  # the prefill, not timed
        steps_s = timed(lambda: cached_steps(past))[1]
        one, many = hf_generate_times(ref, x, steps)
        print(json.dumps({"steps_s": steps_s, "generate_1_s": one, "generate_n_s": many}), flush=True)
"""


def filled_cache(model, plan, batch, context, max_len):
    """A cache holding `context` positions per row (values zero), as after a prefill of that length."""
    import jax.numpy as jnp
    from lt_jax.cache import init_cache, write_positions
    cache = init_cache(model.config, plan, batch, max_len)
    positions = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (batch, context))
    return write_positions(cache, positions, plan.sink, plan.window)


def decode_rows(model, contexts, batches, steps):
    import jax
    import jax.numpy as jnp
    from lt_jax.cache import expected_kv_bytes
    from lt_jax.inference import Sampling, generate_loop
    cfg = model.config
    weight_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(model.params))
    plans = {"full": model.plan("full"), "hybrid-50%": model.plan("last", lazy_fraction=0.5)}
    rows = []
    for context in contexts:
        for batch in batches:
            row = {"context": context, "batch": batch}
            max_len = context + steps
            logits = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
            args = lambda plan: block((model.params, logits, filled_cache(model, plan, batch, context, max_len),  # noqa
                                       plan.layers(cfg), Sampling(steps, stop_ids=()).prepared()))
            run = lambda plan, a: block(generate_loop(*a, cfg, plan.shape))  # noqa: E731
            first = {name: timed(lambda: run(plan, args(plan)))[1] for name, plan in plans.items()}  # compiles
            warm = {name: [] for name in plans}
            for _ in range(3):  # alternated, best of 3: the machine's speed drifts over minutes
                for name, plan in plans.items():
                    a = args(plan)  # the loop donates its cache
                    warm[name].append(timed(lambda: run(plan, a))[1])
            for name, plan in plans.items():
                kv = expected_kv_bytes(cfg, plan, batch, max_len)
                row[name] = {"tokens_per_s": round(batch * steps / min(warm[name]), 1),
                             "bytes_per_step": weight_bytes + kv, "kv_bytes": kv,
                             "compile_s": round(first[name] - min(warm[name]), 1)}
            f, h = row["full"], row["hybrid-50%"]
            row["speed_ratio"] = round(h["tokens_per_s"] / f["tokens_per_s"], 3)
            row["bytes_ratio"] = round(f["bytes_per_step"] / h["bytes_per_step"], 3)
            row["speed_over_bytes"] = round(row["speed_ratio"] / row["bytes_ratio"], 3)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def vs_transformers(model, hf_dir, steps, prefill_lengths):
    """Our prefill and decode timings, then transformers' prefill in this process (torch's idle OpenMP threads spin
    for a while after each op and would slow whatever runs next in it); transformers' decode runs in a process of
    its own, alternated with ours (`HF_DECODE_CHILD`)."""
    import torch
    from transformers import AutoModelForCausalLM
    from lt_jax.cache import init_cache
    from lt_jax.inference import Sampling, generate_loop, prefill
    from lt_jax.params import stack_layers
    cfg = model.config
    rows = []
    for T in prefill_lengths:
        ids = np.random.default_rng(T).integers(0, cfg.vocab_size, (1, T)).astype(np.int32)
        pos = np.arange(T, dtype=np.int32)[None]
        row = {"tokens": T}
        for mode in ("exact", "hybrid"):
            plan = model.plan("last", lazy_fraction=0.5, prefill=mode) if mode == "hybrid" else model.plan("full")
            shape, layers = plan.shape, plan.layers(cfg)
            run = lambda: block(prefill(model.params, ids, pos, init_cache(cfg, plan, 1, T + steps), layers,  # noqa
                                        cfg, shape))
            _, first = timed(run)
            _, warm = timed(run)
            row[f"lt_jax_{mode}_s"] = round(warm, 2)
            row[f"lt_jax_{mode}_compile_s"] = round(first - warm, 1)
        rows.append(row)
    # decode speed on a 2K prompt, batch 1: our compiled loop over both storages of the weights, and transformers'
    # decode in its own process, rounds alternated (the machine's speed drifts over minutes)
    T = 2048
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, T)).astype(np.int32)
    plan = model.plan("full")
    shape, layers = plan.shape, plan.layers(cfg)
    fresh = lambda: block(prefill(model.params, ids, np.arange(T, dtype=np.int32)[None],  # noqa: E731
                                  init_cache(cfg, plan, 1, T + steps), layers, cfg, shape))
    sampling = Sampling(steps, stop_ids=()).prepared()
    loop = lambda lc, params: block(generate_loop(params, lc[0], lc[1], layers, sampling, cfg, shape))  # noqa: E731
    # The weights as a loaded Model holds them (a buffer per layer, decode unrolled) and stacked (scanned).
    stacked = stack_layers(model.params)
    layouts = {"per_layer": model.params, "stacked": stacked}
    first_call = {name: timed(lambda: loop(fresh(), params))[1] for name, params in layouts.items()}  # compiles
    warm = {name: [] for name in layouts}
    hf = subprocess.Popen([sys.executable, "-c", HF_DECODE_CHILD, str(hf_dir), str(T), str(steps)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    hf_rounds = []
    for _ in range(5):
        for name, params in layouts.items():
            logits_cache = fresh()
            warm[name].append(timed(lambda: loop(logits_cache, params))[1])
        time.sleep(1)  # let the other process's threads go idle before each side's round
        hf.stdin.write("go\n")
        hf.stdin.flush()
        hf_rounds.append(json.loads(hf.stdout.readline()))
        time.sleep(1)
    hf.stdin.close()
    hf.wait()
    ours, ours_stacked = (min(warm[name]) for name in layouts)
    del layouts, stacked
    hf_decode = min(r["steps_s"] for r in hf_rounds)
    generate_s = min(r["generate_n_s"] for r in hf_rounds) - min(r["generate_1_s"] for r in hf_rounds)

    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for row in rows:
            x = torch.from_numpy(np.random.default_rng(row["tokens"]).integers(0, cfg.vocab_size,
                                                                                 (1, row["tokens"]))).long()
            ref(x)
            _, t = timed(lambda: ref(x))
            row["transformers_s"] = round(t, 2)
            row["speedup_exact"] = round(t / row["lt_jax_exact_s"], 2)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return {"prefill": rows,
            "decode_2k_batch1": {"lt_jax_tokens_per_s": round(steps / ours, 1),
                                 "lt_jax_stacked_weights_tokens_per_s": round(steps / ours_stacked, 1),
                                 "per_layer_over_stacked": round(ours_stacked / ours, 2),
                                 "compile_s": {name: round(first_call[name] - min(warm[name]), 1) for name in warm},
                                 "transformers_tokens_per_s": round(steps / hf_decode, 1),
                                 "transformers_generate_tokens_per_s": round(steps / generate_s, 1),
                                 "speedup": round(hf_decode / ours, 2),
                                 "speedup_vs_generate": round(generate_s / ours, 2)}}


def prefill_peak_rss(ckpt, T, plan, mode):
    run = subprocess.run([sys.executable, "-c", RSS_CHILD, str(ckpt), str(T), plan, mode], capture_output=True,
                         text=True, check=True)
    return int(run.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="2048,4096,8192")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--prefill-lengths", default="2048,8192")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    import lt_jax
    from lt_jax import assets
    ckpt, hf_dir = assets.checkpoint(assets.SMOLLM2), assets.hf_dir(assets.SMOLLM2)
    model = lt_jax.load(ckpt)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    result = {"decode": decode_rows(model, ints(args.contexts), ints(args.batches), args.steps)}
    result.update(vs_transformers(model, hf_dir, args.steps, ints(args.prefill_lengths)))
    longest = max(ints(args.prefill_lengths))
    result["prefill_peak_rss_bytes"] = {mode: prefill_peak_rss(ckpt, longest, plan, mode)
                                        for plan, mode in (("full", "exact"), ("last", "hybrid"))}
    if args.json:
        print(json.dumps(result))
        return 0
    print("| context | batch | full tok/s | hybrid tok/s | speed ratio | bytes/step ratio | speed / bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in result["decode"]:
        print(f"| {r['context']} | {r['batch']} | {r['full']['tokens_per_s']} | {r['hybrid-50%']['tokens_per_s']} | "
              f"{r['speed_ratio']} | {r['bytes_ratio']} | {r['speed_over_bytes']} |")
    d = result["decode_2k_batch1"]
    print(f"\ndecode at 2K, batch 1: lt-jax {d['lt_jax_tokens_per_s']} tok/s vs transformers' generate "
          f"{d['transformers_generate_tokens_per_s']} tok/s ({d['speedup_vs_generate']}x) and its bare cached "
          f"decode steps {d['transformers_tokens_per_s']} tok/s ({d['speedup']}x); the same loop over stacked "
          f"weights (scanned): {d['lt_jax_stacked_weights_tokens_per_s']} tok/s (per-layer "
          f"{d['per_layer_over_stacked']}x faster)")
    print("\n| prompt | lt-jax exact prefill (s) | lt-jax hybrid prefill (s) | transformers forward (s) | speed-up |")
    print("|---|---|---|---|---|")
    for r in result["prefill"]:
        print(f"| {r['tokens']} | {r['lt_jax_exact_s']} (compile {r['lt_jax_exact_compile_s']}) | "
              f"{r['lt_jax_hybrid_s']} (compile {r['lt_jax_hybrid_compile_s']}) | {r['transformers_s']} | "
              f"{r['speedup_exact']}x |")
    rss = result["prefill_peak_rss_bytes"]
    print(f"\npeak RSS of a process prefilling {longest} tokens: exact {rss['exact'] / 2**30:.2f} GiB, "
          f"hybrid {rss['hybrid'] / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
