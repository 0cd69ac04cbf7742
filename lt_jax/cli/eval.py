"""`lt-jax eval MODEL --task TASK`: evaluation methods side by side on one task; rows to a resumable JSONL, then a
summary table and plots."""
from __future__ import annotations

import sys
from pathlib import Path

from lt_jax.cli.flags import (POSITIVE, check_plans, load_model, model_argument, output, parse_list,
                              plan_flag_values, plan_flags,
                              run_flags)
from lt_jax.errors import LtJaxError
from lt_jax.files import output_image, read_text

NAME = "eval"
HELP = ("run evaluation methods side by side on one task (niah, passkey, ppl, longbench, ruler); per-example rows go "
        "to a resumable JSONL, then a summary table and plots")
INTERRUPTED = "the rows written are kept; rerun the same command to continue"
WHAT = "lt-jax eval"

TASKS = ("niah", "passkey", "ppl", "longbench", "ruler")


class _Tasks(tuple):
    """--task's choices: TASKS, or `ruler:TASK,...` (its names are checked by `evaluate.Ruler`)."""
    def __contains__(self, value):
        return tuple.__contains__(self, value) or str(value).startswith("ruler:")


# per-method options (`METHOD@OPTION=VALUE`) and the plan kinds that use each
METHOD_OPTIONS = {"lazy_fraction": float, "w_last": int, "protect": int, "sink": int, "window": int}
_LAZY_KINDS = ("lighttransfer", "retrieval-aware", "first", "last", "random", "periodic", "loss-guided")
OPTION_USERS = {"lazy_fraction": _LAZY_KINDS, "w_last": ("lighttransfer", "retrieval-aware"),
                "protect": ("retrieval-aware",), "sink": _LAZY_KINDS + ("streaming",),
                "window": _LAZY_KINDS + ("streaming",)}


def add_arguments(s):
    run_flags(s, processes=True)
    model_argument(s)
    s.add_argument("--task", required=True, choices=_Tasks(TASKS), metavar="TASK",
                   help="niah: needles in the essays (RULER's format); passkey; ppl: decode-mode perplexity; "
                        "longbench; ruler: RULER's 11 synthetic tasks, or ruler:TASK,... a subset (e.g. "
                        "ruler:niah_single_1,vt)")
    s.add_argument("--methods", default="full,lighttransfer,streaming",
                   help="comma-separated plans: full, lighttransfer, retrieval-aware[:PROBE], "
                        "loss-guided[:PROBE], periodic[:OFFSET], streaming, random[:SEED], first, last, PLAN.json, "
                        "each with optional @OPTION=VALUE overrides (lazy_fraction, w_last, protect, sink, window), "
                        "e.g. lighttransfer@w_last=1 or lighttransfer@sink=64@window=960 (default: "
                        "full,lighttransfer,streaming)")
    output(s, "--out", kind="file", default=None, help="results JSONL; a rerun resumes it (default: eval-TASK.jsonl)")
    output(s, "--plot", kind="image", default=None, help="PNG: depth x length heat maps (niah, passkey) or bars")
    output(s, "--ratio-plot", kind="image", default=None,
           help="PNG: per-layer lazy ratios over the prompts (lighttransfer)")
    s.add_argument("--lengths", default="2048,4096",
                   help="niah/passkey/ruler prompt lengths in tokens (default 2048,4096)")
    s.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                   help="niah/passkey needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    s.add_argument("--samples", type=POSITIVE, default=None,
                   help="niah/passkey: prompts per (length, depth) (default 2); ppl: windows (default 3); ruler: "
                        "prompts per (task, length) (default 5)")
    s.add_argument("--seed", type=int, default=0, help="niah/passkey/ruler: seed of the prompts drawn (default 0)")
    s.add_argument("--keys", type=POSITIVE, default=1,
                   help="niah: needles per prompt (1 = single-key; >1 = multi-key) (default 1)")
    s.add_argument("--max-new-tokens", type=POSITIVE, default=None,
                   help="niah/passkey answer tokens (default 16); ruler: every task's (default: RULER's per task)")
    s.add_argument("--haystack", nargs="+", default=None, help="niah/ppl/ruler text files (default: the essays)")
    s.add_argument("--prefix", type=POSITIVE, default=2048, help="ppl: tokens of exact prefill (default 2048)")
    s.add_argument("--score-tokens", type=POSITIVE, default=512, help="ppl: tokens scored after it (default 512)")
    s.add_argument("--data", nargs="+", default=None, help="longbench: LongBench JSONL files or folders of them")
    s.add_argument("--max-length", type=POSITIVE, default=None,
                   help="longbench: prompt tokens before middle truncation (default: the model's context)")
    s.add_argument("--limit", type=POSITIVE, default=None, help="longbench: at most this many records per dataset")
    plan_flags(s, with_plan=False)


