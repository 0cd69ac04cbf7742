"""`lt-jax calibrate MODEL`: a probe's per-head (or, `nll`, per-layer) scores, saved (next to the checkpoint by
default) for the retrieval-aware and loss-guided plans."""
from __future__ import annotations

import datetime
import time
from pathlib import Path

from lt_jax.cli.flags import (NON_NEGATIVE, POSITIVE, load_model, model_argument, model_config, output, parse_list,
                              run_flags, stream_flags)
from lt_jax.errors import LtJaxError
from lt_jax.files import output_file, output_image, read_text

NAME = "calibrate"
HELP = ("measure how much each layer's heads copy from far back, or what streaming each layer costs the answer (a "
        "once-per-model probe), and save it next to the checkpoint for the retrieval-aware and loss-guided plans")
INTERRUPTED = "nothing was written; rerun the same command to measure again"


def add_arguments(s):
    from lt_jax.calibration import PROBES
    run_flags(s)
    model_argument(s)
    s.add_argument("--probe", choices=PROBES, default="retrieval",
                   help="retrieval: top-1 copy score while the model answers needles in essays (Wu et al.); "
                        "induction: attention on the successor of a repeated random token (data-free); "
                        "nll: each layer's increase of the answer's NLL on keyed needles when it alone streams "
                        "with --sink/--window, L+1 forwards per prompt; nll-greedy: lazy layers added one at a time, "
                        "each the one whose streaming with those chosen costs the answer least (default retrieval)")
    s.add_argument("--samples", type=POSITIVE, default=8,
                   help="prompts per length (retrieval, nll) or rows (induction) (default 8)")
    s.add_argument("--lengths", default="2048,4096",
                   help="retrieval, nll: prompt lengths in tokens (default 2048,4096)")
    s.add_argument("--keys", type=POSITIVE, default=4,
                   help="nll: needles per prompt, the asked one and distractors (default 4)")
    s.add_argument("--joint", default="0.5",
                   help="nll: lazy fractions whose loss-guided set is also measured streaming together, against "
                        "the sum of its layers' scores (one forward per prompt each; 'none': skip) (default 0.5)")
    s.add_argument("--up-to", type=float, default=0.5,
                   help="nll-greedy: the lazy fraction the greedy set is built up to (default 0.5)")
    s.add_argument("--singles", default=None,
                   help="nll-greedy: an nll calibration of the same prompts and S/W whose single-layer scores start "
                        "the search (default: measured, L+1 forwards per prompt)")
    stream_flags(s)
    s.add_argument("--span", type=POSITIVE, default=1024, help="induction: tokens of the repeated block (default 1024)")
    s.add_argument("--queries", type=POSITIVE, default=64, help="induction: scored queries per row (default 64)")
    s.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the prompts (default 0)")
    s.add_argument("--haystack", nargs="+", default=None, help="retrieval, nll: text files (default: the essays)")
    output(s, "--out", kind="file", default=None,
           help="calibration JSON (default: calibration-PROBE.json in the checkpoint; an existing calibration is "
                "replaced)")
    output(s, "--plot", kind="image", default=None, help="also draw the heads x layers scores (PNG or SVG)")


def _calibration_out(path, flag="--out"):
    from lt_jax.calibration import Calibration
    return output_file(path, flag, "a calibration file", Calibration.load)


def _greedy_count(up_to: float, num_layers: int) -> int:
    from lt_jax.plan import num_lazy
    count = num_lazy(num_layers, up_to) if 0 < up_to < 1 else 0
    if not 1 <= count < num_layers:
        raise LtJaxError(f"--up-to {up_to} must be a lazy fraction that makes 1..{num_layers - 1} of the "
                         f"{num_layers} layers lazy.")
    return count


def _singles(args, lengths, sink, window):
    """The single-layer scores of an nll calibration made on the same prompts and S/W, or one sentence why not."""
    import numpy as np
    from lt_jax.calibration import Calibration
    cal = Calibration.load(args.singles)
    got = cal.provenance.get("settings", {})
    want = {"samples": args.samples, "seed": args.seed, "lengths": lengths, "keys": args.keys, "sink": sink,
            "window": window, "haystack": [str(f) for f in args.haystack or []]}
    differ = [f"{k} {got.get(k)!r} (here {v!r})" for k, v in want.items() if got.get(k) != v]
    if cal.probe != "nll" or differ:
        raise LtJaxError(f"--singles {args.singles}: not an nll calibration of these prompts and S/W "
                         f"({'probe ' + repr(cal.probe) if cal.probe != 'nll' else ', '.join(differ)}).")
    return np.asarray(cal.layer_scores)


