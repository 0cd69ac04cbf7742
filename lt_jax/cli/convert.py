"""`lt-jax convert HF_DIR OUT_DIR`: a Hugging Face checkpoint -> an lt-jax checkpoint."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from lt_jax.cli.flags import output

NAME = "convert"
HELP = "convert an HF checkpoint directory (safetensors or .bin, sharded or not)"


def add_arguments(s):
    s.add_argument("hf_dir", help="a Hugging Face model directory (config.json + weights)")
    output(s, "out_dir", kind="folder", help="the lt-jax checkpoint directory to create (must not exist)")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the converted weights (default float32)")


def run(args) -> dict:
    from tqdm import tqdm

    from checkpoints_conv import convert, read_hf_config
    from checkpoints_conv.hf import entries
    from lt_jax.files import new_dir
    new_dir(args.out_dir)
    cfg = read_hf_config(Path(args.hf_dir), args.dtype)
    t0 = time.perf_counter()
    with tqdm(total=len(entries(cfg)), desc="converting", file=sys.stderr, leave=False, unit="tensor") as bar:
        convert(args.hf_dir, args.out_dir, args.dtype, progress=lambda _name: bar.update(1))
    return {"out": args.out_dir, "model_type": cfg.arch, "layers": cfg.num_layers, "dtype": cfg.dtype,
            "seconds": round(time.perf_counter() - t0, 2)}