def method_options(method: str) -> tuple[str, dict]:
    """(plan spec, per-method flags) of an eval method, e.g. `lighttransfer@w_last=1@lazy_fraction=0.25`; an
    option the method's plan does not use is refused (it would silently change nothing)."""
    spec, *options = method.split("@")
    kind = spec.split(":")[0]
    flags = {}
    for option in options:
        key, _, value = option.partition("=")
        try:
            flags[key] = METHOD_OPTIONS[key](value)
        except (KeyError, ValueError):
            raise LtJaxError(f"method {method!r}: {option!r} is not OPTION=VALUE with OPTION one of "
                             f"{', '.join(METHOD_OPTIONS)}.") from None
        if kind not in OPTION_USERS[key]:
            raise LtJaxError(f"method {method!r}: {spec} does not use {key} (only "
                             f"{', '.join(OPTION_USERS[key])} do).")
    return spec, flags


def _task(args, model):
    from lt_jax import assets
    from lt_jax.eval import evaluate
    text = lambda: [read_text(f) for f in (args.haystack or sorted(Path(assets.essays()).glob("*.txt")))]  # noqa: E731
    if args.task in ("niah", "passkey"):
        lengths = parse_list(args.lengths, int, "--lengths")
        return evaluate.Retrieval(args.task, lengths, parse_list(args.depths, float, "--depths"),
                                  2 if args.samples is None else args.samples, keys=args.keys,
                                  max_new_tokens=16 if args.max_new_tokens is None else args.max_new_tokens,
                                  seed=args.seed, haystack=None if args.task == "passkey" else text())
    if args.task.split(":")[0] == "ruler":
        from lt_jax.eval import ruler
        names = list(ruler.TASKS) if args.task == "ruler" else parse_list(args.task[6:], str, "--task ruler:")
        return evaluate.Ruler(names, parse_list(args.lengths, int, "--lengths"),
                              5 if args.samples is None else args.samples, args.seed, args.max_new_tokens, text())
    if args.task == "ppl":
        return evaluate.Perplexity(args.prefix, args.score_tokens, 3 if args.samples is None else args.samples,
                                   text())
    if not args.data:
        raise LtJaxError("--task longbench needs --data: LongBench's JSONL files, or folders holding them.")
    files = [f for d in map(Path, args.data) for f in (sorted(d.glob("*.jsonl")) if d.is_dir() else [d])]
    if not files:
        raise LtJaxError(f"no .jsonl file in {', '.join(args.data)}.")
    return evaluate.LongBench(files, args.max_length, args.limit)


def run(args) -> dict:
    """Every method on the same examples; rows to a resumable JSONL, then the summary (table, JSON, plots)."""
    import numpy as np
    from lt_jax import distributed, records
    from lt_jax.eval import evaluate, plots
    from lt_jax.lazy import calibrate
    methods = parse_list(args.methods, str, "--methods")
    if len(set(methods)) != len(methods):
        raise LtJaxError(f"--methods names a method twice: {args.methods}.")
    options = {m: method_options(m) for m in methods}  # before the load
    out = records.output(args.out or f"eval-{args.task.split(':')[0]}.jsonl", "--out", WHAT, evaluate.row_key)
    plot = output_image(args.plot, "--plot")
    ratio_plot = output_image(args.ratio_plot, "--ratio-plot")
    flags = plan_flag_values(args)
    check_plans(args, {spec: {**flags, **own} for spec, own in options.values()})
    model = load_model(args)
    plans = {m: model.plan(spec, **{**flags, **own}) for m, (spec, own) in options.items()}
    task = _task(args, model)
    meta = {"task": task.name, "model": model.label, "settings": task.settings,
            "plan_flags": {k: v for k, v in flags.items() if v is not None},
            "haystack": [str(f) for f in args.haystack or []]}
    rows = evaluate.run(model, task, plans, out, meta)  # every process's rows, once all are done
    if distributed.share()[0] != 0:  # process 0 draws the plots
        plot = ratio_plot = None
    summary = evaluate.summarize(task, rows, methods)
    table = evaluate.markdown(task, summary)
    title = f"{model.label}: {task.name}"
    if plot and task.name in ("niah", "passkey"):
        plots.plot_heat_maps(evaluate.heat_maps(rows, methods), plot, f"{title} (exact match)")
    elif plot:
        plots.plot_bars({m: c["average"] for m, c in summary["methods"].items()}, plot, title,
                        {"ppl": "perplexity", "ruler": "score (RULER average)"}.get(task.name,
                                                                                      "score (LongBench average)"))
    per_prompt = {}  # a prompt's ratios are the same whichever selecting method measured them: one per prompt
    for r in rows:
        if r.get("ratios"):
            per_prompt.setdefault(r["example"], r)
    if ratio_plot and per_prompt:
        first = next(iter(per_prompt.values()))
        stats = calibrate(np.asarray([r["ratios"] for r in per_prompt.values()]), len(first["lazy_layers"]))
        plots.plot_lazy_ratios(stats, ratio_plot, f"{title}: lazy ratios of {len(per_prompt)} prompts")
    if not args.json:
        print(table)
        in_file = len(records.read_rows(out, meta, evaluate.row_key, WHAT)) if distributed.share()[0] == 0 else None
        rows_text = f"{len(rows)} rows" if in_file in (None, len(rows)) else \
            f"{len(rows)} rows of these methods ({in_file} in the file)"
        print(f"[{rows_text} in {out}" + (f"; plot: {plot}" if plot else "") + "]", file=sys.stderr)
    return {"task": task.name, "model": model.label, "out": str(out), "summary": summary, "table": table,
            "plan_flags": meta["plan_flags"], "settings": task.settings}