def run(args) -> dict:
    """A probe's scores for the model -> a calibration file that `retrieval-aware` and `loss-guided` plans
    read."""
    import jax
    from lt_jax import assets, probes
    from lt_jax.calibration import LAYER_PROBES, Calibration, default_path
    from lt_jax.plan import DEFAULT_SINK, DEFAULT_WINDOW, PRESETS, default_protect, num_lazy
    out = _calibration_out(args.out)
    plot = output_image(args.plot, "--plot")
    lengths = parse_list(args.lengths, int, "--lengths")
    joint = () if args.joint.strip().lower() == "none" else tuple(parse_list(args.joint, float, "--joint"))
    if not all(0 < f < 1 for f in joint):
        raise LtJaxError(f"--joint must list lazy fractions between 0 and 1 (or 'none'); got {args.joint!r}.")
    if min(lengths) < 1:
        raise LtJaxError(f"--lengths must list prompt lengths of at least 1 token; got {args.lengths!r}.")
    files = args.haystack or sorted(Path(assets.essays()).glob("*.txt"))
    reads_text = args.probe in ("retrieval", "nll", "nll-greedy")
    texts = [read_text(f) for f in files] if reads_text else []  # a missing file: before the load
    sink, window = PRESETS[args.stream_preset] if args.stream_preset else (DEFAULT_SINK, DEFAULT_WINDOW)
    sink, window = sink if args.sink is None else args.sink, window if args.window is None else args.window
    cfg = model_config(args)  # the lengths against the context, before the weights load
    context = None if cfg is None else cfg.max_position_embeddings
    if context and reads_text and max(lengths) > context:
        raise LtJaxError(f"--lengths {max(lengths)} exceeds the model's context of {context} tokens.")
    if context and args.probe == "induction":
        from lt_jax.probes import check_induction
        check_induction(args.span, args.queries, context)
    greedy = args.probe == "nll-greedy"
    if greedy and cfg is not None:
        _greedy_count(args.up_to, cfg.num_layers)  # before the weights load
    singles = _singles(args, lengths, sink, window) if greedy and args.singles else None
    model = load_model(args)
    greedy_count = _greedy_count(args.up_to, model.config.num_layers) if greedy else None
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
    elif args.probe in ("nll", "nll-greedy"):
        rows = probes.calibration_rows(model, model.encode("\n\n".join(texts)), lengths, args.samples, args.seed,
                                       args.keys)
        settings |= {"lengths": lengths, "keys": args.keys, "sink": sink, "window": window,
                     "format": f"keyed needles with {probes.CALIBRATION_DIGITS}-digit values in essays "
                               f"(probes.calibration_prompt; eval's have 7 digits)",
                     "haystack": [str(f) for f in args.haystack or []]}
        started = time.perf_counter()
        if args.probe == "nll":
            found = probes.nll_scores(model, rows, sink, window, progress=not args.json, joint=joint)
        else:
            found = probes.nll_greedy(model, rows, sink, window, greedy_count, singles, progress=not args.json)
            settings |= {"up_to": args.up_to, "singles": args.singles}
        found["minutes"] = round((time.perf_counter() - started) / 60, 2)
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
    streamed = cal.lowest(num_lazy(L, 0.5))
    if not args.json:
        if args.probe == "nll-greedy":  # its scores are ranks: say the order and what each step cost
            print(f"nll-greedy lazy layers in the order chosen: {found['order']}; the set's answer-NLL increase "
                  f"after each: {[step['set_increase'] for step in found['steps']]}")
        else:
            what = "answer-NLL increase when streaming alone" if args.probe in LAYER_PROBES else "max over heads"
            print(f"{args.probe} layer scores ({what}): {scores}")
        for j in found.get("joint", []):
            print(f"loss-guided at {j['lazy_fraction']:.0%} lazy, its {len(j['layers'])} layers streaming together: "
                  f"{j['joint']:+.4f} nats on the answer; the sum of their scores: {j['additive']:+.4f}")
        print(f"protected at 50 % lazy: {list(protect)}; loss-guided lazy layers at 50 %: {list(streamed)} -> {out}"
              + (f" (plot: {plot})" if plot else ""))
    return {"out": str(out), "probe": args.probe, "layer_scores": scores, "protected_at_half": list(protect),
            "lowest_at_half": list(streamed), "provenance": provenance}
