"""Our checkpoint directory: `lt_config.json` + `params/` (orbax) + the tokenizer files; and the atomic output
directory that convert and export write into (`lt_jax.files.atomic_dir`: a failure leaves nothing at the
destination)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np

from checkpoints_conv.hf import copy_tokenizer, read_hf_config, read_hf_params, write_hf_dir
from lt_jax.config import Config
from lt_jax.errors import LtJaxError
from lt_jax.files import atomic_dir, new_dir, write_atomic
from lt_jax.params import LEGACY_LAYER_LEAVES, abstract_params, from_legacy

CONFIG_FILE = "lt_config.json"
PLAN_FILE = "plan.json"  # the default plan of a trained hybrid (`lt-jax train`); absent: every layer full
HF_PLAN_KEY = "lt_jax_plan"  # the same plan inside an exported config.json


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).exists()


def save_checkpoint(out: Path, cfg: Config, params, tokenizer_dir: Path | None = None, plan_json: str | None = None):
    with atomic_dir(out) as tmp:
        write_model_files(tmp, cfg, params, tokenizer_dir, plan_json)


def write_model_files(dest: Path, cfg: Config, params, tokenizer_dir: Path | None = None,
                      plan_json: str | None = None):
    """params/, the tokenizer, plan.json (a default plan, if any), and lt_config.json last: a directory is a
    checkpoint (`is_checkpoint`) only once everything else is in place."""
    import orbax.checkpoint as ocp
    dest = Path(dest)
    shutil.rmtree(dest / "params", ignore_errors=True)  # a write killed before lt_config.json
    # Uncompressed (weights barely compress; zstd buffers cost ~0.6 of a model copy) and at most 1 GB in
    # flight, so saving adds well under one copy of the model to the params already in memory.
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, save_device_host_concurrent_gb=1,
                                          use_compression=False)
    ocp.Checkpointer(handler).save((dest / "params").absolute(), params)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, dest)
    if plan_json is not None:
        write_atomic(dest / PLAN_FILE, plan_json)
    write_atomic(dest / CONFIG_FILE, cfg.to_json())


def default_plan_json(path: Path) -> str | None:
    """The default plan stored with a checkpoint (plan.json) or an exported HF dir (config.json's lt_jax_plan)."""
    path = Path(path)
    if (path / PLAN_FILE).exists():
        return (path / PLAN_FILE).read_text()
    try:
        plan = json.loads((path / "config.json").read_text()).get(HF_PLAN_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return None if plan is None else json.dumps(plan)


def load_checkpoint(path: Path, shardings=None) -> tuple[Config, dict]:
    """(config, params) of a converted checkpoint, shapes checked against the config: numpy arrays, or with
    `shardings` (a function of the config -> a NamedSharding per stacked leaf) jax arrays restored straight into
    their shards (each process reads only the shards it addresses; no host copy of the whole model)."""
    import orbax.checkpoint as ocp
    path = Path(path)
    try:
        cfg = Config.from_json(path / CONFIG_FILE)
    except FileNotFoundError:
        raise LtJaxError(f"{path} is not an lt-jax checkpoint (no {CONFIG_FILE}).") from None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise LtJaxError(f"cannot read {path / CONFIG_FILE}: {e}.") from None
    try:
        params = None
        if shardings is not None:
            params = _restore_sharded(path / "params", cfg, shardings(cfg))
        if params is None:
            params = ocp.PyTreeCheckpointer().restore((path / "params").absolute())
    except Exception as e:  # orbax raises many kinds for missing/corrupt files
        raise LtJaxError(f"cannot restore params from {path / 'params'}: {e}.") from None
    if isinstance(params, dict) and LEGACY_LAYER_LEAVES <= set(params.get("layers") or ()):
        params = from_legacy(params, cfg)  # written by lt-jax 0.1 (unfused, [in, out]): fused at read time
    want = abstract_params(cfg)
    got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.dtype(a.dtype)), params)
    if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
        raise LtJaxError(f"params in {path / 'params'} do not match {path / CONFIG_FILE}.")
    return cfg, params


def _restore_sharded(params_dir: Path, cfg: Config, shardings):
    """Restore into the target shardings, or None when the stored tree is not this layout (a 0.1 checkpoint, which
    is read whole and converted)."""
    import orbax.checkpoint as ocp
    want = abstract_params(cfg)
    # One leaf in flight at a time (orbax's default reads every leaf at once: a second copy of the model)
    largest = max(a.size * a.dtype.itemsize for a in jax.tree.leaves(want))
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(restore_concurrent_gb=(largest + 2**20) / 1e9))
    stored = checkpointer.metadata(params_dir.absolute())
    stored = getattr(stored, "item_metadata", stored)
    stored = getattr(stored, "tree", stored)
    if jax.tree.structure(jax.tree.map(lambda _: 0, dict(stored))) != jax.tree.structure(want):
        return None
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), want, shardings)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    return checkpointer.restore(params_dir.absolute(), args=ocp.args.PyTreeRestore(item=target,
                                                                                   restore_args=restore_args))


def convert(hf_dir: Path, out: Path, dtype: str = "float32", progress=None) -> Config:
    """HF checkpoint directory -> our checkpoint directory (atomic)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise LtJaxError(f"{hf_dir} is not a directory.")
    cfg = read_hf_config(hf_dir, dtype)
    new_dir(out)  # fail before the slow part
    params = read_hf_params(hf_dir, cfg, progress)
    save_checkpoint(out, cfg, params, tokenizer_dir=hf_dir)
    return cfg


def export(ckpt: Path, out: Path, max_shard_bytes: int = 2 << 30) -> Config:
    """Our checkpoint -> an HF safetensors directory that transformers loads."""
    cfg, params = load_checkpoint(ckpt)
    plan = default_plan_json(ckpt)
    with atomic_dir(out) as tmp:
        write_hf_dir(tmp, cfg, params, max_shard_bytes)
        if plan is not None:  # transformers keeps unknown config keys: the plan travels with the weights
            hf = json.loads((tmp / "config.json").read_text())
            (tmp / "config.json").write_text(json.dumps({**hf, HF_PLAN_KEY: json.loads(plan)}, indent=2))
        copy_tokenizer(ckpt, tmp)
    return cfg
