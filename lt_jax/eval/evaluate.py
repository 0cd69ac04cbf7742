"""`lt-jax eval`: every method on the same examples in one run, one JSONL row per (example, method), resumable.

Methods with an exact prefill (all but hybrid-prefill plan files) share one prefill per example: every layer
full, every lazy ratio measured (`Plan(select_lazy=0)`); each method's cache is that cache restricted to its plan
(`Model.generate_from`, which restricts the cache, tested equal to the plan's own prefill), and `lighttransfer`
takes the top-k of the measured ratios (tested equal to the priority queue's choice). So methods differ only in
which layers are lazy, and a prompt is prefilled once however many methods run. Perplexity examples are scored by
one masked forward per method (`Model.token_nll`: the plan is data, so per-prompt lazy sets never recompile).

Rows are appended and flushed one at a time (`lt_jax.records`); the sidecar OUT.meta.json records what they were
made with. A rerun skips the (example, method) pairs already written, drops a row a killed run left half-written, and
refuses a file made with other settings, so an interrupted run loses at most one row and never counts one twice; a
rerun with more --samples (niah, passkey, ruler: sample s is drawn from its own seed, whatever the count) grows the
file, keeping every row.
Several processes (`lt_jax.distributed`) split the examples by position, each writing its own part file, which
process 0 merges once all are done; the rows and the summary are those of one process on the same examples.

The summary sets each method beside `full` on the same examples: the difference of the averages and its 95 %
interval from a paired bootstrap over the examples (resampled within each column, so the average keeps its
per-column weights).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from lt_jax import distributed, needles, records
from lt_jax.errors import LtJaxError
from lt_jax.inference import Sampling
from lt_jax.plan import Plan
from lt_jax.progress import progress_bar


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    cell: dict              # where it counts in the summary, e.g. {"length": 4096, "depth": 0.5}
    ids: list[int]          # the prompt; for perplexity the whole scored window
    max_new_tokens: int = 0  # 0: a perplexity example, scored from `prefix` on
    prefix: int = 0
    target: object = None   # what `score` compares the answer with


# ---- tasks -----------------------------------------------------------------------------------------------

class Retrieval:
    """niah (RULER single- or multi-key needles in the essays) and passkey: exact match of the hidden number,
    summarized per prompt length, with a depth x length heat map."""
    percent, grows = True, True  # grows: sample s is drawn from its own seed, so more samples extend a result

    def __init__(self, name, lengths, depths, samples, keys=1, max_new_tokens=16, seed=0, haystack=None):
        if not all(0 <= d <= 1 for d in depths):
            raise LtJaxError(f"--depths must lie in [0, 1]; got {depths}.")
        if min(lengths) < 64:
            raise LtJaxError(f"--lengths must be at least 64 tokens each; got {min(lengths)}.")
        if keys < 1 or samples < 1 or max_new_tokens < 1:
            raise LtJaxError(f"need --keys >= 1, --samples >= 1 and --max-new-tokens >= 1; got keys={keys}, "
                             f"samples={samples}, max_new_tokens={max_new_tokens}.")
        self.name, self.lengths, self.depths, self.samples = name, lengths, depths, samples
        self.keys, self.max_new_tokens, self.seed, self.haystack = keys, max_new_tokens, seed, haystack
        self.settings = dict(lengths=lengths, depths=depths, samples=samples, keys=keys,
                             max_new_tokens=max_new_tokens, seed=seed)

    def examples(self, model):
        context = model.config.max_position_embeddings
        if max(self.lengths) > context:
            raise LtJaxError(f"--lengths {max(self.lengths)} exceeds the model's context of {context} tokens (a "
                             f"length counts the prompt and the {self.max_new_tokens} answer tokens).")
        hay = None if self.name == "passkey" else model.encode("\n\n".join(self.haystack))
        for length in self.lengths:
            if hay is not None and len(hay) < length:
                raise LtJaxError(f"the haystack holds {len(hay)} tokens, too few for {length}-token prompts.")
            for d, depth in enumerate(self.depths):
                for s in range(self.samples):
                    rng = np.random.default_rng([self.seed, length, d, s])
                    prompt = length - self.max_new_tokens  # RULER's length counts the answer's tokens too
                    if hay is None:
                        passkey = int(rng.integers(10_000, 100_000))
                        ids, target = needles.passkey_prompt(model, prompt, depth, passkey), str(passkey)
                    else:
                        offset = int(rng.integers(0, len(hay) - length + 1))
                        ids, target = needles.niah_prompt(model, hay[offset:] + hay[:offset], prompt, depth, rng,
                                                        self.keys)
                    yield Example(f"{length}/{depth:g}/{s}", {"length": length, "depth": depth}, ids,
                                  self.max_new_tokens, target=target)

    def score(self, example, answer: str) -> float:
        return float(needles.first_number(answer) == example.target)

    def column(self, row) -> str:
        return str(row["cell"]["length"])


class Perplexity:
    """Decode-mode perplexity over the essays: windows of prefix + scored tokens; exp(total NLL / tokens)."""
    name, percent, grows = "ppl", False, False

    def __init__(self, prefix, score_tokens, samples, haystack):
        if prefix < 1 or score_tokens < 1 or samples < 1:
            raise LtJaxError(f"need --prefix, --score-tokens and --samples >= 1; got {prefix}, {score_tokens}, "
                             f"{samples}.")
        self.prefix, self.score_tokens, self.samples, self.haystack = prefix, score_tokens, samples, haystack
        self.settings = dict(prefix=prefix, score_tokens=score_tokens, samples=samples)

    def examples(self, model):
        span = self.prefix + self.score_tokens
        context = model.config.max_position_embeddings
        if span > context:
            raise LtJaxError(f"--prefix + --score-tokens = {span} exceeds the model's context of {context} tokens.")
        hay = model.encode("\n\n".join(self.haystack))
        if len(hay) < span:
            raise LtJaxError(f"the text holds {len(hay)} tokens, fewer than --prefix + --score-tokens = {span}.")
        stride = max(1, (len(hay) - span) // max(1, self.samples - 1))
        for k in range(self.samples):
            start = min(k * stride, len(hay) - span)
            yield Example(f"w{k}", {"prefix": self.prefix}, hay[start:start + span], prefix=self.prefix)

    def column(self, row) -> str:
        return f"ppl ({self.prefix} + {self.score_tokens})"

    @staticmethod
    def aggregate(rows) -> float:
        return float(np.exp(sum(r["nll_sum"] for r in rows) / sum(r["tokens"] for r in rows)))


class LongBench:
    """LongBench v1 from its JSONL files: official templates, generation lengths, middle truncation, chat
    template where LongBench applies one, official metrics; summarized per dataset and as their mean."""
    name, percent, grows = "longbench", True, False

    def __init__(self, paths, max_length=None, limit=None):
        from lt_jax.eval import longbench
        self.data = [longbench.load(p) for p in paths]  # fails early, naming the file and line
        self.max_length, self.limit = max_length, limit
        self.settings = dict(data=[str(p) for p in paths], max_length=max_length, limit=limit)

    def examples(self, model):
        from lt_jax.eval import longbench
        context = model.config.max_position_embeddings
        chat = bool(model.tokenizer is not None and getattr(model.tokenizer, "chat_template", None))
        template = len(model.chat_ids("")) if chat else 0
        for ds, dataset in self.data:
            budget = min(self.max_length or context, context) - ds.max_new_tokens - template - 8
            for i, record in enumerate(dataset[:self.limit]):
                raw = model.tokenizer(longbench.prompt_text(ds, record), add_special_tokens=False)["input_ids"]
                text = model.decode(longbench.truncate_middle(raw, budget))
                ids = model.chat_ids(text) if chat and ds.chat else model.encode(text)
                yield Example(f"{ds.name}/{record.get('_id', i)}", {"dataset": ds.name}, ids, ds.max_new_tokens,
                              target=(ds, record))

    def score(self, example, answer: str) -> float:
        from lt_jax.eval import longbench
        ds, record = example.target
        return longbench.score(ds, answer, record)

    def column(self, row) -> str:
        return row["cell"]["dataset"]


class Ruler:
    """RULER's synthetic tasks (`lt_jax.eval.ruler`; the two QA tasks need SQuAD/HotpotQA and are left out):
    `samples` prompts per (task, length), RULER's answer budget per task unless `max_new_tokens`, scored by
    string_match_all; summarized per task (per task and length when several lengths), the average over those."""
    name, percent, grows = "ruler", True, True

    def __init__(self, tasks, lengths, samples, seed=0, max_new_tokens=None, haystack=None):
        from lt_jax.eval import ruler
        unknown = [t for t in tasks if t not in ruler.TASKS]
        if unknown or not tasks or len(set(tasks)) != len(tasks):
            raise LtJaxError(f"ruler tasks must be distinct names among {', '.join(ruler.TASKS)} (qa_1/qa_2 need "
                             f"SQuAD/HotpotQA, not shipped); got {','.join(tasks) or 'none'}.")
        if min(lengths) < 256 or samples < 1 or (max_new_tokens is not None and max_new_tokens < 1):
            raise LtJaxError(f"ruler needs --lengths >= 256 each, --samples >= 1 and --max-new-tokens >= 1; got "
                             f"lengths={lengths}, samples={samples}, max_new_tokens={max_new_tokens}.")
        self.tasks, self.lengths, self.samples, self.seed = list(tasks), lengths, samples, seed
        self.max_new_tokens, self.haystack = max_new_tokens, haystack
        self.settings = dict(tasks=self.tasks, lengths=lengths, samples=samples, seed=seed,
                             max_new_tokens=max_new_tokens)

    def examples(self, model):
        from lt_jax.eval import ruler
        context = model.config.max_position_embeddings
        if max(self.lengths) > context:
            raise LtJaxError(f"--lengths {max(self.lengths)} exceeds the model's context of {context} tokens (a "
                             f"length counts the prompt and the answer tokens).")
        sources = ruler.Sources.from_texts(self.haystack)
        render, count = ruler.model_renderer(model)
        order = list(ruler.TASKS)  # a task's seed is its place in the suite, not in --task's list
        for length in self.lengths:
            for task in self.tasks:
                units = None  # the previous sample's haystack size: the next search starts there
                for s in range(self.samples):
                    try:
                        sample = ruler.generate(task, length, [self.seed, order.index(task), length, s], render,
                                                count, sources, self.max_new_tokens, units)
                    except ValueError as e:
                        raise LtJaxError(f"ruler {e}") from None
                    units = sample.units
                    yield Example(f"{task}/{length}/{s}", {"task": task, "length": length}, sample.ids,
                                  sample.max_new_tokens, target=sample.prompt.answers)

    def score(self, example, answer: str) -> float:
        from lt_jax.eval import ruler
        return ruler.string_match_all(ruler.postprocess(answer), example.target)

    def column(self, row) -> str:
        cell = row["cell"]
        return cell["task"] if len(self.lengths) == 1 else f"{cell['task']}@{cell['length']}"


# ---- running ---------------------------------------------------------------------------------------------

def row_key(row: dict) -> tuple:
    return row["example"], row["method"]


def more_samples(old: dict, new: dict) -> bool:
    """Whether the eval settings `new` hold every example of `old`: the same settings but more samples (for a task
    that `grows`)."""
    old, new = dict(old), dict(new)
    before, after = dict(old.pop("settings", {})), dict(new.pop("settings", {}))
    less, more = before.pop("samples", None), after.pop("samples", None)
    return old == new and before == after and isinstance(less, int) and isinstance(more, int) and less < more


def run(model, task, methods: dict[str, Plan], out: Path, meta: dict, progress: bool = True,
        share: tuple[int, int] | None = None) -> list[dict]:
    """Run every method on every example of `task`, appending to `out`; returns the rows of these methods (every
    process's, once all are done). `share`: (process index, process count), default `jax.distributed`'s."""
    index, count = share or distributed.share()
    examples = list(task.examples(model))
    context = model.config.max_position_embeddings
    for e in examples:  # before the first row, not an hour into the run
        if len(e.ids) + e.max_new_tokens > context:
            raise LtJaxError(f"example {e.id}: {len(e.ids)} prompt tokens + {e.max_new_tokens} new exceed the "
                             f"model's context of {context}.")
    longest = max(len(e.ids) + e.max_new_tokens for e in examples)
    same = [m for m, p in methods.items() if p.lazy_count and longest <= p.sink + p.window]
    if same and progress:
        print(f"[lt-jax eval] note: no example is longer than S + W, so {', '.join(same)} will give the same numbers "
              f"as all-full (a streaming layer still sees every token; lighttransfer's choice is the tie rule)",
              file=sys.stderr)
    place = {e.id: i for i, e in enumerate(examples)}
    method = {m: i for i, m in enumerate(methods)}
    def order(r):
        return place.get(r["example"], len(place)), method.get(r["method"], len(method)), r["method"]

    if task.grows and index == 0:
        records.grow(out, meta, "lt-jax eval", more_samples)
    if task.grows and count > 1:
        distributed.barrier(f"lt-jax eval {out.name}: settings grown")
    with records.shared(out, meta, row_key, "lt-jax eval", order, (index, count)) as results:
        todo = [(e, [m for m in methods if (e.id, m) not in results.done])
                for e in distributed.mine(examples, index, count)]
        todo = [(e, ms) for e, ms in todo if ms]
        if not todo and progress:
            print(f"[lt-jax eval] {out}: already complete ({len(results.rows)} rows); nothing to run",
                  file=sys.stderr)
        with progress_bar(sum(len(ms) for _, ms in todo), f"eval {task.name}", "run",
                          not progress or not todo) as bar:
            for example, names in todo:
                for row in run_example(model, example, {m: methods[m] for m in names}, task):
                    results.add(row)
                    bar.update()
    rows = results.rows
    ids = {e.id for e in examples}
    return [r for r in rows if r["method"] in methods and r["example"] in ids]


def run_example(model, example: Example, methods: dict[str, Plan], task):
    """Yields one row per method, as soon as it is done."""
    cfg = model.config
    selecting = [p for p in methods.values() if p.per_prompt]
    measure = Plan(cfg.num_layers, select_lazy=0, source="measure",
                   **({k: getattr(selecting[0], k) for k in ("sink", "window", "w_last")} if selecting else {}))
    base = {"example": example.id, "cell": example.cell}
    measured = {}  # (sink, window, w_last) -> ratios [L]; the shared prefill measures the first selecting plan's

    def ratios_for(plan: Plan, prompt: list[int]):
        key = (plan.sink, plan.window, plan.w_last)
        if key not in measured:  # another query set: one more exact prefill, ring caches only
            measured[key] = model.lazy_ratios(prompt, *key)
        return measured[key]

    if example.max_new_tokens == 0:  # perplexity
        tokens = np.asarray([example.ids], np.int32)
        for name, plan in methods.items():
            t0 = time.perf_counter()
            ratios = ratios_for(plan, example.ids[:example.prefix]) if plan.per_prompt else None
            plan = plan.choose(ratios)
            prefix = None if plan.prefill == "hybrid" else example.prefix  # hybrid: the prompt streams too
            nll = model.token_nll(tokens, plan, prefix)[0, example.prefix - 1:]
            yield {**base, "method": name, "lazy_layers": list(plan.lazy_layers), "nll_sum": float(np.sum(nll)),
                   "tokens": int(nll.shape[0]), "seconds": round(time.perf_counter() - t0, 3),
                   **({"ratios": _round(ratios)} if ratios is not None else {})}
        return
    shared = None
    for name, plan in methods.items():
        t0 = time.perf_counter()
        ratios = None
        if plan.prefill == "hybrid":  # its own prefill: lazy layers stream over the prompt too
            result = model.generate([example.ids], plan=plan, max_new_tokens=example.max_new_tokens)[0]
            ids, fixed = result["ids"], result["plan"]
        else:
            if shared is None:
                shared, first = measure_prefill(model, example, measure)
                measured[(measure.sink, measure.window, measure.w_last)] = first
            ratios = ratios_for(plan, example.ids) if plan.per_prompt else None
            fixed = plan.choose(ratios)
            ids = generate_from(model, shared, fixed, example.max_new_tokens)
        answer = model.decode(ids)
        yield {**base, "method": name, "lazy_layers": list(fixed.lazy_layers), "answer": answer,
               "target": example.target if isinstance(example.target, (str, list)) else None,
               "score": task.score(example, answer), "seconds": round(time.perf_counter() - t0, 3),
               **({"ratios": _round(ratios)} if ratios is not None else {})}


def measure_prefill(model, example: Example, measure: Plan):
    """One exact prefill, every layer full and its lazy ratio measured -> (`Prefilled`, ratios [L])."""
    done = model.prefill([example.ids], measure, model.cache_len(len(example.ids), example.max_new_tokens))
    return done, done.ratios.mean(axis=0)


def generate_from(model, shared, plan: Plan, max_new_tokens: int, stop_ids=None) -> list[int]:
    """Greedy decode under `plan` from the shared all-full prefill (`measure_prefill`); stops at the model's EOS
    (or `stop_ids`; () never stops)."""
    sampling = Sampling(max_new_tokens, stop_ids=None if stop_ids is None else tuple(stop_ids))
    return model.generate_from(shared, plan, sampling)[0]["ids"]


def _round(ratios):
    return None if ratios is None else [round(float(r), 5) for r in ratios]


# ---- summary ---------------------------------------------------------------------------------------------

def summarize(task, rows: list[dict], methods: list[str]) -> dict:
    """{"columns": [...], "methods": {method: {column: value, "average": value, "examples": n[, "vs_full": ...]}}}.
    Retrieval, LongBench and RULER: mean score x 100 per column, the average over columns (LongBench's macro
    average, RULER's average over tasks), and beside `full` (`paired`); perplexity: exp(total NLL / tokens)."""
    columns = sorted({task.column(r) for r in rows}, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else c))
    value = getattr(task, "aggregate", None) or (lambda rs: 100 * float(np.mean([r["score"] for r in rs])))
    table = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        cells = {c: value([r for r in mine if task.column(r) == c]) for c in columns
                 if any(task.column(r) == c for r in mine)}
        if cells:
            table[m] = {**cells, "average": float(np.mean(list(cells.values()))), "examples": len(mine)}
            if task.percent and m != "full" and "full" in methods:
                table[m]["vs_full"] = paired(task, rows, m, "full")
    return {"columns": columns, "methods": table}


def paired(task, rows: list[dict], method: str, reference: str, resamples: int = 10_000, seed: int = 0):
    """`method` minus `reference` on the examples both have: {"delta": the difference of their averages over
    columns (x 100), "ci95": [lo, hi] from a paired bootstrap (`resamples` draws of the examples with replacement
    within each column, seed `seed`), "examples": n}; None when they share no example."""
    score = {(r["method"], r["example"]): r["score"] for r in rows}
    column = {r["example"]: task.column(r) for r in rows}
    diffs = {}
    for (m, e), s in sorted(score.items()):
        if m == method and (reference, e) in score:
            diffs.setdefault(column[e], []).append(s - score[reference, e])
    if not diffs:
        return None
    per_column = [np.asarray(d) for d in diffs.values()]
    return {"delta": 100 * float(np.mean([d.mean() for d in per_column])),
            "ci95": bootstrap(per_column, resamples, seed), "examples": sum(map(len, per_column))}


def bootstrap(per_column: list, resamples: int = 10_000, seed: int = 0) -> list[float]:
    """95 % interval (x 100) of the average over columns of per-example values: `resamples` draws of each column's
    examples with replacement, within the column, so every column keeps its weight in the average."""
    rng = np.random.default_rng(seed)
    draws = np.mean([v[rng.integers(0, len(v), (resamples, len(v)))].mean(axis=1)
                     for v in map(np.asarray, per_column)], axis=0)
    return [float(v) for v in 100 * np.percentile(draws, [2.5, 97.5])]


def markdown(task, summary: dict) -> str:
    cols = summary["columns"]
    ppl = task.name == "ppl"
    versus = any("vs_full" in cells for cells in summary["methods"].values())
    head = [*cols, "vs full"] if ppl else [*(f"{task.name} {c}" for c in cols), "average"] + \
        (["vs full (95 % CI)"] if versus else [])
    lines = [f"| method | {' | '.join(head)} | examples |", "|---|" + "---|" * (len(head) + 1)]
    full = summary["methods"].get("full", {}).get("average")
    for m, cells in summary["methods"].items():
        values = [f"{cells[c]:.3f}" if ppl else f"{cells[c]:.1f}" if c in cells else "-" for c in cols]
        extra = (f"{cells['average'] / full - 1:+.2%}" if full else "-") if ppl else f"{cells['average']:.1f}"
        if versus:
            p = cells.get("vs_full")
            extra += " | " + (f"{p['delta']:+.1f} ({p['ci95'][0]:+.1f} to {p['ci95'][1]:+.1f})" if p else "-")
        lines.append(f"| {m} | {' | '.join(values)} | {extra} | {cells['examples']} |")
    return "\n".join(lines)


def heat_maps(rows: list[dict], methods: list[str]) -> dict:
    """method -> (lengths, depths, accuracy [depths, lengths]) for the retrieval tasks."""
    lengths = sorted({r["cell"]["length"] for r in rows})
    depths = sorted({r["cell"]["depth"] for r in rows})
    out = {}
    for m in methods:
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                hits = [r["score"] for r in rows if r["method"] == m and r["cell"] == {"length": n, "depth": d}]
                grid[i, j] = np.mean(hits) if hits else np.nan
        out[m] = (lengths, depths, grid)
    return out
