"""`lt-jax compile`: compile every program for a TPU slice ahead of time on this host (lt_jax.aot) and print each
one's per-chip plan. Needs libtpu (jax's `tpu` extra), not a TPU; every number is compiled-not-run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

NAME = "compile"
PROGRAMS = ("prefill", "generate_loop", "decode_chunk", "insert_rows", "token_nll", "train_step")
HELP = "compile every program for a TPU slice ahead of time (no TPU needed) and report its per-chip memory and cost"


def add_arguments(parser) -> None:
    parser.add_argument("model",
                        help="an HF config.json, or a directory holding one (e.g. configs/Llama-3.1-8B-Instruct)")
    parser.add_argument("--target", default="v5e:2x4", help="TPU topology, e.g. v5e:2x4, v6e:2x2, v5p:2x2x4 "
                        "(chips: v4, v5e, v5p, v6e; default v5e:2x4)")
    parser.add_argument("--mesh", default=None, help="mesh over the slice's chips, e.g. data=1,model=8 "
                        "(default: every chip on model)")
    parser.add_argument("--context", type=int, default=8192,
                        help="tokens of context (prompt + generation; default 8192)")
    parser.add_argument("--batch", type=int, default=8, help="decode batch (rows; default 8)")
    parser.add_argument("--plans", default="full,lighttransfer", help="comma list of plans (full, streaming, first, "
                        "last, lighttransfer, retrieval-aware[:FILE], loss-guided[:FILE], ...; without a calibration "
                        "FILE a stand-in compiles the same programs; default full,lighttransfer)")
    parser.add_argument("--lazy-fraction", type=float, default=0.5, help="fraction of lazy layers (default 0.5)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="weights and KV cache (default bfloat16)")
    parser.add_argument("--layers", default="stacked", choices=("stacked", "split"),
                        help="the weights' storage: stacked, as a TPU load keeps them (decode scans one layer body; "
                        "default), or split, as on CPU (decode unrolls the layers), for comparison")
    parser.add_argument("--no-train", action="store_true", help="skip the training step")
    parser.add_argument("--max-batch", action="store_true", help="also the largest decode batch per plan that fits "
                        "HBM and its roofline tokens/s (and the ratio to full when full is the first plan)")
    parser.add_argument("--programs", default=None, help="comma list of the programs to compile (prefill, "
                        "generate_loop, decode_chunk, insert_rows, token_nll, train_step; default every one)")


def read_config(path: str, dtype: str):
    from lt_jax.config import Config
    from lt_jax.errors import LtJaxError
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise LtJaxError(f"{path}: no config.json there (give an HF config.json or a directory holding one).")
    try:
        hf = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise LtJaxError(f"{p}: not a readable JSON file ({e}).") from None
    try:
        return Config.from_hf(hf, source=str(p), dtype=dtype)
    except KeyError as e:
        raise LtJaxError(f"{p}: an HF config.json needs the field {e}.") from None


def _plan(spec: str, cfg, lazy_fraction: float):
    """The plan a spec names. A calibrated plan (`retrieval-aware`, `loss-guided`) reads its calibration file when
    the spec names one (`:FILE.json`); without one (a config has no weights to calibrate) it compiles with a
    stand-in whose scores are all equal: which layers it protects or streams is data to every program, so the
    programs are those of any calibration at the same lazy fraction."""
    from lt_jax import calibration
    from lt_jax.plan import make_plan
    name, _, source = spec.partition(":")
    if name not in calibration.PLAN_PROBES:
        return make_plan(spec, cfg, lazy_fraction)
    if source.endswith(".json"):
        found = calibration.find(None, source, cfg, name)[0]
    else:
        probe = source or calibration.PLAN_PROBES[name]
        heads = 1 if probe in calibration.LAYER_PROBES else cfg.num_heads
        found = calibration.Calibration(probe, ((0.0,) * heads,) * cfg.num_layers, {"stand-in": "lt-jax compile"})
    return make_plan(spec, cfg, lazy_fraction, calibration=found)


def _gib(b) -> str:
    return f"{b / 2 ** 30:.2f}"


def run(args) -> dict:
    """Prints the table as programs compile (unless --json); returns every row (and the max batches)."""
    from lt_jax import aot, sharding
    from lt_jax.errors import LtJaxError
    cfg = read_config(args.model, args.dtype)
    if args.context < 2 or args.batch < 1:
        raise LtJaxError(f"--context {args.context} must be >= 2 and --batch {args.batch} >= 1.")
    plans = [(spec, _plan(spec, cfg, args.lazy_fraction)) for spec in args.plans.split(",")]
    wanted = set(args.programs.split(",")) if args.programs else None
    unknown = (wanted or set()) - set(PROGRAMS)
    if unknown:
        raise LtJaxError(f"--programs {args.programs}: unknown {', '.join(sorted(unknown))} "
                         f"(programs: {', '.join(PROGRAMS)}).")
    tgt = aot.target(args.target, args.mesh)
    rows, throughput = [], []
    unsplit = sharding.unsplit(cfg, tgt.mesh)  # what every chip of an axis would hold whole: a mesh to reconsider
    if not args.json:
        print(f"{args.model} on {tgt.topology} (mesh {dict(tgt.mesh.shape)}, {tgt.chip.name}: "
              f"{_gib(tgt.chip.hbm_bytes)} GiB HBM per chip); per chip, GiB; compiled, not run")
        if unsplit:
            print(f"not split on this mesh, held whole by every chip of the axis: {'; '.join(unsplit)}")
        print(f"{'program':24} {'plan':14} {'layers':7} {'B':>4} {'T':>7} {'weights':>8} {'kv':>7} {'temp':>7} "
              f"{'out':>7} {'total':>7} fits {'compile s':>9} {'GFLOP':>10} {'GB xla':>8} {'GB floor':>8} "
              f"{'roofline ms':>11}")
    for spec, plan in plans:
        kv = aot.kv_cache_bytes(cfg, plan, args.batch, args.context, tgt.mesh)
        for program in aot.programs(plan, spec, args.batch, args.context, train=not args.no_train,
                                    layers=args.layers):
            if wanted and program.name.split()[0] not in wanted:
                continue
            row = aot.compile_row(program, cfg, tgt, failure_as_row=True)
            row["kv_cache"] = kv if program.name in ("generate_loop", "decode_chunk", "insert_rows") else None
            rows.append(row)
            if args.json:
                continue
            head = (f"{row['program']:24} {spec:14} {row['layers']:7} {row['batch']:>4} {row['context']:>7} "
                    f"{_gib(row['weights']):>8} {_gib(row['kv_cache']) if row['kv_cache'] is not None else '-':>7} "
                    f"{_gib(row['temporaries']) if row['temporaries'] is not None else '-':>7} ")
            if row["total"] is None:  # refused (its temporaries alone exceed HBM), or the compiler failed
                why = f"failed: {row['failed']}" if "failed" in row else f"refused: {row['refused']}"
                fits = "?   " if "failed" in row else "NO  "  # a failed compile says nothing of the size
                print(head + f"{'-':>7} {'-':>7} {fits} {row['compile_s']:>9.1f}  {why}", flush=True)
                continue
            print(head + f"{_gib(row['outputs']):>7} {_gib(row['total']):>7} "
                  f"{'yes ' if row['fits'] else 'NO  '} {row['compile_s']:>9.1f} {row['flops'] / 1e9:>10.1f} "
                  f"{row['bytes_accessed'] / 1e9:>8.2f} {row['floor_bytes'] / 1e9:>8.2f} "
                  f"{row['roofline_s'] * 1e3:>11.3f}", flush=True)
        if args.max_batch:
            def probed(b, row, spec=spec):  # each probe compiles for minutes at 8B: say how the search goes
                fit = "fits" if row["fits"] else "does not fit"
                print(f"{spec}: batch {b} {fit} ({row['compile_s']:.0f} s)", file=sys.stderr, flush=True)
            best = aot.max_batch(plan, spec, cfg, tgt, args.context, layers=args.layers, report=probed)
            if throughput and throughput[0]["plan"] == "full" and best["tokens_per_s"]:
                best["relative_to_full"] = (best["tokens_per_s"] / throughput[0]["tokens_per_s"]
                                            if throughput[0]["tokens_per_s"] else None)
            throughput.append(best)
            if not args.json:
                line = f"{spec}: largest decode batch that fits at context {args.context}: {best['max_batch']}"
                if best["tokens_per_s"]:
                    line += f", roofline {best['tokens_per_s']:,.0f} tokens/s"
                if best.get("relative_to_full"):
                    line += f" ({best['relative_to_full']:.2f}x full)"
                print(line, flush=True)
    if not args.max_batch:
        return {"rows": rows, "unsplit": unsplit}
    return {"rows": rows, "unsplit": unsplit, "max_batch": {t["plan"]: t["max_batch"] for t in throughput},
            "throughput": throughput}
