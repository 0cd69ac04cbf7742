"""`lt-jax calibrate MODEL`: a probe's per-head scores, saved (next to the checkpoint by default) for the
retrieval-aware plan."""
from __future__ import annotations

import datetime
from pathlib import Path

from lt_jax.cli.flags import (NON_NEGATIVE, POSITIVE, load_model, model_argument, model_config, output, parse_list,
                              run_flags)
from lt_jax.errors import LtJaxError
from lt_jax.files import output_file, output_image, read_text

NAME = "calibrate"
HELP = ("measure how much each layer's heads copy from far back (a once-per-model probe) and save it next to the "
        "checkpoint for the retrieval-aware plan")
INTERRUPTED = "nothing was written; rerun the same command to measure again"


def add_arguments(s):
    from lt_jax.calibration import PROBES
    run_flags(s)
    model_argument(s)
    s.add_argument("--probe", choices=PROBES, default="retrieval",
                   help="retrieval: top-1 copy score while the model answers needles in essays (Wu et al.); "
                        "induction: attention on the successor of a repeated random token (data-free) "
                        "(default retrieval)")
    s.add_argument("--samples", type=POSITIVE, default=8,
                   help="prompts per length (retrieval) or rows (induction) (default 8)")
    s.add_argument("--lengths", default="2048,4096", help="retrieval: prompt lengths in tokens (default 2048,4096)")
    s.add_argument("--span", type=POSITIVE, default=1024, help="induction: tokens of the repeated block (default 1024)")
    s.add_argument("--queries", type=POSITIVE, default=64, help="induction: scored queries per row (default 64)")
    s.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the prompts (default 0)")
    s.add_argument("--haystack", nargs="+", default=None, help="retrieval: text files (default: the essays)")
    output(s, "--out", kind="file", default=None,
           help="calibration JSON (default: calibration-PROBE.json in the checkpoint; an existing calibration is "
                "replaced)")
    output(s, "--plot", kind="image", default=None, help="also draw the heads x layers scores (PNG or SVG)")


def _calibration_out(path, flag="--out"):
    from lt_jax.calibration import Calibration
    return output_file(path, flag, "a calibration file", Calibration.load)


def run(args) -> dict:
    """A probe's per-head scores for the model -> a calibration file that `retrieval-aware` plans read."""
    import jax
    from lt_jax import assets, probes
    from lt_jax.calibration import Calibration, default_path
    from lt_jax.plan import default_protect, num_lazy
    out = _calibration_out(args.out)
    plot = output_image(args.plot, "--plot")
    lengths = parse_list(args.lengths, int, "--lengths")
    if min(lengths) < 1:
        raise LtJaxError(f"--lengths must list prompt lengths of at least 1 token; got {args.lengths!r}.")
    files = args.haystack or sorted(Path(assets.essays()).glob("*.txt"))
    texts = [read_text(f) for f in files] if args.probe == "retrieval" else []  # a missing file: before the load
    cfg = model_config(args)  # the lengths against the context, before the weights load
    context = None if cfg is None else cfg.max_position_embeddings
    if context and args.probe == "retrieval" and max(lengths) > context:
        raise LtJaxError(f"--lengths {max(lengths)} exceeds the model's context of {context} tokens.")
    if context and args.probe == "induction":
        from lt_jax.probes import check_induction
        check_induction(args.span, args.queries, context)
    model = load_model(args)
    if out is None:
        if model.path is None or not Path(model.path).is_dir():
            raise LtJaxError(f"{args.model} has no checkpoint folder to save the calibration next to; give --out.")
        out = _calibration_out(default_path(model.path, args.probe), "the calibration file")
    settings = {"samples": args.samples, "seed": args.seed}
    if args.probe == "retrieval":
        haystack = model.encode("\n\n".join(texts))
        found = probes.retrieval_scores(model, haystack, lengths, args.samples, args.seed, progress=not args.json)
        settings |= {"lengths": lengths, "format": "unkeyed needle in essays (needles.needle_prompt)",
                     "haystack": [str(f) for f in args.haystack or []]}
    else:
        found = probes.induction_scores(model, args.span, args.samples, args.queries, args.seed,
                                        progress=not args.json)
        settings |= {"span": args.span, "queries": args.queries}
    provenance = {"model": model.label, "checkpoint": str(model.path), "probe": args.probe, "settings": settings,
                  **{k: v for k, v in found.items() if k != "head_scores"},
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "jax": jax.__version__}
    cal = Calibration(args.probe, tuple(tuple(float(x) for x in row) for row in found["head_scores"]), provenance)
    cal.save(out)
    L = model.config.num_layers
    protect = cal.protected(default_protect(L, num_lazy(L, 0.5)))
    if plot:
        from lt_jax.eval.plots import plot_calibration
        plot_calibration(found["head_scores"], plot, f"{model.label}: {args.probe} probe; layers protected at 50 % "
                         f"lazy: {list(protect)}", protect)
    scores = [round(float(x), 4) for x in cal.layer_scores]
    if not args.json:
        print(f"{args.probe} layer scores (max over heads): {scores}")
        print(f"protected at 50 % lazy: {list(protect)} -> {out}" + (f" (plot: {plot})" if plot else ""))
    return {"out": str(out), "probe": args.probe, "layer_scores": scores, "protected_at_half": list(protect),
            "provenance": provenance}
