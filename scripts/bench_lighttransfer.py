"""LightTransfer-Test on SmolLM2-135M-Instruct and the essays, every method side by side in one run:

- needle-in-a-haystack: a 5-digit number hidden at 5 depths in essay text, prompts of 2K..8K tokens, exact match
  of the first number in a greedy 8-token answer; every method decodes from the same exact prefill (the
  all-full cache restricted per plan, `lt_jax.cache.restrict`, tested equal to that plan's own prefill);
  lighttransfer's lazy sets are the global top-k of the ratios measured in that prefill (the queue's choice, tested);
- decode-mode perplexity: exact prefill of N tokens, the next 512 scored as decode steps would score them;
- identification overhead: the selecting prefill against a fixed-plan prefill with the same number of lazy layers
  (wall clock, alternated, and XLA's FLOP count), at 4K and 8K;
- peak memory of the selecting prefill against an all-full prefill at 8K (XLA's buffer plan).

    .venv/bin/python scripts/bench_lighttransfer.py [--lengths 2048,4096,8192] [--prompts 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import lt_jax
from lt_jax import assets
from lt_jax.eval.bench import peak_bytes, tree_bytes
from lt_jax.cache import init_cache
from lt_jax.eval.evaluate import Example, generate_from, measure_prefill
from lt_jax.inference import prefill
from lt_jax.lazy import calibrate
from lt_jax.plan import Plan, make_plan, num_lazy
from lt_jax.needles import first_number, needle_prompt

DEPTHS = (0.05, 0.25, 0.5, 0.75, 0.95)
NEW_TOKENS = 8
CALIBRATION_ESSAYS = 9  # the last essays (sorted by name) calibrate; the others are haystack and ppl text


def methods(cfg, calibrated: Plan):
    """name -> plan from the prompt's ratios [L] (only lighttransfer looks at them)."""
    fixed = {name: make_plan(name, cfg, lazy_fraction=0.5) for name in
             ("full", "streaming", "random:0", "random:1", "random:2", "first", "last")}
    out = {name: (lambda r, p=plan: p) for name, plan in fixed.items()}
    for frac in (0.25, 0.5):
        out[f"lighttransfer:{frac:g}"] = lambda r, p=make_plan("lighttransfer", cfg, lazy_fraction=frac): p.choose(r)
    out["calibrated"] = lambda r: calibrated
    return out


def calibrate_plan(model, texts, context=2048, samples=8) -> tuple[Plan, dict]:
    chunks = []
    for text in texts:
        ids = model.encode(text)
        chunks += [ids[i:i + context] for i in range(0, len(ids) - context + 1, context)]
    ratios = np.stack([model.lazy_ratios(c) for c in tqdm(chunks[:samples], desc="calibration", file=sys.stderr)])
    stats = calibrate(ratios, num_lazy(model.config.num_layers, 0.5))
    return Plan(model.config.num_layers, tuple(stats["lazy_layers"]), source="calibrated"), stats


def needle(model, hay, lengths, prompts, plans, records_path):
    cfg = model.config
    measure = Plan(cfg.num_layers, select_lazy=0, source="ratios")  # every layer full, ratios measured
    rng = np.random.default_rng(0)
    rows = []
    with open(records_path, "w") as records:
        for length in lengths:
            for i in tqdm(range(prompts), desc=f"needle {length}", file=sys.stderr):
                number = int(rng.integers(10000, 100000))
                depth = DEPTHS[i % len(DEPTHS)]
                offset = (i * 1531) % (len(hay) - length)
                ids = needle_prompt(model, hay[offset:], length - 2 * NEW_TOKENS, depth, number)
                example = Example(f"{length}/{i}", {}, ids, NEW_TOKENS)
                shared, ratios = measure_prefill(model, example, measure)
                for name, choose in plans.items():
                    plan = choose(ratios)
                    answer = model.decode(generate_from(model, shared, plan, NEW_TOKENS, stop_ids=[-2]))
                    row = {"length": length, "tokens": len(ids), "depth": depth, "number": number, "method": name,
                           "lazy_layers": list(plan.lazy_layers), "answer": answer,
                           "correct": first_number(answer) == str(number)}
                    records.write(json.dumps(row) + "\n")
                    records.flush()
                    rows.append(row)
    return rows


def perplexity(model, hay, prefix, samples, plans):
    out = {name: [] for name in plans}
    for k in tqdm(range(samples), desc=f"ppl {prefix}+512", file=sys.stderr):
        ids = hay[k * 20011:k * 20011 + prefix + 512]
        for name in plans:
            if name.startswith("lighttransfer"):
                plan = make_plan("lighttransfer", model.config, lazy_fraction=float(name.split(":")[1]))
            else:
                plan = plans[name](None)
            out[name].append(model.perplexity(ids, plan=plan, prefix=prefix)["nll"])
    return {name: float(np.exp(np.mean(v))) for name, v in out.items()}


