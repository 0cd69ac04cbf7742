"""Which queries should measure the lazy ratio? One run over the niah examples of `lt-jax eval` (same seeds):
the ratio of every layer measured from four query sets, then lighttransfer's and retrieval-aware's choice from
each, decoded from the same exact prefill.

Query sets: the prompt's last query (w_last = 1), its last 32 (the default), the question sentence's tokens, and
the first 4 decoded tokens of the full model's own answer (teacher forced: what a decision delayed to the first
decoded tokens would see, caches still full). A ratio is the attention mass, averaged over heads and the set's
queries, on the prompt's first S and last W positions (what a ring keeps). The last-32 ratios are checked
against the exact prefill's own measurement.

    .venv/bin/python scripts/exp_query_sets.py [--lengths 2048,4096] [--samples 2] [--out FILE.jsonl]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

import lt_jax
from lt_jax import probes
from lt_jax.calibration import find
from lt_jax import needles as tasks
from lt_jax.eval import evaluate
from lt_jax.files import read_text
from lt_jax.lazy import lazy_set
from lt_jax.plan import Plan, default_protect, num_lazy

REPO = Path(__file__).resolve().parents[1]
S, W, DECODED = 4, 1020, 4


def question_span(model, ids: list[int], question: str) -> list[int]:
    """Columns of the question sentence in the prompt (its tokens as encoded alone, found as a run)."""
    q = model.tokenizer(question, add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(q), -1, -1):
        if ids[start:start + len(q)] == q:
            return list(range(start, start + len(q)))
    raise ValueError("question not found in the prompt")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lengths", default="2048,4096")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--out", default=str(REPO / "results" / "retrieval" / "query-sets-smollm2.jsonl"))
    args = p.parse_args()
    model = lt_jax.load(args.model)
    L = model.config.num_layers
    n = num_lazy(L, args.fraction)
    cal, _ = find(model.path, "retrieval", model.config)
    protected = np.isin(np.arange(L), cal.protected(default_protect(L, n)))
    essays = sorted((REPO / ".assets" / "essays").glob("*.txt"))
    task = evaluate.Retrieval("niah", [int(x) for x in args.lengths.split(",")], [0, 0.25, 0.5, 0.75, 1.0],
                              args.samples, max_new_tokens=12, haystack=[read_text(f) for f in essays])
    out = Path(args.out)
    done = {json.loads(line)["example"] for line in out.read_text().splitlines()} if out.exists() else set()
    examples = [e for e in task.examples(model) if e.id not in done]
    for ex in tqdm(examples, desc="query sets", file=sys.stderr):
        T = len(ex.ids)
        shared, measured = evaluate.measure_prefill(model, ex, Plan(L, select_lazy=0, sink=S, window=W))
        answer = evaluate.generate_from(model, shared, Plan.full(L), ex.max_new_tokens)
        text = model.decode(ex.ids)
        question = text[text.rindex("What is the special magic number for"):].split("?")[0] + "?"
        sets = {"last 1": [T - 1], "last 32": list(range(T - 32, T)),
                "question": question_span(model, ex.ids, question),
                "first 4 decoded": list(range(T, T + DECODED))}
        columns = sorted({c for cols in sets.values() for c in cols})
        kept = np.zeros(T + DECODED, bool)
        kept[:S] = True
        kept[max(0, T - W):T] = True
        _, mass = probes.probe_row(model, (ex.ids + answer)[:T + DECODED], columns,
                                   np.broadcast_to(kept, (len(columns), T + DECODED)))
        where = {c: i for i, c in enumerate(columns)}
        ratios = {name: mass[..., [where[c] for c in cols]].mean(axis=(1, 2)) for name, cols in sets.items()}
        assert np.abs(ratios["last 32"] - measured).max() < 1e-4, "the probe disagrees with the prefill's ratio"
        row = {"example": ex.id, "cell": ex.cell, "target": ex.target, "full": model.decode(answer),
               "ratios": {k: [round(float(x), 5) for x in v] for k, v in ratios.items()}, "methods": {}}
        for name, r in ratios.items():
            for rule, keep in (("lighttransfer", None), ("retrieval-aware", protected)):
                lazy = tuple(int(i) for i in lazy_set(r, n, keep))
                answer_ = model.decode(evaluate.generate_from(model, shared, Plan(L, lazy, sink=S, window=W),
                                                              ex.max_new_tokens))
                row["methods"][f"{rule} / {name}"] = {"lazy_layers": list(lazy), "answer": answer_,
                                                      "score": float(tasks.first_number(answer_) == ex.target)}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    names = list(rows[0]["methods"])
    lengths = sorted({r["cell"]["length"] for r in rows})
    print("| rule / query set | " + " | ".join(map(str, lengths)) + " | average |")
    print("|---" * (len(lengths) + 2) + "|")
    for m in ["full"] + names:
        cells = [100 * np.mean([(r["methods"][m]["score"] if m != "full" else
                                 float(tasks.first_number(r["full"]) == r["target"]))
                                for r in rows if r["cell"]["length"] == n_]) for n_ in lengths]
        print(f"| {m} | " + " | ".join(f"{c:.0f}" for c in cells) + f" | {np.mean(cells):.0f} |")


if __name__ == "__main__":
    main()
