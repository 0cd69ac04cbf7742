"""Retrieval-aware selection against every other plan, side by side on the same examples (`lt-jax eval`), then
the tables and the Pareto figure (KV fraction against needle accuracy and perplexity) in results/retrieval/.

    .venv/bin/python scripts/exp_retrieval_aware.py [--model smollm2] [--only niah,passkey,...] [--samples 2]
        [--lengths 2048,4096,8192] [--tag smollm2] [--fractions 0.5,0.25]

Steps (each an `lt-jax` command; every eval is resumable, so a killed run reruns from where it stopped):
1. `lt-jax calibrate` with both probes (skipped when the file is there), `lt-jax identify` plans per fraction;
2. `lt-jax eval` for niah single-key, niah multi-key (4 keys), passkey and decode-mode perplexity. Calibration
   used the unkeyed needle ("The special magic number is N") in essays: none of these formats;
3. the summary tables (markdown) and results/retrieval/pareto-TAG.png.
Methods whose ratios come from w_last = 1 need one more prefill per example, so they run at lengths <= 4096.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "retrieval"
LT = [sys.executable, "-m", "lt_jax.cli"]


def methods(fractions, identify, extra_w1: bool, protect_sweep: bool, layers: int):
    out = ["full", "streaming"]
    for f in fractions:
        at = "" if f == 0.5 else f"@lazy_fraction={f:g}"
        out += [f"lighttransfer{at}", f"retrieval-aware{at}", f"retrieval-aware:induction{at}",
                str(identify[f].relative_to(REPO)),
                f"first{at}", f"last{at}", *(f"random:{s}{at}" for s in range(3))]
        if extra_w1:
            out += [f"lighttransfer{at}@w_last=1", f"retrieval-aware{at}@w_last=1"]
        if protect_sweep and f == 0.5:
            full = layers - int(np.floor(0.5 * layers + 0.5))
            out += [f"retrieval-aware@protect={k}" for k in (2, 4, 9, 12, 15) if k <= full]
    return out


def run(cmd):
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=REPO)


def kv_fraction(method: str, lazy_layers, length: int, layers: int, sink=4, window=1020) -> float:
    lazy = len(lazy_layers)
    return ((layers - lazy) * length + lazy * min(length, sink + window)) / (layers * length)


def load_rows(tag: str) -> dict:
    """task -> rows, over every result file of this tag (a task's lengths may span two files)."""
    out = {}
    for f in sorted(OUT.glob(f"*-{tag}*.jsonl")):
        task = f.name.split("-")[0]
        if task == "query":  # scripts/exp_query_sets.py's rows
            continue
        out.setdefault(task, []).extend(json.loads(line) for line in f.read_text().splitlines())
    return out


def label(method: str) -> str:
    """identify plan files by their fraction: `identify@0.5`."""
    if method.endswith(".json"):
        return "identify@" + Path(method).stem.rsplit("-", 1)[-1]
    return method


def value(task: str, rows) -> float:
    if task.startswith("ppl"):
        return float(np.exp(sum(r["nll_sum"] for r in rows) / sum(r["tokens"] for r in rows)))
    return 100 * float(np.mean([r["score"] for r in rows]))


def condensed(by_task: dict, layers: int) -> list[str]:
    """One row per method, one column per task: the average over lengths (needles) or the perplexity, and the KV
    fraction at the longest needle length; methods missing a task or a length are left out."""
    tasks_ = [t for t in ("niah", "multikey", "passkey", "ppl2048", "ppl4096") if t in by_task]
    longest = max(r["cell"]["length"] for t in tasks_ if not t.startswith("ppl") for r in by_task[t])
    head = " | ".join(f"{t} {'ppl' if t.startswith('ppl') else 'avg %'}" for t in tasks_)
    out = ["### all tasks", "", f"| method | {head} | KV % at {longest} |", "|---" * (len(tasks_) + 2) + "|"]
    for m in dict.fromkeys(r["method"] for r in by_task[tasks_[0]]):
        cells, kv = [], None
        for t in tasks_:
            rows = by_task[t]
            want = {r["cell"].get("length", r["cell"].get("prefix")) for r in rows if r["method"] == "full"}
            mine = [r for r in rows if r["method"] == m]
            if {r["cell"].get("length", r["cell"].get("prefix")) for r in mine} != want:
                break
            if t.startswith("ppl"):
                cells.append(f"{value(t, mine):.3f}")
            else:
                per = [value(t, [r for r in mine if r["cell"]["length"] == n]) for n in sorted(want)]
                cells.append(f"{np.mean(per):.1f}")
                kv = kv or 100 * kv_fraction(m, next(r for r in mine if r["cell"]["length"] == longest)[
                    "lazy_layers"], longest, layers)
        else:
            out.append(f"| {label(m)} | " + " | ".join(cells) + f" | {kv:.0f} |")
    return out + [""]


def report(tag: str, layers: int):
    """Markdown tables (one per task: columns per length, the average, the mean KV fraction) and the Pareto
    figure: KV fraction (mean over each method's rows) against the mean needle accuracy and the perplexity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_task = load_rows(tag)
    lines, points, partial = [], {}, set()
    for task, rows in by_task.items():
        methods = list(dict.fromkeys(r["method"] for r in rows))
        cols = sorted({r["cell"].get("length", r["cell"].get("prefix")) for r in rows})
        lines += [f"### {task} ({tag})", "", "| method | " + " | ".join(map(str, cols)) + " | average | KV % | n |",
                  "|---" * (len(cols) + 4) + "|"]
        for m in methods:
            mine = [r for r in rows if r["method"] == m]
            cells = {c: value(task, [r for r in mine if r["cell"].get("length", r["cell"].get("prefix")) == c])
                     for c in cols if any(r["cell"].get("length", r["cell"].get("prefix")) == c for r in mine)}
            kv = float(np.mean([kv_fraction(m, r["lazy_layers"], r["cell"].get("length") or
                                            r["cell"]["prefix"] + 512, layers) for r in mine]))
            avg = float(np.mean(list(cells.values())))
            fmt = "{:.3f}" if task.startswith("ppl") else "{:.0f}"
            lines.append(f"| {label(m)} | " + " | ".join(fmt.format(cells[c]) if c in cells else "-" for c in cols)
                         + f" | {fmt.format(avg)} | {100 * kv:.0f} | {len(mine)} |")
            points.setdefault("ppl" if task.startswith("ppl") else "needle", {}).setdefault(m, []).append((kv, avg))
            if len(cells) < len(cols):
                partial.add(m)
        lines.append("")
    lines += condensed(by_task, layers)
    (OUT / f"summary-{tag}.md").write_text("\n".join(lines))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), dpi=120)
    for ax, kind in zip(axes, ("needle", "ppl")):
        tasks_here = max((len(v) for v in points.get(kind, {}).values()), default=0)
        for m, pts in points.get(kind, {}).items():
            if len(pts) < tasks_here or m in partial:  # a point must average the same tasks and lengths as full's
                continue
            x, y = np.mean([p[0] for p in pts]), np.mean([p[1] for p in pts])
            color = ("tab:red" if m.startswith("retrieval-aware") else "tab:blue" if m.startswith("lighttransfer")
                     else "black" if m in ("full", "streaming") else "0.55")
            ax.scatter(x, y, color=color, s=22)
            short = label(m).replace("@lazy_fraction=", "@").replace("retrieval-aware", "RA")
            ax.annotate(short, (x, y), fontsize=5.5, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel("KV cache fraction of full (mean over the examples)")
        ax.set_ylabel("needle accuracy %, mean over tasks" if kind == "needle" else "decode-mode perplexity")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{tag}: red retrieval-aware (RA), blue lighttransfer, grey fixed plans, black full/streaming",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / f"pareto-{tag}.png")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tag", default="smollm2")
    p.add_argument("--only", default="niah,multikey,passkey,ppl")
    p.add_argument("--lengths", default="2048,4096,8192")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--fractions", default="0.5,0.25")
    p.add_argument("--ppl-prefixes", default="2048,4096")
    p.add_argument("--cal-lengths", default="2048,4096", help="retrieval probe prompt lengths")
    p.add_argument("--report-only", action="store_true", help="only the tables and the figure")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    fractions = [float(f) for f in args.fractions.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    essays = sorted((REPO / ".assets" / "essays").glob("*.txt"))
    from lt_jax import assets
    from lt_jax.calibration import default_path
    path = assets.resolve_model(args.model)
    layers = json.loads((path / "lt_config.json").read_text())["num_layers"] if (path / "lt_config.json").exists() \
        else None
    tasks = [t for t in args.only.split(",") if t]
    if not args.report_only:
        for probe in ("retrieval", "induction"):
            if not default_path(path, probe).exists():
                run(LT + ["calibrate", args.model, "--probe", probe, "--lengths", args.cal_lengths,
                          "--plot", OUT / f"calibration-{probe}-{args.tag}.png"])
    identify = {}
    for f in fractions:
        identify[f] = OUT / f"identify-{args.tag}-{f:g}.json"
        if not identify[f].exists() and not args.report_only:
            run(LT + ["identify", args.model, *essays[-9:], "--context", "2048", "--max-samples", "8",
                      "--lazy-fraction", f, "--out", identify[f]])
    short = [n for n in lengths if n <= 4096]
    long_ = [n for n in lengths if n > 4096]
    for task in tasks if not args.report_only else []:
        base = LT + ["eval", args.model, "--json"]
        if task == "ppl":
            for prefix in args.ppl_prefixes.split(","):
                out = OUT / f"ppl{prefix}-{args.tag}.jsonl"
                run(base + ["--task", "ppl", "--prefix", prefix, "--samples", "3", "--out", out, "--methods",
                            ",".join(methods(fractions, identify, False, True, layers))])
            continue
        flags = {"niah": ["--task", "niah", "--max-new-tokens", "12"],
                 "multikey": ["--task", "niah", "--keys", "4", "--max-new-tokens", "12"],
                 "passkey": ["--task", "passkey", "--max-new-tokens", "8"]}[task]
        for group, extra in ((short, True), (long_, False)):
            if not group:
                continue
            out = OUT / f"{task}-{args.tag}-{'-'.join(map(str, group))}.jsonl"
            run(base + flags + ["--lengths", ",".join(map(str, group)), "--samples", str(args.samples),
                                "--out", out, "--methods",
                                ",".join(methods(fractions, identify, extra, True, layers))])
    report(args.tag, layers)


if __name__ == "__main__":
    main()
