"""Compile seconds and per-chip memory of the 8B decode and prefill programs for a TPU slice (ahead of time, on this
host; lt_jax.aot) with the weights split into per-layer buffers (decode unrolls the layers: the CPU storage) and
stacked (decode scans one layer body: the TPU storage, `lt_jax.params.default_layers`), each pair compiled back to
back so a loaded host slows both alike. Writes results/pods/compile-time-8b.json (rows, and per program and plan
the stacked/split ratios). Every number is compiled-not-run.

    JAX_PLATFORMS=cpu python scripts/compile_time_layers.py [--out FILE] [--programs prefill,generate_loop,decode_chunk]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

from lt_jax import aot
from lt_jax.cli.compile import read_config
from lt_jax.plan import make_plan

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "configs" / "Llama-3.1-8B-Instruct"))
    ap.add_argument("--target", default="v5e:2x4")
    ap.add_argument("--mesh", default="data=1,model=8")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--plans", default="full,lighttransfer")
    ap.add_argument("--programs", default="prefill,generate_loop,decode_chunk")
    ap.add_argument("--out", default=str(REPO / "results" / "pods" / "compile-time-8b.json"))
    args = ap.parse_args()
    cfg = read_config(args.model, "bfloat16")
    tgt = aot.target(args.target, args.mesh)
    rows = []
    for spec in args.plans.split(","):
        plan = make_plan(spec, cfg, 0.5)
        kv = aot.kv_cache_bytes(cfg, plan, args.batch, args.context, tgt.mesh)
        for name in args.programs.split(","):
            for layers in ("split", "stacked"):
                if name == "prefill":  # the prefill a plan's generate runs: exact, or the selecting one
                    program = aot.prefill_program(plan, 1, args.context, spec,
                                                  None if plan.per_prompt else "exact", layers)
                else:
                    program = {p.name: p for p in aot.decode_programs(plan, args.batch, args.context, spec,
                                                                      layers=layers)}[name]
                jax.clear_caches()
                row = aot.compile_row(program, cfg, tgt, cost=False)
                row["kv_cache"] = kv if name != "prefill" else None
                rows.append(row)
                print(f"{row['program']:14} {spec:14} {layers:8} compile {row['compile_s']:7.1f} s  temporaries "
                      f"{row['temporaries'] / 2 ** 30:.3f} GiB", flush=True)
    write(args, rows)


def ratios(rows) -> list[dict]:
    pairs = {}
    for r in rows:
        pairs.setdefault((r["program"], r["plan"]), {})[r["layers"]] = r
    return [{"program": p, "plan": s, "compile_s_split": v["split"]["compile_s"],
             "compile_s_stacked": v["stacked"]["compile_s"],
             "compile_stacked_over_split": round(v["stacked"]["compile_s"] / v["split"]["compile_s"], 3),
             "temporaries_split": v["split"]["temporaries"], "temporaries_stacked": v["stacked"]["temporaries"]}
            for (p, s), v in pairs.items() if {"split", "stacked"} <= set(v)]


def write(args, rows) -> None:
    out = {"what": "compile seconds and per-chip memory (memory_analysis) of each program with the weights split "
                   "(decode unrolled) and stacked (decode scanned), compiled back to back; compiled, not run",
           "model": Path(args.model).name, "target": args.target, "mesh": args.mesh, "context": args.context,
           "batch": args.batch, "rows": rows, "summary": ratios(rows)}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
