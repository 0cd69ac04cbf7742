"""The RULER tables of README.md and results/README.md, from the committed rows (results/ruler, results/sweep,
results/peers): each method's average over the tasks, its difference from full on the same prompts and that
difference's 95 % interval (`lt_jax.eval.evaluate.paired` and `.bootstrap`: prompts resampled within each task).

    .venv/bin/python scripts/ruler_tables.py [--table readme|smollm2|qwen|sweep] [--json]

Every row of a column is compared with lt-jax's `full` on the prompts both have (kvpress's torch `full` gives the
same answers on every prompt: results/peers/README.md); a cell on fewer prompts than the column's full says how many.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


from lt_jax.eval import evaluate

REPO = Path(__file__).resolve().parents[1]
NLL = "results/nll/calibration-nll-smollm2.json"
RET = "results/retrieval/calibration-retrieval-smollm2.json"
RET_QWEN = "results/retrieval/calibration-retrieval-qwen.json"
IND = "results/retrieval/calibration-induction-smollm2.json"
NLL_QWEN = "results/nll/calibration-nll-qwen.json"
GREEDY_QWEN = "results/nll/calibration-nll-greedy-qwen.json"
S64 = "@sink=64@window=960"

# column -> {row label: (rows file, method in it)}; `full` is every column's reference
SMOLLM2 = {
    "4K": {
        "full": ("results/sweep/smollm2-4k.jsonl", "full"),
        "**retrieval-aware** (retrieval probe)": ("results/sweep/smollm2-4k.jsonl", f"retrieval-aware:{RET}"),
        "retrieval-aware, S = 64 / W = 960": ("results/sweep/smollm2-4k.jsonl", f"retrieval-aware:{RET}{S64}"),
        "retrieval-aware (nll probe)": ("results/sweep/smollm2-4k.jsonl", f"retrieval-aware:{NLL}"),
        "retrieval-aware (induction probe)": ("results/sweep/smollm2-4k.jsonl", f"retrieval-aware:{IND}"),
        "**loss-guided** (nll probe)": ("results/sweep/smollm2-4k.jsonl", f"loss-guided:{NLL}"),
        "loss-guided, S = 64 / W = 960": ("results/sweep/smollm2-4k.jsonl", f"loss-guided:{NLL}{S64}"),
        "lighttransfer (the paper's rule)": ("results/sweep/smollm2-4k.jsonl", "lighttransfer"),
        "periodic (every other layer)": ("results/sweep/smollm2-4k.jsonl", "periodic"),
        "streaming (every layer)": ("results/ruler/smollm2-4k.jsonl", "streaming"),
        "DuoAttention (kvpress, on-the-fly heads)": ("results/peers/smollm2-4k.jsonl", "duo"),
        "DuoAttention, kvpress's own S/W (duo-native)": ("results/peers/smollm2-4k.jsonl", "duo-native"),
        "SimLayerKV (kvpress)": ("results/peers/smollm2-4k.jsonl", "simlayerkv"),
        "loss-guided, 25 % lazy": ("results/sweep/smollm2-4k.jsonl", f"loss-guided:{NLL}@lazy_fraction=0.25"),
        "lighttransfer, 25 % lazy": ("results/sweep/smollm2-4k.jsonl", "lighttransfer@lazy_fraction=0.25"),
        "DuoAttention (duo-native), bytes of 25 % lazy": ("results/peers/smollm2-4k-lazy25.jsonl", "duo-native"),
        "SimLayerKV, 25 % lazy": ("results/peers/smollm2-4k-lazy25.jsonl", "simlayerkv"),
    },
    "8K": {
        "full": ("results/sweep/smollm2-8k.jsonl", "full"),
        "**retrieval-aware** (retrieval probe)": ("results/sweep/smollm2-8k.jsonl", f"retrieval-aware:{RET}"),
        "**loss-guided** (nll probe)": ("results/sweep/smollm2-8k.jsonl", f"loss-guided:{NLL}"),
        "loss-guided, S = 64 / W = 960": ("results/sweep/smollm2-8k.jsonl", f"loss-guided:{NLL}{S64}"),
        "lighttransfer (the paper's rule)": ("results/sweep/smollm2-8k.jsonl", "lighttransfer"),
        "periodic (every other layer)": ("results/sweep/smollm2-8k.jsonl", "periodic"),
    },
}
QWEN = {length: {label: (f"results/ruler/qwen-{length.lower()}.jsonl", method) for label, method in (
    ("full", "full"), ("**retrieval-aware** (retrieval probe)", f"retrieval-aware:{RET_QWEN}"),
    ("retrieval-aware (nll probe)", f"retrieval-aware:{NLL_QWEN}"), ("loss-guided (nll probe)",
                                                                     f"loss-guided:{NLL_QWEN}"),
    ("loss-guided, greedy (nll-greedy)", f"loss-guided:{GREEDY_QWEN}"),
    ("lighttransfer", "lighttransfer"), ("periodic", "periodic"))} for length in ("4K", "8K", "16K")}
SWEEP_4K = ["full"] + [f"{rule}{option}" for rule in ("lighttransfer", f"loss-guided:{NLL}")
                       for option in ("", S64, "@sink=128@window=896", "@lazy_fraction=0.25", "@window=2454")] + \
    ["periodic", f"retrieval-aware:{RET}", f"retrieval-aware:{RET}{S64}", f"retrieval-aware:{NLL}",
     f"retrieval-aware:{IND}"]
SWEEP_8K = ["full", "lighttransfer", f"loss-guided:{NLL}", f"loss-guided:{NLL}{S64}", "periodic",
            f"retrieval-aware:{RET}"]
KV25 = ("@lazy_fraction=0.8@window=252", "@lazy_fraction=0.9@window=679")  # a quarter of full's KV bytes at 4K
SWEEP_KV25 = ["full", f"retrieval-aware:{RET}{KV25[0]}", f"loss-guided:{NLL}{KV25[0]}", f"lighttransfer{KV25[0]}",
              f"retrieval-aware:{RET}{KV25[1]}"]
SWEEP = {"4K": {m: ("results/sweep/smollm2-4k.jsonl", m) for m in SWEEP_4K},
         "8K": {m: ("results/sweep/smollm2-8k.jsonl", m) for m in SWEEP_8K},
         "4K, 25 % KV": {m: ("results/sweep/smollm2-4k-kv25.jsonl", m) for m in SWEEP_KV25}}
SMOLLM2_LAYERS, SMOLLM2_TASKS = 30, ("niah_single_1", "niah_single_2", "niah_multikey_1", "vt", "cwe", "fwe")
README = {  # README.md's table: row -> {column: (source table, its row, its column)}
    "full": "full", "**retrieval-aware**": "**retrieval-aware** (retrieval probe)",
    "loss-guided": "**loss-guided** (nll probe)", "loss-guided, greedy": "loss-guided, greedy (nll-greedy)",
    "lighttransfer": "lighttransfer (the paper's rule)",
    "periodic": "periodic (every other layer)", "DuoAttention (kvpress)": "DuoAttention (kvpress, on-the-fly heads)",
    "SimLayerKV (kvpress)": "SimLayerKV (kvpress)"}


class _Task:  # what `evaluate.paired` reads of a task
    percent = True

    @staticmethod
    def column(row):
        return row["cell"]["task"]


def _rows(path: str) -> list[dict]:
    file = REPO / path
    if not file.exists():
        raise SystemExit(f"ruler_tables: {path} is missing; its run script is beside it.")
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def cells(spec: dict) -> dict:
    """column -> row label -> {"average", "per_task", "prompts", "vs_full"} (None where a file lacks the method)."""
    files, out = {}, {}
    for column, rows in spec.items():
        ref_file, ref_method = rows["full"]
        full = [r for r in files.setdefault(ref_file, _rows(ref_file)) if r["method"] == ref_method]
        out[column] = {}
        for label, (path, method) in rows.items():
            mine = [r for r in files.setdefault(path, _rows(path)) if r["method"] == method]
            if not mine:
                out[column][label] = None
                continue
            # summarize's cells are the per-task means, their average and `vs_full` (the paired bootstrap)
            both = [{**r, "method": "full"} for r in full] + ([] if label == "full" else
                                                              [{**r, "method": "m"} for r in mine])
            summary = evaluate.summarize(_Task, both, ["full", "m"])
            c = summary["methods"]["full" if label == "full" else "m"]
            per_task = {t: c[t] for t in summary["columns"] if t in c}
            scores = [[r["score"] for r in mine if _Task.column(r) == t] for t in per_task]
            out[column][label] = {"average": c["average"], "per_task": per_task, "prompts": len(mine),
                                  "full_prompts": len(full), "ci95": evaluate.bootstrap(scores),
                                  "lazy": Counter(len(r.get("lazy_layers", [])) for r in mine).most_common(1)[0][0],
                                  "vs_full": c.get("vs_full")}
    return out


def _cell(c: dict | None, detail: bool = True) -> str:
    if c is None:
        return "-"
    text = f"{c['average']:.1f}"
    p = c["vs_full"]
    if detail and p:
        lo, hi = p["ci95"]
        text += f" ({p['delta']:+.1f}; {lo:+.0f} to {hi:+.0f})"
    if c["prompts"] != c["full_prompts"]:
        text += f" [{c['prompts']} prompts]"
    return text


def smollm2_table(got: dict) -> str:
    lines = ["| method | 4K: average (− full; paired 95 %) | 8K: average (− full; paired 95 %) |", "|---|---|---|"]
    for label in got["4K"]:
        lines.append(f"| {label} | {_cell(got['4K'][label])} | {_cell(got['8K'].get(label))} |")
    return "\n".join(lines)


def qwen_table(got: dict, length: str) -> str:
    tasks = ("niah_multikey_3", "niah_multivalue", "vt", "cwe")
    lines = [f"| method | {' | '.join(tasks)} | average (− full; paired 95 %) |", "|---" * (len(tasks) + 2) + "|"]
    for label, c in got[length].items():
        if c is None:  # a method not run at this length
            continue
        scores = " | ".join("-" if c is None or t not in c["per_task"] else f"{c['per_task'][t]:.0f}" for t in tasks)
        lines.append(f"| {label} | {scores} | {_cell(c)} |")
    return "\n".join(lines)


def _plan(method: str, length: int) -> tuple[str, int]:
    """(S / W, KV in token-layers) of a sweep method on SmolLM2 (30 layers) at `length`."""
    if method == "full":
        return "-", SMOLLM2_LAYERS * length
    options = dict(o.split("=") for o in method.split("@")[1:])
    sink, window = int(options.get("sink", 4)), int(options.get("window", 1020))
    lazy = round(float(options.get("lazy_fraction", 0.5)) * SMOLLM2_LAYERS)
    return f"{sink}/{window}", (SMOLLM2_LAYERS - lazy) * length + lazy * min(sink + window, length)


def sweep_table(got: dict, column: str) -> str:
    length = 8192 if column == "8K" else 4096
    head = ["method", "S / W", "lazy", "KV (token-layers)", *SMOLLM2_TASKS, "average", "95 % interval",
            "− full (paired 95 %)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method, c in got[column].items():
        sw, kv = _plan(method, length)
        name = method.replace(f":{NLL}", ":F").replace(f":{RET}", ":R").replace(f":{IND}", ":I")
        lazy = "0" if c["lazy"] == 0 else f"{c['lazy']} ({round(100 * c['lazy'] / SMOLLM2_LAYERS / 5) * 5} %)"
        p = c["vs_full"]
        paired = "-" if p is None else f"{p['delta']:+.1f} ({p['ci95'][0]:+.0f} to {p['ci95'][1]:+.0f})"
        scores = " | ".join(f"{c['per_task'][t]:.0f}" for t in SMOLLM2_TASKS)
        lines.append(f"| {name} | {sw} | {lazy} | {kv:,} | {scores} | {c['average']:.1f} | "
                     f"{c['ci95'][0]:.0f}-{c['ci95'][1]:.0f} | {paired} |")
    return "\n".join(lines)


def readme_table(smol: dict, qwen: dict) -> str:
    lines = ["| method | SmolLM2 4K | SmolLM2 8K | Qwen 4K | Qwen 8K | Qwen 16K |", "|---|---|---|---|---|---|"]
    qwen_rows = {"**retrieval-aware** (retrieval probe)": "**retrieval-aware** (retrieval probe)",
                 "**loss-guided** (nll probe)": "loss-guided (nll probe)",
                 "loss-guided, greedy (nll-greedy)": "loss-guided, greedy (nll-greedy)",
                 "lighttransfer (the paper's rule)": "lighttransfer", "periodic (every other layer)": "periodic",
                 "full": "full"}
    for row, label in README.items():
        values = [_cell(smol[c].get(label), detail=False) for c in ("4K", "8K")]
        values += [_cell(qwen[c].get(qwen_rows.get(label, "")), detail=False) for c in ("4K", "8K", "16K")]
        lines.append(f"| {row} | {' | '.join(values)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", choices=("readme", "smollm2", "qwen", "sweep", "all"), default="all")
    p.add_argument("--json", action="store_true", help="the cells as JSON")
    args = p.parse_args(argv)
    smol, qwen, sweep = cells(SMOLLM2), cells(QWEN), cells(SWEEP)
    if args.json:
        print(json.dumps({"smollm2": smol, "qwen": qwen, "sweep": sweep}))
        return 0
    parts = {"readme": readme_table(smol, qwen), "smollm2": smollm2_table(smol),
             "qwen": "\n\n".join(qwen_table(qwen, length) for length in qwen),
             "sweep": "\n\n".join(sweep_table(sweep, column) for column in sweep)}
    print("\n\n".join(text for name, text in parts.items() if args.table in (name, "all")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
