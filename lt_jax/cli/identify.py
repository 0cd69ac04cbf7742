"""`lt-jax identify MODEL FILES --out PLAN.json`: lazy layers chosen offline over many samples (LightTransfer-Train's
selection), written as a plan file."""
from __future__ import annotations

import json

from lt_jax.cli.flags import FRACTION, POSITIVE, load_model, model_argument, output, run_flags, stream_flags
from lt_jax.errors import LtJaxError
from lt_jax.files import output_file, output_image, read_samples, write_atomic

NAME = "identify"
HELP = ("choose lazy layers offline from the lazy ratios over many samples (LightTransfer-Train's selection) and "
        "write a plan file")
INTERRUPTED = "nothing was written; rerun the same command to measure again"


def add_arguments(s):
    run_flags(s)
    model_argument(s)
    s.add_argument("files", nargs="+", help="text files, or .jsonl files with a text field per line")
    output(s, "--out", kind="file", required=True, help="plan JSON to write (an existing plan file is replaced)")
    output(s, "--plot", kind="image", default=None, help="also draw the per-layer ratios (PNG or SVG)")
    s.add_argument("--lazy-fraction", type=FRACTION, default=0.5, help="fraction of lazy layers (default 0.5)")
    s.add_argument("--context", type=POSITIVE, default=4096,
                   help="tokens per sample; longer texts are split (default 4096)")
    s.add_argument("--max-samples", type=POSITIVE, default=64, help="at most this many samples (default 64)")
    s.add_argument("--field", default="text",
                   help="JSONL field holding the text, or a list of token ids (default: text)")
    stream_flags(s, preset=False)
    s.add_argument("--w-last", type=POSITIVE, default=32, help="last queries that measure the ratios (default 32)")
    s.add_argument("--prefill", choices=["exact", "hybrid"], default=None,
                   help="prefill mode stored in the plan (default exact)")


def is_plan_file(path) -> bool:
    """A plan JSON (`Plan.to_json`, what identify and train write)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"num_layers", "lazy_layers"} <= set(record)


def run(args) -> dict:
    """Offline lazy-layer identification over many samples -> a plan file (and a plot)."""
    import numpy as np
    from lt_jax.lazy import calibrate
    from lt_jax.plan import DEFAULT_SINK, DEFAULT_WINDOW, Plan, num_lazy
    from lt_jax.progress import progress_bar
    out = output_file(args.out, "--out", "a plan file", is_plan_file)
    plot = output_image(args.plot, "--plot")
    texts = read_samples(args.files, args.field)
    model = load_model(args)
    sink = DEFAULT_SINK if args.sink is None else args.sink
    window = DEFAULT_WINDOW if args.window is None else args.window
    context = min(args.context, model.config.max_position_embeddings)
    if context <= sink + window:
        raise LtJaxError(f"samples of --context {context} tokens are no longer than S + W = {sink + window}, so every "
                         f"lazy ratio would be 1; give a larger --context or a smaller --window.")
    samples = []  # consecutive chunks of `context` tokens; a chunk no longer than S + W has every ratio 1
    for text in texts:
        ids = model.encode(text) if isinstance(text, str) else text
        samples += [ids[i:i + context] for i in range(0, len(ids), context) if len(ids) - i > sink + window]
    samples = samples[:args.max_samples]
    if not samples:
        raise LtJaxError(f"no sample is longer than S + W = {sink + window} tokens; give longer texts or a "
                         f"smaller --window.")
    ratios = [model.lazy_ratios(ids, sink=sink, window=window, w_last=args.w_last)
              for ids in progress_bar(len(samples), "lazy ratios", "sample").wrap(samples)]
    stats = calibrate(np.stack(ratios), num_lazy(model.config.num_layers, args.lazy_fraction))
    plan = Plan(model.config.num_layers, tuple(stats["lazy_layers"]), sink=sink, window=window, source="identify",
                prefill=args.prefill or "exact", w_last=args.w_last)
    record = {**json.loads(plan.to_json()),
              "identify": {"model": model.label, "files": [str(f) for f in args.files], "context": context,
                           "lazy_fraction": args.lazy_fraction, "tokens": int(sum(map(len, samples))), **stats}}
    write_atomic(out, json.dumps(record, indent=1) + "\n")  # the plan first: a failing figure loses nothing computed
    if plot:
        from lt_jax.eval.plots import plot_lazy_ratios
        plot_lazy_ratios(stats, plot, f"{model.label}: lazy ratio over {len(samples)} samples of "
                         f"<= {context} tokens (S={sink}, W={window}); lazy: {stats['lazy_layers']}")
    if not args.json:
        print(f"lazy layers {stats['lazy_layers']} from {len(samples)} samples -> {out}"
              + (f" (plot: {plot})" if plot else ""))
    return record
