"""`lt-jax generate MODEL --input prompts.jsonl --output out.jsonl`: batch inference over a file with continuous
batching (`lt_jax.serving`), resumable.

Input: one JSON object per line holding `prompt` (a text; `--chat` wraps it in the chat template), chat `messages`
([{role, content}], rendered by the chat template with the generation prompt) or `ids`, and optionally
`max_new_tokens` (this row's budget; default --max-new-tokens). Other fields (`id`, ...) are carried into the
output row. Every line is checked, and every prompt tokenized and measured against the context, before the model
runs: a bad line is one sentence naming the file and line, and nothing is written.

Output (`lt_jax.records`): a first line {"meta": the settings}, then one row per prompt in the order rows finish,
each appended, flushed and fsync'd: the carried fields, `index` (the prompt's place among the input's records),
`text`, `ids`, `plan`, `lazy_ratios` (selecting plans), `prompt_tokens`, `new_tokens`, `finish_reason`. A rerun
with the same settings skips the rows already there (a killed run's half-written last line is dropped); other
settings are refused. The batch size is not a setting: a row's result does not depend on its batch.

Several processes (`--coordinator`, `lt_jax.distributed`): process I serves the prompts whose index is I modulo
the process count and writes its own part file; process 0 merges the parts into `--output` (ordered by index)
once every process is done.
"""
from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

from lt_jax.errors import LtJaxError
from lt_jax.eval.texts import numbered_jsonl

PROMPT_FIELDS = ("prompt", "messages", "ids")
WHAT = "lt-jax generate"


def read_requests(path: Path) -> tuple[list[dict], str]:
    """(records: {"line", "kind", "value", "max_new_tokens" (None: the default), "carried"}, sha256 of the file);
    each line's shape checked, nothing tokenized."""
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
        if kind == "messages" and not (isinstance(value, list) and value and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value)):
            raise LtJaxError(f"{where}: messages must be a non-empty list of {{role, content}} objects with texts.")
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
    """The `--input` form of `lt-jax generate`; returns the summary (`--json`)."""
    from tqdm import tqdm
    from lt_jax import distributed, records
    from lt_jax.batching import as_batch
    from lt_jax.cli import load_model, parse_ids, plan_from_args, plan_json
    from lt_jax.inference import Sampling
    from lt_jax.serving import generate_stream
    if args.input is None or args.output is None:
        raise LtJaxError("--input and --output go together (a JSONL of prompts in, a JSONL of results out).")
    src, out = Path(args.input), Path(args.output)
    if out.is_dir() or not out.parent.is_dir():
        raise LtJaxError(f"cannot write --output {out}: it is a directory or its folder does not exist.")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise LtJaxError(f"--output {out} is the --input file.")
    records_in, digest = read_requests(src)
    records.read_rows(out, None, row_key, WHAT)  # a file not ours: refused before the load
    stop = None if args.stop_ids is None else tuple(parse_ids(args.stop_ids, "--stop-ids"))
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, stop).check()
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
    index, count = distributed.share()  # this process's index, the process count
    key = row_key
    if count == 1 and records.part_paths(out):  # parts of an earlier multi-process run
        records.merge_parts(out, meta, key, key, WHAT)
    writer = (records.Records(out, meta, key, WHAT) if count == 1 else
              records.open_part(out, meta, key, index, count, WHAT))
    share = distributed.mine(list(range(len(records_in))), index, count)
    todo = [i for i in share if i not in writer.done]
    skipped = len(share) - len(todo)
    if skipped and not todo:
        print(f"[lt-jax generate] {out}: already complete ({skipped} rows); nothing to do", file=sys.stderr)
    tokens, t0 = 0, time.perf_counter()
    with tqdm(total=len(todo), desc="generate", unit="row", file=sys.stderr, disable=not todo) as bar:
        for result in generate_stream(model, [prompts[i] for i in todo], plan, sampling, args.batch_size,
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
    if count > 1:
        distributed.barrier(f"lt-jax generate {out.name}: rows written")
        if index == 0:
            records.merge_parts(out, meta, key, key, WHAT)
        distributed.barrier(f"lt-jax generate {out.name}: merged")
    summary = {"rows": len(todo), "skipped": skipped, "tokens": tokens, "seconds": round(seconds, 2),
               "tokens_per_s": round(tokens / seconds, 2) if todo else None, "output": str(out)}
    if not args.json:
        print(f"{len(todo)} rows ({tokens} tokens, {summary['tokens_per_s'] or 0} tokens/s) -> {out}"
              + (f"; {skipped} already there" if skipped else ""))
    return summary
