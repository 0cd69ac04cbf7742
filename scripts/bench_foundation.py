#!/usr/bin/env python
"""Foundation benchmark, measured side by side in one run on SmolLM2-135M-Instruct (fp32, this machine):

1. Conversion of a multi-shard safetensors checkpoint: wall time and peak host RSS of the converting process,
   against the checkpoint's size on disk and against the RSS of a process that only imports the same modules.
2. Forward pass (logits for one sequence, no cache) of our jitted decoder versus transformers' torch model at
   512 and 2048 tokens: median of --repeats runs after one warm-up (our compile time reported apart).

Usage: python scripts/bench_foundation.py [--shard-mb 100] [--lengths 512,2048] [--repeats 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEASURE_CHILD = r"""
def peak_rss():  # VmHWM: ru_maxrss survives exec on Linux and would report the parent's peak
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024
import json, sys, time
import checkpoints_conv, orbax.checkpoint, lt_jax  # the same imports in both runs
t0 = time.perf_counter()
if sys.argv[1] == "convert":
    checkpoints_conv.convert(sys.argv[2], sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss_bytes": peak_rss()}))
"""


def _child(*argv) -> dict:
    run = subprocess.run([sys.executable, "-c", MEASURE_CHILD, *argv], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def bench_conversion(hf_dir: Path, shard_mb: int, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    sharded = work / "sharded"
    AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).save_pretrained(
        sharded, max_shard_size=f"{shard_mb}MB")
    for f in hf_dir.glob("tokenizer*"):
        shutil.copy2(f, sharded / f.name)
    shards = sorted(sharded.glob("*.safetensors"))
    disk = sum(f.stat().st_size for f in shards)
    baseline = _child("baseline")
    conv = _child("convert", str(sharded), str(work / "converted"))
    extra = conv["peak_rss_bytes"] - baseline["peak_rss_bytes"]
    return {"shards": len(shards), "largest_shard_bytes": max(f.stat().st_size for f in shards),
            "disk_bytes": disk, "seconds": round(conv["seconds"], 2),
            "peak_rss_bytes": conv["peak_rss_bytes"], "import_only_rss_bytes": baseline["peak_rss_bytes"],
            "conversion_rss_bytes": extra, "conversion_rss_over_disk": round(extra / disk, 3)}


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_forward(ckpt: Path, hf_dir: Path, lengths: list[int], repeats: int) -> list[dict]:
    import jax
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    import lt_jax
    from lt_jax.model import default_positions, forward
    ours = lt_jax.load(ckpt)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()  # default (sdpa) attention
    rows = []
    for T in lengths:
        ids = np.random.default_rng(T).integers(0, ours.config.vocab_size, (1, T)).astype(np.int32)
        tokens, pos = jax.numpy.asarray(ids), default_positions(ids)
        t0 = time.perf_counter()
        forward(ours.params, tokens, pos, ours.config).block_until_ready()
        compile_s = time.perf_counter() - t0
        jax_s = _median_time(lambda: forward(ours.params, tokens, pos, ours.config).block_until_ready(), repeats)
        x = torch.from_numpy(ids).long()
        with torch.no_grad():
            ref(x)  # warm-up
            torch_s = _median_time(lambda: ref(x), repeats)
        rows.append({"tokens": T, "lt_jax_s": round(jax_s, 3), "transformers_s": round(torch_s, 3),
                     "speedup": round(torch_s / jax_s, 2), "lt_jax_first_call_s": round(compile_s, 2)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shard-mb", type=int, default=100)
    p.add_argument("--lengths", default="512,2048")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from lt_jax import assets
    hf_dir, ckpt = assets.hf_dir(assets.SMOLLM2), assets.checkpoint(assets.SMOLLM2)
    with tempfile.TemporaryDirectory() as work:
        conversion = bench_conversion(hf_dir, args.shard_mb, Path(work))
    forward_rows = bench_forward(ckpt, hf_dir, [int(x) for x in args.lengths.split(",")], args.repeats)
    result = {"model": assets.SMOLLM2.name, "conversion": conversion, "forward": forward_rows}
    if args.json:
        print(json.dumps(result))
        return 0
    mb = 1 / 2**20
    c = conversion
    print(f"conversion of {c['shards']} shards ({c['disk_bytes'] * mb:.0f} MiB on disk, largest shard "
          f"{c['largest_shard_bytes'] * mb:.0f} MiB): {c['seconds']} s, peak RSS {c['peak_rss_bytes'] * mb:.0f} MiB "
          f"= {c['import_only_rss_bytes'] * mb:.0f} MiB imports + {c['conversion_rss_bytes'] * mb:.0f} MiB "
          f"({c['conversion_rss_over_disk']}x the checkpoint size)")
    print("\n| tokens | lt-jax forward (s) | transformers forward (s) | speed-up | lt-jax first call (s) |")
    print("|---|---|---|---|---|")
    for r in forward_rows:
        print(f"| {r['tokens']} | {r['lt_jax_s']} | {r['transformers_s']} | {r['speedup']}x | "
              f"{r['lt_jax_first_call_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
