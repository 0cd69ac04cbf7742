"""`lt-jax generate MODEL`: one prompt (--prompt, --prompt-file, --ids), or with --input a JSONL of prompts served
with continuous batching (`lt_jax.serving`), resumable.

--input: one JSON object per line holding `prompt` (a text; `--chat` wraps it in the chat template), chat `messages`
([{role, content}], rendered by the chat template with the generation prompt) or `ids`, and optionally
`max_new_tokens` (this row's budget; default --max-new-tokens). Other fields (`id`, ...) are carried into the
output row. Every line is checked, and every prompt tokenized and measured against the context, before the model
runs: a bad line is one sentence naming the file and line, and nothing is written.

--output (`lt_jax.records`): one row per prompt in the order rows finish, each appended, flushed and fsync'd (the
settings in the sidecar OUT.meta.json): the carried fields, `index` (the prompt's place among the input's
records), `text`, `ids`, `plan`, `lazy_ratios` (selecting plans), `prompt_tokens`, `new_tokens`, `finish_reason`. A
rerun with the same settings skips the rows already there (a killed run's half-written last line is dropped); other
settings are refused. The batch size is not a setting: a row's result does not depend on its batch. Several
processes (`--coordinator`): `records.shared`, rows ordered by index.
"""
from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

from lt_jax.cli.flags import (POSITIVE, check_plans, load_model, model_argument, note_if_plan_cannot_matter, output,
                              parse_ids, plan_flag_values, plan_flags, plan_from_args, plan_json, run_flags, sampling,
                              sampling_flags, say)
from lt_jax.errors import LtJaxError
from lt_jax.files import numbered_jsonl, read_text

NAME = "generate"
HELP = "generate a continuation with a full, streaming or hybrid layer plan"
INTERRUPTED = "with --input, the rows written are kept; rerun the same command to continue"
PROMPT_FIELDS = ("prompt", "messages", "ids")
WHAT = "lt-jax generate"


def add_arguments(s):
    run_flags(s, processes=True)
    model_argument(s)
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="a UTF-8 file holding the prompt text")
    src.add_argument("--ids", help="prompt token ids, e.g. '1 2 3'")
    src.add_argument("--input", help="a JSONL file of prompts (prompt, messages or ids per line; other fields are "
                     "carried into the output), served with continuous batching")
    output(s, "--output", kind="file",
           help="with --input: the JSONL of results, written as rows finish; a rerun resumes it")
    s.add_argument("--batch-size", type=POSITIVE, default=8, help="with --input: rows decoded together (default 8)")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    sampling_flags(s)
    plan_flags(s)


def run(args) -> dict:
    if args.input is not None or args.output is not None:
        return generate_file(args)
    from lt_jax.batching import as_batch
    from lt_jax.cache import expected_kv_bytes
    from lt_jax.plan import Plan
    # everything that can be checked without the model, first
    prompt = parse_ids(args.ids, "--ids") if args.ids is not None else None
    text = None if prompt is not None else args.prompt if args.prompt is not None else read_text(args.prompt_file)
    stop = None if args.stop_ids is None else parse_ids(args.stop_ids, "--stop-ids")
    check_plans(args, {args.plan: plan_flag_values(args)})
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
    tell = say(NAME)
    tell(f"prefill of {len(prompt)} prompt tokens ({plan.source}) ...")
    max_len = model.cache_len(len(prompt), args.max_new_tokens)
    t0 = time.perf_counter()
    done = model.prefill([prompt], plan, max_len)
    done.logits.block_until_ready()
    prefill_s = time.perf_counter() - t0
    tell(f"prefill {prefill_s:.1f} s; decoding up to {args.max_new_tokens} tokens in one compiled loop ...")
    t1 = time.perf_counter()
    (result,) = model.generate_from(done, sampling=sampling(args, stop))
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
    tell(f"{n} tokens in {decode_s:.1f} s ({n / max(decode_s, 1e-9):.1f} tok/s, compilation included on a first "
         f"run); KV cache {kv / 2**20:.1f} MiB vs {kv_full / 2**20:.1f} MiB all-full, {max_len} slots")
    note_if_plan_cannot_matter(result["plan"], len(prompt) + n)
    return out


# ---- --input: a file of prompts ----------------------------------------------------------------------------------

def read_requests(path: Path) -> tuple[list[dict], str]:
    """(records: {"line", "kind", "value", "max_new_tokens" (None: the default), "carried"}, sha256 of the file);
    each line's shape checked, nothing tokenized."""
    from lt_jax.train.data import check_messages
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LtJaxError(f"cannot read --input {path}: {e}.") from None
    records = []
    for number, record in numbered_jsonl(path, text):
        where = f"{path} line {number}"
        given = [k for k in PROMPT_FIELDS if k in record]
        if len(given) != 1:
            raise LtJaxError(f"{where} must hold exactly one of prompt, messages or ids; it has "
                             f"{', '.join(given) or 'none'}.")
        kind, value = given[0], record[given[0]]
        if kind == "prompt" and not (isinstance(value, str) and value):
            raise LtJaxError(f"{where}: prompt must be a non-empty text.")
        if kind == "ids" and not (isinstance(value, list) and value and all(_whole(t) for t in value)):
            raise LtJaxError(f"{where}: ids must be a non-empty list of token ids.")
        if kind == "messages":
            try:
                check_messages(value, assistant=False)
            except ValueError as e:
                raise LtJaxError(f"{where}: {e}") from None
        budget = record.get("max_new_tokens")
        if budget is not None and not (_whole(budget) and budget >= 1):
            raise LtJaxError(f"{where}: max_new_tokens must be a whole number of at least 1, got {budget!r}.")
        carried = {k: v for k, v in record.items() if k not in (*PROMPT_FIELDS, "max_new_tokens")}
        records.append({"line": number, "kind": kind, "value": value, "max_new_tokens": budget, "carried": carried})
    if not records:
        raise LtJaxError(f"--input {path} holds no prompt (no non-blank line).")
    return records, hashlib.sha256(raw).hexdigest()


