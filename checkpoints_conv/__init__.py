"""Hugging Face / torch checkpoints <-> lt_jax params."""
from checkpoints_conv.hf import read_hf_config, read_hf_params, write_hf_dir
from checkpoints_conv.store import (convert, default_plan_json, export, is_checkpoint, load_checkpoint,
                                   save_checkpoint, write_model_files)

__all__ = ["convert", "default_plan_json", "export", "is_checkpoint", "load_checkpoint", "read_hf_config",
           "read_hf_params", "save_checkpoint", "write_hf_dir", "write_model_files"]
