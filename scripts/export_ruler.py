"""The exact RULER prompts `lt-jax eval --task ruler:TASKS` evaluates, written out for another runtime (the kvpress
peers of scripts/kvpress_peers.py): one JSONL line per example, in lt-jax eval's order, with the prompt's token ids
(chat template and answer prefix included, as the model sees them), its answer budget and RULER's answers. The
examples come from `evaluate.Ruler.examples` on the loaded model, the very call `lt-jax eval` makes, so the ids are
those lt-jax prefilled; the settings (and the same defaults as `lt-jax eval`) go to OUT.meta.json.

    LT_JAX_ASSETS=... .venv/bin/python scripts/export_ruler.py $LT_JAX_ASSETS/lt/smollm2-135m-instruct \\
        --tasks niah_single_1,niah_single_2,niah_multikey_1,vt,cwe,fwe --lengths 4096 --samples 3 \\
        --out results/peers/smollm2-4k.prompts.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lt_jax
from lt_jax import assets
from lt_jax.errors import LtJaxError
from lt_jax.eval import evaluate, ruler
from lt_jax.files import read_text, write_atomic


def ruler_task(tasks: list[str], lengths: list[int], samples: int, seed: int = 0, max_new_tokens: int | None = None,
               haystack: list[Path] | None = None) -> evaluate.Ruler:
    """The task `lt-jax eval --task ruler:TASKS` builds from these flags (`lt_jax.cli.eval._task`)."""
    files = haystack or sorted(Path(assets.essays()).glob("*.txt"))
    return evaluate.Ruler(tasks, lengths, samples, seed, max_new_tokens, [read_text(f) for f in files])


def prompt_lines(model, task: evaluate.Ruler) -> list[dict]:
    """One dict per example of `task` on `model`: id, cell, prompt ids, answer budget, answers."""
    return [{"example": e.id, "cell": e.cell, "ids": list(map(int, e.ids)), "max_new_tokens": e.max_new_tokens,
             "target": e.target} for e in task.examples(model)]


def write(out: Path, lines: list[dict], settings: dict):
    """OUT (every line, renamed into place) and OUT.meta.json, the settings (written after: a sidecar means the
    prompts are whole)."""
    write_atomic(out, "".join(json.dumps(line) + "\n" for line in lines))
    write_atomic(out.with_name(out.name + ".meta.json"),
                 json.dumps({"written_by": "scripts/export_ruler.py", "settings": settings}, indent=1) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", help="the model lt-jax evaluates (checkpoint, HF directory or asset name)")
    p.add_argument("--tasks", default=",".join(ruler.TASKS), help="comma-separated RULER task names (default: all)")
    p.add_argument("--lengths", default="4096")
    p.add_argument("--samples", type=int, default=5, help="prompts per (task, length); lt-jax eval's default: 5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: RULER's per task")
    p.add_argument("--haystack", nargs="+", type=Path, default=None, help="text files (default: the essays)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        print(f"export_ruler: --lengths must be comma-separated integers; got {args.lengths!r}.", file=sys.stderr)
        return 2
    try:
        task = ruler_task(args.tasks.split(","), lengths, args.samples, args.seed, args.max_new_tokens, args.haystack)
        model = lt_jax.load(args.model)
        lines = prompt_lines(model, task)
    except LtJaxError as e:
        print(f"export_ruler: {e}", file=sys.stderr)
        return 2
    write(args.out, lines, {"model": model.label, "path": str(args.model), **task.settings,
                            "haystack": [str(f) for f in args.haystack or []]})
    print(json.dumps({"out": str(args.out), "examples": len(lines)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