def row_key(row: dict) -> int:
    """An output row's key: its prompt's place in the input."""
    return int(row["index"])


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def prompt_ids(model, record: dict, chat: bool) -> list[int]:
    """A record's prompt as token ids: ids as given, a prompt encoded (with --chat, in the chat template),
    messages through the chat template with the generation prompt."""
    kind, value = record["kind"], record["value"]
    if kind == "ids":
        return list(value)
    if kind == "prompt":
        return model.chat_ids(value) if chat else model.encode(value)
    tok = model.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise LtJaxError(f"model {model.path} has no chat template for messages.")
    ids = tok.apply_chat_template(value, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def generate_file(args) -> dict:
    """The `--input` form; returns the summary (`--json`)."""
    from lt_jax import distributed, records
    from lt_jax.batching import as_batch
    from lt_jax.progress import progress_bar
    from lt_jax.serving import generate_stream
    if args.input is None or args.output is None:
        raise LtJaxError("--input and --output go together (a JSONL of prompts in, a JSONL of results out).")
    src = Path(args.input)
    out = records.output(args.output, "--output", WHAT, row_key)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise LtJaxError(f"--output {out} is the --input file.")
    records_in, digest = read_requests(src)
    stop = None if args.stop_ids is None else tuple(parse_ids(args.stop_ids, "--stop-ids"))
    settings = sampling(args, stop).check()
    check_plans(args, {args.plan: plan_flag_values(args)})
    model = load_model(args)
    plan = plan_from_args(model, args)
    context = model.config.max_position_embeddings
    prompts, budgets = [], []
    for record in records_in:  # every prompt tokenized and checked before the model runs
        where = f"{src} line {record['line']}"
        try:
            ids = as_batch(prompt_ids(model, record, args.chat), model.config.vocab_size)[0].tolist()
        except LtJaxError as e:
            raise LtJaxError(f"{where}: {e}") from None
        budget = record["max_new_tokens"] or args.max_new_tokens
        if len(ids) + budget > context:
            raise LtJaxError(f"{where}: a prompt of {len(ids)} tokens plus max_new_tokens={budget} exceeds the "
                             f"model's context of {context} tokens.")
        prompts.append(ids)
        budgets.append(budget)
    meta = {"model": model.label, "plan": plan_json(plan), "chat": bool(args.chat),
            "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                         "top_p": args.top_p, "seed": args.seed, "stop_ids": None if stop is None else list(stop)},
            "input_sha256": digest}
    if plan.lazy_layers or plan.select_lazy:  # as the single-prompt form notes it
        short = sum(len(p) + b <= plan.sink + plan.window for p, b in zip(prompts, budgets))
        if short:
            print(f"[note: {short} of {len(prompts)} prompts (with their new tokens) are no longer than S + W = "
                  f"{plan.sink + plan.window}: a streaming layer still sees every token of them, so this plan gives "
                  f"them the same result as all-full]", file=sys.stderr)
    index, count = distributed.share()  # this process's index, the process count
    with records.shared(out, meta, row_key, WHAT, row_key) as writer:
        share = distributed.mine(list(range(len(records_in))), index, count)
        todo = [i for i in share if i not in writer.done]
        skipped = len(share) - len(todo)
        if skipped and not todo:
            say(NAME)(f"{out}: already complete ({skipped} rows); nothing to do")
        tokens, t0 = 0, time.perf_counter()
        with progress_bar(len(todo), "generate", "row", disable=not todo) as bar:
            for result in generate_stream(model, [prompts[i] for i in todo], plan, settings, args.batch_size,
                                          max_new_tokens=[budgets[i] for i in todo]):
                at = todo[result["index"]]  # its place in the input
                row = {**records_in[at]["carried"], "index": at, "text": result["text"], "ids": result["ids"],
                       "plan": plan_json(result["plan"])}
                if "lazy_ratios" in result:
                    row["lazy_ratios"] = result["lazy_ratios"]
                row.update(prompt_tokens=result["prompt_tokens"], new_tokens=len(result["ids"]),
                           finish_reason=result["finish_reason"])
                writer.add(row)
                tokens += len(result["ids"])
                bar.update()
                bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):.1f} tokens/s")
        seconds = time.perf_counter() - t0
    summary = {"rows": len(todo), "skipped": skipped, "tokens": tokens, "seconds": round(seconds, 2),
               "tokens_per_s": round(tokens / seconds, 2) if todo else None, "output": str(out)}
    if not args.json:
        print(f"{len(todo)} rows ({tokens} tokens, {summary['tokens_per_s'] or 0} tokens/s) -> {out}"
              + (f"; {skipped} already there" if skipped else ""))
    return summary
