"""Host memory of loading a checkpoint unsharded vs straight into its shards, side by side in one run.

Each load runs in a fresh process (peak RSS is per process) with simulated CPU devices, and reports its peak
resident memory above what the process held before the load (imports, JAX's runtime), next to the bytes the
weights occupy:
- unsharded: `lt_jax.load(ckpt)` on one device (orbax restores host arrays, then they are placed);
- 4-way, default rules: `lt_jax.load(ckpt, mesh="model=4")` on 4 devices; SmolLM2's attention (3 KV heads)
  stays replicated by the rules, so the 4 simulated devices, all in this host's memory, hold more than one copy;
- 4-way, everything split: the same with rules that split `embed` too, so the shards add up to one copy;
- two processes, model=8 across both (4 devices each): each process restores only the shards it addresses, what a
  host of a pod does (a mesh `lt_jax.load` refuses for inference, since `model` must stay within a host; the
  restore itself is `checkpoints_conv.load_checkpoint` with target shardings).

    python scripts/bench_sharding.py [--model smollm2] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys
def rss(field):  # VmHWM: the peak; VmRSS: now
    return int([l for l in open('/proc/self/status') if l.startswith(field)][0].split()[1]) * 1024
mode, path = sys.argv[1], sys.argv[2]
import jax, numpy as np
if mode == "two-process":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[3], 2, int(sys.argv[4]))
import lt_jax
from lt_jax import sharding
from checkpoints_conv import load_checkpoint
jax.devices(); jax.numpy.zeros(1).block_until_ready()
before = rss("VmRSS")
if mode == "unsharded":
    model = lt_jax.load(path); arrays = jax.tree.leaves(model.params)
elif mode == "two-process":
    mesh = sharding.make_mesh("model=8")
    rules = (("vocab", "model"), ("ffn", "model"), ("embed", "model"))
    _, params = load_checkpoint(path, lambda cfg: sharding.param_shardings(cfg, mesh, rules))
    arrays = jax.tree.leaves(params)
else:
    rules = None if mode == "default-rules" else (("vocab", "model"), ("ffn", "model"), ("embed", "model"))
    model = lt_jax.load(path, mesh="model=4", rules=rules); arrays = jax.tree.leaves(model.params)
held = sum(s.data.nbytes for a in arrays for s in a.addressable_shards)
total = sum(a.nbytes for a in arrays)
print(json.dumps({"mode": mode, "peak_above_start": rss("VmHWM") - before, "held_bytes": held,
                  "model_bytes": total, "process": jax.process_index()}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def measure(path: str, mode: str) -> list[dict]:
    if mode == "two-process":
        port = str(_free_port())
        procs = [subprocess.Popen([sys.executable, "-c", CHILD, mode, path, f"localhost:{port}", str(i)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(4))
                 for i in range(2)]
        outs = [p.communicate(timeout=900) for p in procs]
        for p, (_, err) in zip(procs, outs):
            if p.returncode:
                raise SystemExit(f"{mode} failed: {err[-2000:]}")
        # the last JSON line: gloo (the CPU collectives) prints lines of its own on stdout
        return [json.loads([line for line in o.splitlines() if line.startswith("{")][-1]) for o, _ in outs]
    run = subprocess.run([sys.executable, "-c", CHILD, mode, path], capture_output=True, text=True,
                         env=_env(1 if mode == "unsharded" else 4), timeout=900)
    if run.returncode:
        raise SystemExit(f"{mode} failed: {run.stderr[-2000:]}")
    return [json.loads(run.stdout.strip().splitlines()[-1])]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="an lt-jax checkpoint or asset name (default smollm2)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from lt_jax import assets
    path = str(assets.resolve_model(args.model))
    rows = [r for mode in ("unsharded", "default-rules", "all-split", "two-process") for r in measure(path, mode)]
    base = rows[0]["peak_above_start"]
    for r in rows:
        r["peak_vs_unsharded"] = round(r["peak_above_start"] / base, 3)
    if args.json:
        print(json.dumps({"model": assets.label(path), "rows": rows}))
        return 0
    mib = 2 ** 20
    print(f"model {assets.label(path)}: {rows[0]['model_bytes'] / mib:.0f} MiB of weights")
    print("| load | process | peak RSS above start (MiB) | held on its devices (MiB) | peak vs unsharded |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['process']} | {r['peak_above_start'] / mib:.0f} | {r['held_bytes'] / mib:.0f} | "
              f"{r['peak_vs_unsharded']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
