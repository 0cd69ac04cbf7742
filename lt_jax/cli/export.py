"""`lt-jax export CKPT_DIR HF_OUT_DIR`: an lt-jax checkpoint -> a Hugging Face safetensors directory."""
from __future__ import annotations

from lt_jax.cli.flags import output

NAME = "export"
HELP = "export an lt-jax checkpoint back to an HF safetensors directory"


def add_arguments(s):
    s.add_argument("ckpt_dir", help="an lt-jax checkpoint directory")
    output(s, "hf_out_dir", kind="folder", help="the Hugging Face directory to create (must not exist)")


def run(args) -> dict:
    from checkpoints_conv import export
    from lt_jax.files import new_dir
    new_dir(args.hf_out_dir)  # before the checkpoint is read
    cfg = export(args.ckpt_dir, args.hf_out_dir)
    return {"out": args.hf_out_dir, "model_type": cfg.arch, "layers": cfg.num_layers}