def prefill_fn(model, plan, T):
    cfg = model.config
    tokens = jax.ShapeDtypeStruct((1, T), jnp.int32)
    cache = jax.eval_shape(lambda: init_cache(cfg, plan, 1, T))
    return prefill.lower(model.params, tokens, tokens, cache, plan.prefill_layers(cfg), cfg, plan.shape).compile()


def overhead(model, lengths, reps=2):
    """Selecting prefill vs fixed-plan prefill, same lazy count: wall clock (alternated) and XLA's FLOPs."""
    cfg = model.config
    lt, fixed = make_plan("lighttransfer", cfg), make_plan("last", cfg)
    rows = []
    for T in lengths:
        ids = np.random.default_rng(T).integers(0, cfg.vocab_size, (1, T)).astype(np.int32)
        pos = np.arange(T, dtype=np.int32)[None]
        compiled = {name: prefill_fn(model, plan, T) for name, plan in (("lt", lt), ("fixed", fixed))}
        plans = {"lt": lt, "fixed": fixed}
        times = {"lt": [], "fixed": []}
        for _ in range(reps):
            for name in ("fixed", "lt"):
                cache = init_cache(cfg, plans[name], 1, T)
                t0 = time.perf_counter()
                jax.block_until_ready(compiled[name](model.params, ids, pos, cache, plans[name].prefill_layers(cfg)))
                times[name].append(time.perf_counter() - t0)
        flops = {n: c.cost_analysis()["flops"] for n, c in compiled.items()}
        rows.append({"tokens": T, "prefill_fixed_s": round(min(times["fixed"]), 2),
                     "prefill_lighttransfer_s": round(min(times["lt"]), 2),
                     "overhead_wall": round(min(times["lt"]) / min(times["fixed"]) - 1, 4),
                     "overhead_flops": round(flops["lt"] / flops["fixed"] - 1, 5)})
    return rows


def memory(model, T):
    def peak(plan):
        return peak_bytes(prefill_fn(model, plan, T))
    weights = tree_bytes(model.params)
    lt, full = peak(make_plan("lighttransfer", model.config)), peak(Plan.full(model.config.num_layers))
    return {"tokens": T, "weights_bytes": weights, "lighttransfer_peak_bytes": lt, "full_peak_bytes": full,
            "lighttransfer_over_full_without_weights": round((lt - weights) / (full - weights), 4)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="2048,4096,8192")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--ppl-prefix", type=int, default=2048)
    p.add_argument("--ppl-samples", type=int, default=3)
    p.add_argument("--overhead-lengths", default="4096,8192")
    p.add_argument("--records", default="needle_records.jsonl")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    paths = assets.fetch()
    model = lt_jax.load(paths["smollm2"])
    essays = sorted(Path(paths["essays"]).glob("*.txt"))
    hay = model.encode("\n\n".join(e.read_text() for e in essays[:-CALIBRATION_ESSAYS]))
    t0 = time.perf_counter()
    calibrated, stats = calibrate_plan(model, [e.read_text() for e in essays[-CALIBRATION_ESSAYS:]])
    plans = methods(model.config, calibrated)
    result = {"calibrated": {"lazy_layers": list(calibrated.lazy_layers), "ratio_mean": stats["ratio_mean"]}}
    result["memory"] = memory(model, max(int(x) for x in args.overhead_lengths.split(",")))
    result["overhead"] = overhead(model, [int(x) for x in args.overhead_lengths.split(",")])
    result["ppl"] = perplexity(model, hay, args.ppl_prefix, args.ppl_samples, plans)
    rows = needle(model, hay, [int(x) for x in args.lengths.split(",")], args.prompts, plans, args.records)
    acc = {}
    for r in rows:
        acc.setdefault(r["method"], {}).setdefault(r["length"], []).append(r["correct"])
    result["needle"] = {m: {str(k): float(np.mean(v)) for k, v in by.items()} for m, by in acc.items()}
    result["seconds"] = round(time.perf_counter() - t0, 1)

    lengths = sorted({r["length"] for r in rows})
    print(f"| method | {' | '.join(f'needle {n}' for n in lengths)} | ppl ({args.ppl_prefix} + 512) |")
    print("|---|" + "---|" * (len(lengths) + 1))
    for m in plans:
        cells = " | ".join(f"{result['needle'][m][str(n)]:.0%}" for n in lengths)
        print(f"| {m} | {cells} | {result['ppl'][m]:.3f} |")
    for o in result["overhead"]:
        print(f"identification at {o['tokens']}: prefill {o['prefill_lighttransfer_s']} s vs {o['prefill_fixed_s']} s "
              f"fixed ({o['overhead_wall']:+.2%} wall clock, {o['overhead_flops']:+.3%} FLOPs)")
    m = result["memory"]
    print(f"prefill peak at {m['tokens']}: {m['lighttransfer_peak_bytes'] / 2**20:.0f} MiB lighttransfer vs "
          f"{m['full_peak_bytes'] / 2**20:.0f} MiB all-full (weights {m['weights_bytes'] / 2**20:.0f} MiB; "
          f"without them {m['lighttransfer_over_full_without_weights']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
