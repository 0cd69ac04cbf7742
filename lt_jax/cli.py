"""`lt-jax`: a thin command layer over the library. Every subcommand takes --json (the result on stdout, one
JSON object) and reports bad input as one sentence on stderr with exit status 2."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lt_jax.errors import LtJaxError
from lt_jax.eval.texts import parse_list, read_text

DEMO_ESSAY = "addiction.txt"
DEMO_TOKENS = 1024
DEMO_QUESTION = "In one sentence: what is this essay about?"


def _number(kind, low=None, high=None, low_open=False, what=""):
    """An argparse type: `kind` within [low, high] ((low, high] with low_open), checked while parsing, before any
    model loads (a bad value fails in the time it takes to parse)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}")
        if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


POSITIVE = _number(int, 1, what="at least 1")
NON_NEGATIVE = _number(int, 0, what=">= 0")
FRACTION = _number(float, 0.0, 1.0, what="in [0, 1]")


def _enable_compilation_cache():
    import jax
    from lt_jax.assets import cache_dir
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit="tensor")


def _read_ids(path: str) -> list[int]:
    return parse_ids(read_text(path), f"ids file {path}")


def cmd_convert(args) -> dict:
    from checkpoints_conv import convert, read_hf_config
    from checkpoints_conv.hf import entries
    from checkpoints_conv.store import check_output_dir
    cfg = read_hf_config(Path(args.hf_dir), args.dtype)
    check_output_dir(Path(args.out_dir))
    t0 = time.perf_counter()
    with _progress_bar(len(entries(cfg)), "converting") as bar:
        convert(args.hf_dir, args.out_dir, args.dtype, progress=lambda _name: bar.update(1))
    return {"out": args.out_dir, "model_type": cfg.arch, "layers": cfg.num_layers, "dtype": cfg.dtype,
            "seconds": round(time.perf_counter() - t0, 2)}


def cmd_export(args) -> dict:
    from checkpoints_conv import export
    cfg = export(args.ckpt_dir, args.hf_out_dir)
    return {"out": args.hf_out_dir, "model_type": cfg.arch, "layers": cfg.num_layers}


