#!/usr/bin/env python
"""`lt-jax compile`'s per-device plan for an NVIDIA H100, on a host without a GPU (docs/gpu.md): XLA's GPU compiler
from jax's CUDA plugin, given a target description of the card instead of a card.

Needs the plugin at the project's jax version, not CUDA itself nor a GPU:
    pip install --target /tmp/cudaplug --no-deps "jax-cuda12-plugin==0.10.2" "jax-cuda12-pjrt==0.10.2"
    PYTHONPATH=/tmp/cudaplug JAX_PLATFORMS=cpu python scripts/gpu_aot.py configs/Llama-3.1-8B-Instruct \
        --plans full,lighttransfer --batch 4 --context 8192
JAX_PLATFORMS=cpu keeps the local backend on the CPU; the plugin still builds the topology. Every program of
`lt_jax.aot.programs` is compiled for one H100 and reported as `lt-jax compile` reports a TPU chip (per device;
compiled, not run; no cost analysis: the roofline needs the TPU report's unrolled variants).

Usage: scripts/gpu_aot.py CONFIG [--plans full,lighttransfer] [--batch 4] [--context 8192] [--dtype bfloat16]
       [--no-train] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The card as XLA's GPU compiler sees it (xla.stream_executor.GpuTargetConfigProto, text format): the values an H100
# SXM reports (jax-ml/jax#28376 uses the same description).
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def h100_target():
    """An `lt_jax.aot.Target` of one H100: peaks from NVIDIA's H100 SXM datasheet (dense bf16 989 TFLOP/s, HBM3
    3.35 TB/s, 80 GB)."""
    from jax.experimental import topologies

    from lt_jax import aot, sharding
    from lt_jax.errors import LtJaxError
    try:
        devices = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=H100_TARGET).devices
    except Exception as e:  # noqa: BLE001 (plugin absent or refusing: one sentence)
        raise LtJaxError(f"no CUDA topology description ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"install jax's CUDA plugin at jax's version (docs/gpu.md).") from None
    chip = aot.Chip("h100", 989e12, 3.35e12, 80 * 10**9)
    return aot.Target("h100:1x1x1", chip, sharding.make_mesh("model=1", devices))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="an HF config.json or a directory holding one")
    p.add_argument("--plans", default="full,lighttransfer", help="comma list (default full,lighttransfer)")
    p.add_argument("--batch", type=int, default=4, help="decode batch (default 4)")
    p.add_argument("--context", type=int, default=8192, help="tokens of context (default 8192)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="default bfloat16")
    p.add_argument("--no-train", action="store_true", help="skip the training step")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args(argv)
    from lt_jax import aot
    from lt_jax.cli.compile import read_config
    from lt_jax.plan import make_plan
    cfg, tgt = read_config(args.config, args.dtype), h100_target()
    rows = []
    for spec in args.plans.split(","):
        plan = make_plan(spec, cfg, 0.5)
        kv = aot.kv_cache_bytes(cfg, plan, args.batch, args.context, tgt.mesh)
        for program in aot.programs(plan, spec, args.batch, args.context, train=not args.no_train):
            row = aot.compile_row(program, cfg, tgt, cost=False)
            row["kv_cache"] = kv if program.name in ("generate_loop", "decode_chunk", "insert_rows") else None
            rows.append(row)
            if not args.json:
                print(f"{row['program']:24} {spec:14} weights {row['weights'] / 2**30:6.2f} GiB  temp "
                      f"{row['temporaries'] / 2**30:6.2f}  total {row['total'] / 2**30:6.2f}  fits {row['fits']}  "
                      f"compile {row['compile_s']:6.1f} s", flush=True)
    if args.json:
        print(json.dumps({"config": args.config, "target": tgt.topology, "dtype": args.dtype, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
