"""`lt-jax ppl MODEL --text-file F | --ids-file F`: perplexity under a layer plan."""
from __future__ import annotations

import time

from lt_jax.cli.flags import (POSITIVE, check_plans, load_model, model_argument, note_if_plan_cannot_matter,
                              parse_ids, plan_flag_values, plan_flags, plan_from_args, plan_json, run_flags, say)
from lt_jax.errors import LtJaxError
from lt_jax.files import read_text

NAME = "ppl"
HELP = "perplexity of a text or of token ids under a layer plan (default: every layer full)"
INTERRUPTED = "nothing was written; rerun the same command to score again"


def add_arguments(s):
    run_flags(s)
    model_argument(s)
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", help="a UTF-8 text file, tokenized with the model's tokenizer")
    src.add_argument("--ids-file", help="whitespace-separated token ids")
    s.add_argument("--max-tokens", type=POSITIVE, default=None,
                   help="score the first N tokens (default and at most: the model's context)")
    s.add_argument("--prefix", type=POSITIVE, default=None,
                   help="exact prefill of the first N tokens, the rest scored as decode steps (default: none)")
    plan_flags(s)


def run(args) -> dict:
    text = read_text(args.text_file) if args.text_file else None
    ids = None if text is not None else parse_ids(read_text(args.ids_file), f"ids file {args.ids_file}")
    check_plans(args, {args.plan: plan_flag_values(args)})
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
        say(NAME)(f"the text holds {len(ids)} tokens; scoring its first {limit} "
                  f"({'--max-tokens' if args.max_tokens else 'the model context'})")
    say(NAME)(f"scoring {min(len(ids), limit)} tokens ...")
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
        note_if_plan_cannot_matter(plan, result["tokens"] + (args.prefix or 1))
    return out