def cmd_train(args) -> dict:
    """LightTransfer-Train: fine-tune a fixed hybrid plan; OUT becomes a checkpoint with that plan as default."""
    from lt_jax.train.run import RunOptions, check_out, train
    from lt_jax.train.step import TrainSettings
    check_out(Path(args.out), args.resume)  # before the model loads
    for path in [*args.data, *(args.eval_data or [])]:
        if not Path(path).is_file():
            raise LtJaxError(f"data file {path} does not exist (or is not a file).")
    model = load_model(args)
    plan = plan_from_args(model, args)
    settings = TrainSettings.for_plan(
        plan, steps=args.steps, lr=args.lr, warmup=args.warmup, schedule=args.schedule,
        weight_decay=args.weight_decay, clip=args.clip, trainable=args.trainable, compute_dtype=args.dtype,
        remat=args.remat, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
    options = RunOptions(seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         seed=args.seed, save_every=args.save_every, keep=args.keep, eval_every=args.eval_every)
    say = lambda msg: print(f"[lt-jax train] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    layers = f"layers {list(plan.lazy_layers)} streaming (S={plan.sink}, W={plan.window})" if plan.lazy_layers \
        else "every layer full"
    say(f"training {model.label} as {plan.source}: {layers}; {args.steps} steps of {args.batch_size} x "
        f"{args.grad_accum} sequences of <= {args.seq_len} tokens")
    result = train(model, plan, args.data, args.out, settings, options, args.eval_data, args.resume)
    if not args.json:
        if result["already_complete"]:
            print(f"{args.out}: already complete ({args.steps} steps); nothing to do.")
        else:
            print(f"trained {args.steps} steps: loss {result['first_loss']:.4f} -> {result['final_loss']:.4f}"
                  + (f", held-out {result['final_eval_loss']:.4f}" if result["final_eval_loss"] is not None else "")
                  + f"; {result['tokens_per_s']:.0f} tokens/s")
            print(f"checkpoint {args.out} (lt_jax.load opens it with this plan as its default; "
                  f"lt-jax export {args.out} HF_DIR for transformers)")
    return result


def cmd_ppl(args) -> dict:
    text = read_text(args.text_file) if args.text_file else None
    ids = None if text is not None else _read_ids(args.ids_file)
    model = load_model(args)
    if text is not None:
        ids = model.encode(text)
    if not ids:
        raise LtJaxError(f"{args.text_file or args.ids_file} holds no tokens.")
    context = model.config.max_position_embeddings
    if args.max_tokens is not None and args.max_tokens > context:
        raise LtJaxError(f"--max-tokens {args.max_tokens} exceeds the model's context of {context} tokens; it "
                         f"cannot score past it.")
    limit = args.max_tokens or context
    if args.prefix is not None and args.prefix >= min(len(ids), limit):
        raise LtJaxError(f"--prefix {args.prefix} leaves nothing to score: the text gives {min(len(ids), limit)} "
                         f"tokens; give a smaller --prefix.")
    if len(ids) > limit:
        print(f"[lt-jax ppl] the text holds {len(ids)} tokens; scoring its first {limit} "
              f"({'--max-tokens' if args.max_tokens else 'the model context'})", file=sys.stderr)
    print(f"[lt-jax ppl] scoring {min(len(ids), limit)} tokens ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    result = model.perplexity(ids, limit, plan=plan_from_args(model, args), prefix=args.prefix)
    out = {**result, "plan": plan_json(result["plan"]), "text_tokens": len(ids),
           "seconds": round(time.perf_counter() - t0, 2)}
    if not args.json:
        plan = result["plan"]
        print(f"ppl {result['ppl']:.4f} (nll {result['nll']:.4f} over {result['tokens']} tokens, "
              f"{out['seconds']} s)")
        layers = (f"layers {list(plan.lazy_layers)} streaming (S={plan.sink}, W={plan.window}), the rest full"
                  if plan.lazy_layers else "every layer full")
        print(f"plan {plan.source}: {layers}")
        _note_if_plan_cannot_matter(plan, result["tokens"] + (args.prefix or 1))
    return out


def _note_if_plan_cannot_matter(plan, length: int):
    """Prompts or texts no longer than S + W: a streaming layer sees everything, every lazy ratio is 1."""
    if plan.lazy_layers and length <= plan.sink + plan.window:
        print(f"[note: {length} tokens <= S + W = {plan.sink + plan.window}: a streaming layer still sees every "
              f"token, so this plan gives the same numbers as all-full" + (
                  "; lighttransfer's choice is the tie rule (every ratio is 1)"
                  if plan.source.startswith("lighttransfer") else "") + "]", file=sys.stderr)


def load_model(args):
    """The model, on the mesh of --mesh (the part this process addresses) when one is given."""
    import lt_jax
    return lt_jax.load(args.model, mesh=args.mesh)


def plan_from_args(model, args):
    return model.plan(args.plan, lazy_fraction=args.lazy_fraction, sink=args.sink, window=args.window,
                      preset=args.stream_preset, prefill=getattr(args, "prefill", None),
                      w_last=getattr(args, "w_last", None), protect=getattr(args, "protect", None))


METHOD_OPTIONS = {"lazy_fraction": float, "w_last": int, "protect": int}


def method_plan(model, method: str, flags: dict):
    """An eval method: a plan spec with optional per-method flags after `@`, e.g.
    `lighttransfer@w_last=1@lazy_fraction=0.25` (options: lazy_fraction, w_last, protect)."""
    spec, *options = method.split("@")
    flags = dict(flags)
    for option in options:
        key, _, value = option.partition("=")
        try:
            flags[key] = METHOD_OPTIONS[key](value)
        except (KeyError, ValueError):
            raise LtJaxError(f"method {method!r}: {option!r} is not OPTION=VALUE with OPTION one of "
                             f"{', '.join(METHOD_OPTIONS)}.") from None
    return model.plan(spec, **flags)


def plan_json(plan) -> dict:
    return json.loads(plan.to_json())


def cmd_generate(args) -> dict:
    if args.input is not None or args.output is not None:  # many prompts from a file: lt_jax.serving_cli
        from lt_jax.serving_cli import generate_file
        return generate_file(args)
    from lt_jax.batching import as_batch
    from lt_jax.cache import expected_kv_bytes
    from lt_jax.inference import Sampling
    from lt_jax.plan import Plan
    # everything that can be checked without the model, first
    prompt = parse_ids(args.ids, "--ids") if args.ids is not None else None
    text = None if prompt is not None else args.prompt if args.prompt is not None else read_text(args.prompt_file)
    stop = None if args.stop_ids is None else parse_ids(args.stop_ids, "--stop-ids")
    model = load_model(args)
    if prompt is None:
        prompt = model.chat_ids(text) if args.chat else model.encode(text)
    plan = plan_from_args(model, args)
    context = model.config.max_position_embeddings
    if not prompt:
        raise LtJaxError("the prompt must hold at least one token.")
    as_batch(prompt, model.config.vocab_size)  # ids in the vocabulary, before any work
    if len(prompt) + args.max_new_tokens > context:
        raise LtJaxError(f"a prompt of {len(prompt)} tokens plus --max-new-tokens {args.max_new_tokens} exceeds the "
                         f"model's context of {context} tokens.")
    say = lambda msg: print(f"[lt-jax generate] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"prefill of {len(prompt)} prompt tokens ({plan.source}) ...")
    max_len = model.cache_len(len(prompt), args.max_new_tokens)
    t0 = time.perf_counter()
    done = model.prefill([prompt], plan, max_len)
    done.logits.block_until_ready()
    prefill_s = time.perf_counter() - t0
    say(f"prefill {prefill_s:.1f} s; decoding up to {args.max_new_tokens} tokens in one compiled loop ...")
    t1 = time.perf_counter()
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                        None if stop is None else tuple(stop))
    (result,) = model.generate_from(done, sampling=sampling)
    decode_s = time.perf_counter() - t1
    if done.ratios is not None:
        result["lazy_ratios"] = [float(r) for r in done.ratios[0]]
    kv = expected_kv_bytes(model.config, plan, 1, max_len)
    kv_full = expected_kv_bytes(model.config, Plan.full(model.config.num_layers), 1, max_len)
    out = {**result, "prompt_tokens": len(prompt), "plan": plan_json(result["plan"]), "kv_cache_bytes": kv,
           "kv_cache_bytes_all_full": kv_full, "prefill_seconds": round(prefill_s, 2),
           "decode_seconds": round(decode_s, 2), "seconds": round(prefill_s + decode_s, 2)}
    if not args.json:
        print(result["text"] if result["text"] is not None else " ".join(map(str, result["ids"])))
        if "lazy_ratios" in result:
            print(f"[lighttransfer: layers {list(result['plan'].lazy_layers)} streaming; ratios "
                  f"{' '.join(f'{r:.2f}' for r in result['lazy_ratios'])}]", file=sys.stderr)
    n = len(result["ids"])
    say(f"{n} tokens in {decode_s:.1f} s ({n / max(decode_s, 1e-9):.1f} tok/s, compilation included on a first "
        f"run); KV cache {kv / 2**20:.1f} MiB vs {kv_full / 2**20:.1f} MiB all-full, {max_len} slots")
    _note_if_plan_cannot_matter(result["plan"], len(prompt) + n)
    return out


def parse_ids(text: str, flag: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise LtJaxError(f"{flag} must be whitespace- or comma-separated integers; got {text!r}.") from None


def transformers_ppl(hf_dir: Path, ids: list[int]) -> float:
    """Perplexity of the same tokens from transformers' torch model in fp32 (the independent reference)."""
    import torch
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        return float(torch.exp(hf(x, labels=x).loss))


def cmd_demo(args) -> dict:
    import lt_jax
    from lt_jax import assets
    from lt_jax.cache import expected_kv_bytes
    from lt_jax.plan import Plan
    paths = assets.fetch()
    model = lt_jax.load(paths["smollm2"])
    essay_text = (Path(paths["essays"]) / DEMO_ESSAY).read_text()
    ids = model.encode(essay_text)[:args.tokens]
    say = lambda msg: print(f"[lt-jax demo] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"perplexity of {len(ids)} essay tokens, lt-jax ...")
    t0 = time.perf_counter()
    ours = model.perplexity(ids)
    t_ours = time.perf_counter() - t0
    say("the same with transformers (the reference) ...")
    reference = transformers_ppl(Path(paths["smollm2_hf"]), ids)

    # A question about the essay, answered with half of the layers streaming (S=4 sinks + a 1020-token window).
    plan = model.plan(args.plan, lazy_fraction=0.5)
    essay = model.decode(model.encode(essay_text)[:args.essay_tokens])
    prompt = model.chat_ids(f"{essay}\n\n{DEMO_QUESTION}")
    say(f"answering a question after {len(prompt)} tokens of the essay, plan {args.plan} "
        f"(prefill, lazy-layer choice, up to {args.new_tokens} new tokens) ...")
    t0 = time.perf_counter()
    (answer,) = model.generate([prompt], plan=plan, max_new_tokens=args.new_tokens)
    t_gen = time.perf_counter() - t0
    chosen = answer["plan"]
    slots = model.cache_len(len(prompt), args.new_tokens)
    kv = expected_kv_bytes(model.config, plan, 1, slots)
    kv_full = expected_kv_bytes(model.config, Plan.full(model.config.num_layers), 1, slots)
    result = {"model": model.label, "essay": DEMO_ESSAY, "tokens": ours["tokens"] + 1,
              "ppl_lt_jax": ours["ppl"], "ppl_transformers": reference,
              "ppl_rel_diff": abs(ours["ppl"] - reference) / reference, "seconds_ppl": round(t_ours, 2),
              "question": DEMO_QUESTION, "prompt_tokens": len(prompt), "plan": plan_json(chosen),
              "lazy_ratios": answer.get("lazy_ratios"),
              "answer": answer["text"], "seconds_generate": round(t_gen, 2),
              "kv_cache_bytes": kv, "kv_cache_bytes_all_full": kv_full}
    if not args.json:
        mib = 1 / 2**20
        print(f"model       {result['model']} ({model.config.arch}, {model.config.num_layers} layers)")
        print(f"perplexity  {ours['ppl']:.4f} lt-jax  vs  {reference:.4f} transformers  "
              f"on {result['tokens']} tokens of {DEMO_ESSAY} (relative difference {result['ppl_rel_diff']:.1e})")
        print(f"question    {DEMO_QUESTION}  (after {len(prompt)} tokens of the essay)")
        print(f"plan        {chosen.source}: layers {list(chosen.lazy_layers)} streaming (S={chosen.sink}, "
              f"W={chosen.window}), the rest full")
        if answer.get("lazy_ratios"):
            print(f"ratios      {' '.join(f'{r:.2f}' for r in answer['lazy_ratios'])}  (per layer; higher = lazier)")
        print(f"answer      {answer['text'].strip()}")
        print(f"KV cache    {kv * mib:.1f} MiB vs {kv_full * mib:.1f} MiB with every layer full "
              f"({1 - kv / kv_full:.0%} saved; {t_gen:.1f} s)")
        ring = min(chosen.sink + chosen.window, slots)
        print(f"            a streaming layer keeps {ring} of the cache's {slots} slots, so the saving grows with the "
              f"context toward {len(chosen.lazy_layers) / model.config.num_layers:.0%} (the share of streaming "
              f"layers)")
    return result


def cmd_identify(args) -> dict:
    """Offline lazy-layer identification over many samples -> a plan file (and a plot)."""
    import numpy as np
    from tqdm import tqdm
    from lt_jax.lazy import calibrate
    from lt_jax.plan import Plan, num_lazy
    from lt_jax.eval.texts import read_samples
    from lt_jax.eval.plots import check_path
    out = _writable(args.out, "--out")
    if args.plot:
        check_path(args.plot, "--plot")
    texts = read_samples(args.files, args.field)
    model = load_model(args)
    sink = 4 if args.sink is None else args.sink
    window = 1020 if args.window is None else args.window
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
              for ids in tqdm(samples, desc="lazy ratios", unit="sample", file=sys.stderr)]
    stats = calibrate(np.stack(ratios), num_lazy(model.config.num_layers, args.lazy_fraction))
    plan = Plan(model.config.num_layers, tuple(stats["lazy_layers"]), sink=sink, window=window, source="identify",
                prefill=args.prefill or "exact", w_last=args.w_last)
    record = {**json.loads(plan.to_json()),
              "identify": {"model": model.label, "files": [str(f) for f in args.files], "context": context,
                           "lazy_fraction": args.lazy_fraction, "tokens": int(sum(map(len, samples))), **stats}}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out)  # the plan first: a figure that fails later loses nothing computed
    if args.plot:
        from lt_jax.eval.plots import plot_lazy_ratios
        plot_lazy_ratios(stats, args.plot, f"{model.label}: lazy ratio over {len(samples)} samples of "
                         f"<= {context} tokens (S={sink}, W={window}); lazy: {stats['lazy_layers']}")
    if not args.json:
        print(f"lazy layers {stats['lazy_layers']} from {len(samples)} samples -> {out}"
              + (f" (plot: {args.plot})" if args.plot else ""))
    return record


def cmd_calibrate(args) -> dict:
    """A probe's per-head scores for the model -> a calibration file (next to the checkpoint by default) that
    `retrieval-aware` plans read."""
    import datetime

    import jax
    from lt_jax import assets, probes
    from lt_jax.calibration import Calibration, default_path
    from lt_jax.eval.plots import check_path
    from lt_jax.plan import default_protect, num_lazy
    def replaceable(path):  # only an earlier calibration is overwritten, never a file of the user's
        if path is not None and path.exists():
            try:
                Calibration.load(path)
            except LtJaxError:
                raise LtJaxError(f"--out {path} exists and is not a calibration file; give a new path.") from None
        return path

    out = replaceable(_writable(args.out, "--out"))
    plot = check_path(args.plot, "--plot") if args.plot else None
    lengths = parse_list(args.lengths, int, "--lengths")
    files = args.haystack or sorted(Path(assets.essays()).glob("*.txt"))
    texts = [read_text(f) for f in files] if args.probe == "retrieval" else []  # a missing file: before the load
    model = load_model(args)
    if out is None:
        if model.path is None or not Path(model.path).is_dir():
            raise LtJaxError(f"{args.model} has no checkpoint folder to save the calibration next to; give --out.")
        out = replaceable(default_path(model.path, args.probe))
    settings = {"samples": args.samples, "seed": args.seed}
    if args.probe == "retrieval":
        haystack = model.encode("\n\n".join(texts))
        context = model.config.max_position_embeddings
        if max(lengths) > context:
            raise LtJaxError(f"--lengths {max(lengths)} exceeds the model's context of {context} tokens.")
        found = probes.retrieval_scores(model, haystack, lengths, args.samples, args.seed, progress=not args.json)
        settings |= {"lengths": lengths, "format": "unkeyed needle in essays (tasks.needle_prompt)",
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


def _writable(path: str | None, flag: str) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir():
        raise LtJaxError(f"cannot write {flag} {path}: it is a directory or its folder does not exist.")
    return path


def _eval_task(args, model):
    from lt_jax import assets
    from lt_jax.eval import evaluate
    text = lambda: [read_text(f) for f in (args.haystack or sorted(Path(assets.essays()).glob("*.txt")))]  # noqa: E731
    if args.task in ("niah", "passkey"):
        lengths = parse_list(args.lengths, int, "--lengths")
        return evaluate.Retrieval(args.task, lengths, parse_list(args.depths, float, "--depths"),
                                  2 if args.samples is None else args.samples, keys=args.keys,
                                  max_new_tokens=16 if args.max_new_tokens is None else args.max_new_tokens,
                                  haystack=None if args.task == "passkey" else text())
    if args.task == "ppl":
        return evaluate.Perplexity(args.prefix, args.score_tokens, 3 if args.samples is None else args.samples,
                                   text())
    if not args.data:
        raise LtJaxError("--task longbench needs --data: LongBench's JSONL files, or folders holding them.")
    files = [f for d in map(Path, args.data) for f in (sorted(d.glob("*.jsonl")) if d.is_dir() else [d])]
    if not files:
        raise LtJaxError(f"no .jsonl file in {', '.join(args.data)}.")
    return evaluate.LongBench(files, args.max_length, args.limit)


def cmd_eval(args) -> dict:
    """Every method on the same examples; rows to a resumable JSONL, then the summary (table, JSON, plots)."""
    import numpy as np
    from lt_jax import distributed, records
    from lt_jax.eval import evaluate, plots
    from lt_jax.lazy import calibrate
    methods = parse_list(args.methods, str, "--methods")
    if len(set(methods)) != len(methods):
        raise LtJaxError(f"--methods names a method twice: {args.methods}.")
    out = _writable(args.out or f"eval-{args.task}.jsonl", "--out")
    records.read_rows(out, None, evaluate.row_key, "lt-jax eval")  # a file not ours: refused before the load
    plot = plots.check_path(args.plot, "--plot") if args.plot else None
    ratio_plot = plots.check_path(args.ratio_plot, "--ratio-plot") if args.ratio_plot else None
    model = load_model(args)
    flags = dict(lazy_fraction=args.lazy_fraction, sink=args.sink, window=args.window, preset=args.stream_preset,
                 prefill=args.prefill, w_last=args.w_last, protect=args.protect)
    plans = {m: method_plan(model, m, flags) for m in methods}
    task = _eval_task(args, model)
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
                        "perplexity" if task.name == "ppl" else "score (LongBench average)")
    ratios = [r["ratios"] for r in rows if r.get("ratios")]
    if ratio_plot and ratios:
        stats = calibrate(np.asarray(ratios), len(next(r for r in rows if r.get("ratios"))["lazy_layers"]))
        plots.plot_lazy_ratios(stats, ratio_plot, f"{title}: lazy ratios of {len(ratios)} prompts")
    if not args.json:
        print(table)
        print(f"[{len(rows)} rows in {out}" + (f"; plot: {plot}" if plot else "") + "]", file=sys.stderr)
    return {"task": task.name, "model": model.label, "out": str(out), "summary": summary, "table": table,
            "plan_flags": meta["plan_flags"], "settings": task.settings}


def cmd_bench(args) -> dict:
    """Speed and memory per method (lt_jax.eval.bench), or with --throughput the largest batch a memory budget fits."""
    from lt_jax.eval import bench
    return bench.run(args, load_model(args))


def cmd_fetch(args) -> dict:
    from lt_jax import assets
    return assets.fetch(qwen=args.qwen)


def _plan_flags(s, with_plan=True):
    if with_plan:
        s.add_argument("--plan", default=None,
                       help="full | streaming | first | last | random[:SEED] | lighttransfer (chosen per prompt "
                            "from the lazy ratios) | retrieval-aware[:PROBE|:CALIBRATION.json] (lighttransfer that "
                            "never makes the calibration's most copying layers lazy; run `lt-jax calibrate` first) | "
                            "PLAN.json (default: the model's stored plan, which a trained hybrid has; otherwise full)")
    s.add_argument("--lazy-fraction", type=FRACTION, default=0.5, help="fraction of lazy layers (default 0.5)")
    s.add_argument("--sink", type=NON_NEGATIVE, default=None, help="sink tokens S of streaming layers (default 4)")
    s.add_argument("--window", type=POSITIVE, default=None, help="window W of streaming layers (default 1020)")
    s.add_argument("--stream-preset", choices=["lighttrans-code"], default=None,
                   help="lighttrans-code: S=129, W=1025 (the released LightTransfer training mask)")
    s.add_argument("--prefill", choices=["exact", "hybrid"], default=None,
                   help="exact: full attention over the prompt in every layer (default); hybrid: each layer's mask")
    s.add_argument("--w-last", type=POSITIVE, default=None,
                   help="lighttransfer: last prompt queries that measure the lazy ratios (default 32)")
    s.add_argument("--protect", type=NON_NEGATIVE, default=None,
                   help="retrieval-aware: layers of highest calibration score that never go lazy (default: a fifth "
                        "of the layers, at most those that stay full)")


def _run_flags(s, processes: bool = False):
    """Where a command runs: a device mesh, and (eval, batch generate) the processes of a multi-host job
    (docs/pods.md)."""
    s.add_argument("--mesh", default=None,
                   help="device mesh AXIS=SIZE,... e.g. data=2,model=4 (product = device count; one size may be -1); "
                        "weights, KV cache and batches are sharded by lt_jax.sharding.RULES (default: one device)")
    if not processes:
        return
    s.add_argument("--coordinator", default=None,
                   help="HOST:PORT of process 0 of a multi-process job, or 'auto' where JAX detects the cluster "
                        "(TPU pods, SLURM); examples are split across processes")
    s.add_argument("--num-processes", type=POSITIVE, default=None, help="processes in the job (with --coordinator)")
    s.add_argument("--process-id", type=NON_NEGATIVE, default=None, help="this process's index (with --coordinator)")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Bad flags as one line (`lt-jax CMD: error: ...`, exit 2) like every other bad input, not usage + error."""

    def error(self, message):
        raise _UsageError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lt-jax", description="LightTransfer in JAX: hybrid streaming/full attention "
                                "LLMs converted from Hugging Face checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
        s.set_defaults(fn=fn)
        return s

    s = add("convert", cmd_convert, "convert an HF checkpoint directory (safetensors or .bin, sharded or not)")
    s.add_argument("hf_dir", help="a Hugging Face model directory (config.json + weights)")
    s.add_argument("out_dir", help="the lt-jax checkpoint directory to create (must not exist)")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the converted weights (default float32)")
    s = add("export", cmd_export, "export an lt-jax checkpoint back to an HF safetensors directory")
    s.add_argument("ckpt_dir", help="an lt-jax checkpoint directory")
    s.add_argument("hf_out_dir", help="the Hugging Face directory to create (must not exist)")
    s = add("train", cmd_train, "LightTransfer-Train: fine-tune the model as a fixed hybrid (streaming layers masked "
            "in training too) with AdamW; resumable; OUT becomes a checkpoint whose default plan is the training plan")
    _run_flags(s)
    s.add_argument("model", help="checkpoint dir, HF dir, or an asset name (smollm2, qwen2.5-coder)")
    s.add_argument("--data", nargs="+", required=True,
                   help="text files (split into --seq-len windows) or JSONL with text, prompt+completion, chat "
                        "messages, or ids (+ labels) per line")
    s.add_argument("--plan", required=True,
                   help="the fixed hybrid to train: a plan file from `lt-jax identify`, first, last, random[:SEED], "
                        "streaming, full")
    s.add_argument("--out", required=True, help="output directory (must not exist, unless --resume)")
    s.add_argument("--steps", type=POSITIVE, default=200, help="optimizer steps (default 200)")
    s.add_argument("--seq-len", type=POSITIVE, default=512, help="tokens per sequence at most (default 512)")
    s.add_argument("--batch-size", type=POSITIVE, default=1, help="sequences per micro-batch (default 1)")
    s.add_argument("--grad-accum", type=POSITIVE, default=1,
                   help="micro-batches per optimizer step; the loss is the mean over all their labelled tokens "
                        "(default 1)")
    s.add_argument("--lr", type=_number(float, 0.0, low_open=True, what="> 0"), default=1e-5,
                   help="peak learning rate (default 1e-5)")
    s.add_argument("--warmup", type=NON_NEGATIVE, default=0, help="linear warmup steps (default 0)")
    s.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="after warmup: cosine decay to 10%% of --lr, or constant (default cosine)")
    s.add_argument("--weight-decay", type=_number(float, 0.0, what=">= 0"), default=0.0,
                   help="AdamW's decoupled weight decay, not on norms and biases (default 0)")
    s.add_argument("--clip", type=_number(float, 0.0, what=">= 0"), default=1.0,
                   help="clip the global gradient norm to this; 0 = off (default 1.0)")
    s.add_argument("--trainable", choices=["all", "attention", "mlp", "lazy-layers", "lazy-attention"],
                   default="all", help="what trains; the rest stays bit-identical (default all)")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of the forward and backward; master weights stay float32 (default float32)")
    s.add_argument("--remat", action="store_true",
                   help="recompute each layer in the backward pass: less memory, about a third more compute")
    s.add_argument("--lora-rank", type=NON_NEGATIVE, default=0,
                   help="train rank-R LoRA adapters on the projections instead of the weights (merged into the "
                        "saved model); 0 = off (default 0)")
    s.add_argument("--lora-alpha", type=_number(float, 0.0, what=">= 0"), default=0.0,
                   help="LoRA scale alpha / R (default: alpha = R)")
    s.add_argument("--seed", type=int, default=0, help="seed of the data order (default 0)")
    s.add_argument("--save-every", type=POSITIVE, default=50, help="checkpoint every N steps (default 50)")
    s.add_argument("--keep", type=POSITIVE, default=2, help="checkpoints kept (default 2)")
    s.add_argument("--eval-data", nargs="+", default=None, help="held-out files (same formats as --data)")
    s.add_argument("--eval-every", type=POSITIVE, default=50, help="held-out loss every N steps (default 50)")
    s.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (same settings and data), bit-exactly")
    s.add_argument("--lazy-fraction", type=FRACTION, default=0.5,
                   help="fraction of lazy layers for first/last/random plans (default 0.5)")
    s.add_argument("--sink", type=NON_NEGATIVE, default=None, help="sink tokens S of streaming layers (default 4)")
    s.add_argument("--window", type=POSITIVE, default=None, help="window W of streaming layers (default 1020)")
    s.add_argument("--stream-preset", choices=["lighttrans-code"], default=None,
                   help="lighttrans-code: S=129, W=1025 (the released LightTransfer training mask)")
    s = add("ppl", cmd_ppl, "perplexity of a text or of token ids under a layer plan (default: every layer full)")
    _run_flags(s)
    s.add_argument("model", help="checkpoint dir, HF dir, or an asset name (smollm2, qwen2.5-coder)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", help="a UTF-8 text file, tokenized with the model's tokenizer")
    src.add_argument("--ids-file", help="whitespace-separated token ids")
    s.add_argument("--max-tokens", type=POSITIVE, default=None,
                   help="score the first N tokens (default and at most: the model's context)")
    s.add_argument("--prefix", type=POSITIVE, default=None,
                   help="exact prefill of the first N tokens, the rest scored as decode steps (default: none)")
    _plan_flags(s)
    s = add("generate", cmd_generate, "generate a continuation with a full, streaming or hybrid layer plan")
    _run_flags(s, processes=True)
    s.add_argument("model", help="checkpoint dir, HF dir, or an asset name (smollm2, qwen2.5-coder)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="a UTF-8 file holding the prompt text")
    src.add_argument("--ids", help="prompt token ids, e.g. '1 2 3'")
    src.add_argument("--input", help="a JSONL file of prompts (prompt, messages or ids per line; other fields are "
                     "carried into the output), served with continuous batching")
    s.add_argument("--output", help="with --input: the JSONL of results, written as rows finish; a rerun resumes it")
    s.add_argument("--batch-size", type=POSITIVE, default=8, help="with --input: rows decoded together (default 8)")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    s.add_argument("--max-new-tokens", type=POSITIVE, default=64, help="tokens to generate at most (default 64)")
    s.add_argument("--temperature", type=_number(float, 0.0, what=">= 0"), default=0.0,
                   help="sampling temperature; 0 = greedy (default 0)")
    s.add_argument("--top-k", type=NON_NEGATIVE, default=0, help="sample among the K likeliest tokens; 0 = off "
                   "(default 0)")
    s.add_argument("--top-p", type=_number(float, 0.0, 1.0, low_open=True, what="in (0, 1]"), default=1.0,
                   help="sample among the likeliest tokens holding this much probability; 1 = off (default 1)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    s.add_argument("--stop-ids", default=None, help="token ids that end a row (default: the model's EOS ids)")
    _plan_flags(s)
    s = add("demo", cmd_demo, "fetch SmolLM2-135M-Instruct, compare perplexity with transformers, answer a question "
            "about an essay with half of the layers chosen lazy by LightTransfer-Test")
    s.add_argument("--tokens", type=POSITIVE, default=DEMO_TOKENS,
                   help=f"tokens of the essay scored for perplexity (default {DEMO_TOKENS})")
    s.add_argument("--essay-tokens", type=POSITIVE, default=1800,
                   help="tokens of the essay put before the question (default 1800)")
    s.add_argument("--new-tokens", type=POSITIVE, default=48, help="answer tokens at most (default 48)")
    s.add_argument("--plan", default="lighttransfer",
                   help="layer plan for the answer (default: lighttransfer, 50%% of the layers chosen lazy)")
    s = add("identify", cmd_identify, "choose lazy layers offline from the lazy ratios over many samples "
            "(LightTransfer-Train's selection) and write a plan file")
    _run_flags(s)
    s.add_argument("model", help="checkpoint dir, HF dir, or an asset name (smollm2, qwen2.5-coder)")
    s.add_argument("files", nargs="+", help="text files, or .jsonl files with a text field per line")
    s.add_argument("--out", required=True, help="plan JSON to write")
    s.add_argument("--plot", default=None, help="also draw the per-layer ratios (PNG or SVG)")
    s.add_argument("--lazy-fraction", type=FRACTION, default=0.5, help="fraction of lazy layers (default 0.5)")
    s.add_argument("--context", type=POSITIVE, default=4096,
                   help="tokens per sample; longer texts are split (default 4096)")
    s.add_argument("--max-samples", type=POSITIVE, default=64, help="at most this many samples (default 64)")
    s.add_argument("--field", default="text",
                   help="JSONL field holding the text, or a list of token ids (default: text)")
    s.add_argument("--sink", type=NON_NEGATIVE, default=None, help="sink tokens S (default 4)")
    s.add_argument("--window", type=POSITIVE, default=None, help="window W (default 1020)")
    s.add_argument("--w-last", type=POSITIVE, default=32, help="last queries that measure the ratios (default 32)")
    s.add_argument("--prefill", choices=["exact", "hybrid"], default=None,
                   help="prefill mode stored in the plan (default exact)")
    s = add("calibrate", cmd_calibrate, "measure how much each layer's heads copy from far back (a once-per-model "
            "probe) and save it next to the checkpoint for the retrieval-aware plan")
    _run_flags(s)
    s.add_argument("model", help="checkpoint dir, HF dir, or an asset name (smollm2, qwen2.5-coder)")
    s.add_argument("--probe", choices=["retrieval", "induction"], default="retrieval",
                   help="retrieval: top-1 copy score while the model answers needles in essays (Wu et al.); "
                        "induction: attention on the successor of a repeated random token (data-free)")
    s.add_argument("--samples", type=POSITIVE, default=8, help="prompts per length (retrieval) or rows (induction)")
    s.add_argument("--lengths", default="2048,4096", help="retrieval: prompt lengths in tokens (default 2048,4096)")
    s.add_argument("--span", type=POSITIVE, default=1024, help="induction: tokens of the repeated block (default 1024)")
    s.add_argument("--queries", type=POSITIVE, default=64, help="induction: scored queries per row (default 64)")
    s.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the prompts (default 0)")
    s.add_argument("--haystack", nargs="+", default=None, help="retrieval: text files (default: the essays)")
    s.add_argument("--out", default=None, help="calibration JSON (default: calibration-PROBE.json in the checkpoint)")
    s.add_argument("--plot", default=None, help="also draw the heads x layers scores (PNG or SVG)")
    s = add("eval", cmd_eval, "run evaluation methods side by side on one task (niah, passkey, ppl, longbench); "
            "per-example rows go to a resumable JSONL, then a summary table and plots")
    _run_flags(s, processes=True)
    s.add_argument("model", help="checkpoint dir, HF dir, or an asset name (smollm2, qwen2.5-coder)")
    s.add_argument("--task", required=True, choices=["niah", "passkey", "ppl", "longbench"],
                   help="niah: needles in the essays (RULER); passkey; ppl: decode-mode perplexity; longbench")
    s.add_argument("--methods", default="full,lighttransfer,streaming",
                   help="comma-separated plans: full, lighttransfer, retrieval-aware[:PROBE], streaming, "
                        "random[:SEED], first, last, PLAN.json, each with optional @OPTION=VALUE overrides "
                        "(lazy_fraction, w_last, protect), e.g. lighttransfer@w_last=1 (default: "
                        "full,lighttransfer,streaming)")
    s.add_argument("--out", default=None, help="results JSONL; a rerun resumes it (default: eval-TASK.jsonl)")
    s.add_argument("--plot", default=None, help="PNG: depth x length heat maps (niah, passkey) or bars")
    s.add_argument("--ratio-plot", default=None, help="PNG: per-layer lazy ratios over the prompts (lighttransfer)")
    s.add_argument("--lengths", default="2048,4096", help="niah/passkey prompt lengths in tokens")
    s.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="niah/passkey needle depths in [0, 1]")
    s.add_argument("--samples", type=POSITIVE, default=None,
                   help="niah/passkey: prompts per (length, depth) (default 2); ppl: windows (default 3)")
    s.add_argument("--keys", type=POSITIVE, default=1, help="niah: needles per prompt (1 = single-key; >1 = multi-key)")
    s.add_argument("--max-new-tokens", type=POSITIVE, default=None, help="niah/passkey answer tokens (default 16)")
    s.add_argument("--haystack", nargs="+", default=None, help="niah/ppl text files (default: the essays)")
    s.add_argument("--prefix", type=POSITIVE, default=2048, help="ppl: tokens of exact prefill (default 2048)")
    s.add_argument("--score-tokens", type=POSITIVE, default=512, help="ppl: tokens scored after it (default 512)")
    s.add_argument("--data", nargs="+", default=None, help="longbench: LongBench JSONL files or folders of them")
    s.add_argument("--max-length", type=POSITIVE, default=None,
                   help="longbench: prompt tokens before middle truncation (default: the model's context)")
    s.add_argument("--limit", type=POSITIVE, default=None, help="longbench: at most this many records per dataset")
    _plan_flags(s, with_plan=False)
    s = add("bench", cmd_bench, "prefill/decode speed, time to first token, KV bytes, peak memory and compile times "
            "per method; --throughput: the largest batch a memory budget fits and its throughput relative to full")
    _run_flags(s)
    s.add_argument("model", help="checkpoint dir, HF dir, or an asset name (smollm2, qwen2.5-coder)")
    _plan_flags(s, with_plan=False)
    from lt_jax.eval.bench import add_arguments
    add_arguments(s)
    s = add("fetch", cmd_fetch, "fetch and convert the real model and the essays (idempotent)")
    s.add_argument("--qwen", action="store_true", help="also Qwen2.5-Coder-0.5B-Instruct (about 500 MB)")
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        if getattr(args, "coordinator", None) or getattr(args, "num_processes", None) is not None \
                or getattr(args, "process_id", None) is not None:
            from lt_jax import distributed
            distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        if args.command not in ("convert", "bench"):  # bench reports compile times: no persistent cache
            _enable_compilation_cache()
        result = args.fn(args)
    except LtJaxError as e:
        print(f"lt-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    elif args.command not in ("demo", "generate", "eval", "bench", "identify", "ppl", "train", "calibrate"):
        print("\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
