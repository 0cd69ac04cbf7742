"""Hugging Face checkpoints <-> lt_jax params, as one declarative table applied tensor by tensor.

Reading fills preallocated host buffers (`lt_jax.params.empty_params`) one tensor at a time from one shard at a
time, so host memory stays near one copy of the output plus one shard. Every leaf must be filled exactly once.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from checkpoints_conv.safetensors_io import SafetensorsFile, write_safetensors
from lt_jax.config import Config
from lt_jax.errors import LtJaxError
from lt_jax.params import empty_params, from_out_in, out_in, param_specs

# HF name -> our path, and n_in: how many leading axes of our array form the HF Linear's *input* dim
# (HF stores Linear weights as [out, in]; we store [in..., out...] so einsums read like shapes).
# n_in None: same layout; 0: a bias, flattened in HF.
TABLE = [
    ("model.embed_tokens.weight", ("embed",), None),
    ("model.norm.weight", ("final_norm",), None),
    ("lm_head.weight", ("lm_head",), None),
    ("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm"), None),
    ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "q"), 1),
    ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "k"), 1),
    ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "v"), 1),
    ("model.layers.{i}.self_attn.q_proj.bias", ("layers", "q_bias"), 0),
    ("model.layers.{i}.self_attn.k_proj.bias", ("layers", "k_bias"), 0),
    ("model.layers.{i}.self_attn.v_proj.bias", ("layers", "v_bias"), 0),
    ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "o"), 2),
    ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "mlp_norm"), None),
    ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "gate"), 1),
    ("model.layers.{i}.mlp.up_proj.weight", ("layers", "up"), 1),
    ("model.layers.{i}.mlp.down_proj.weight", ("layers", "down"), 1),
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def _hf_shape(shape: tuple[int, ...], n_in: int | None) -> tuple[int, ...]:
    if n_in is None:
        return shape
    if n_in == 0:
        return (math.prod(shape),)
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _to_ours(w: np.ndarray, shape, n_in):
    return w.reshape(shape) if n_in is None else from_out_in(w, shape)


def _to_hf(a: np.ndarray, n_in):
    return a if n_in is None else out_in(a, n_in)


def entries(cfg: Config) -> dict[str, tuple[tuple[str, ...], int | None, int | None]]:
    """HF name -> (our path, layer index or None, n_in), for the leaves this config has."""
    specs = param_specs(cfg)
    out = {}
    for name, path, n_in in TABLE:
        group = specs.get(path[0]) if len(path) == 2 else specs
        if group is None or path[-1] not in group:
            continue
        layers = range(cfg.num_layers) if "{i}" in name else [None]
        for i in layers:
            out[name.format(i=i)] = (path, i, n_in)
    return out


def _leaf(tree, path):
    for p in path:
        tree = tree[p]
    return tree


# ---- reading ---------------------------------------------------------------------------------------------

def read_hf_config(hf_dir: Path, dtype: str = "float32") -> Config:
    path = Path(hf_dir) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise LtJaxError(f"{hf_dir} has no config.json; is it a Hugging Face model directory?") from None
    except (OSError, ValueError) as e:
        raise LtJaxError(f"cannot read {path}: {e}.") from None
    return Config.from_hf(hf, source=str(path), dtype=dtype)


def _shard_files(hf_dir: Path) -> list[Path]:
    """The weight files in load order, checking that every shard an index names exists."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = hf_dir / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise LtJaxError(f"cannot read shard index {index}: {e}.") from None
            files = [hf_dir / f for f in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.exists():
                    raise LtJaxError(f"shard {f.name} listed in {index} is missing from {hf_dir}.")
            return files
        if (hf_dir / single).exists():
            return [hf_dir / single]
    raise LtJaxError(f"no weights in {hf_dir}: expected model.safetensors, pytorch_model.bin, or a sharded index.")


def _tensors(path: Path) -> Iterator[tuple[str, tuple, callable]]:
    """(name, shape, load) for each tensor of one shard; `load()` reads just that tensor as numpy."""
    if path.suffix == ".safetensors":
        f = SafetensorsFile(path)
        for name in f.names():
            yield name, f.shape(name), (lambda n=name: f.get(n))
        return
    try:
        import torch
    except ImportError:
        raise LtJaxError(f"reading {path} needs torch: pip install torch==2.13.0.") from None
    try:
        try:  # mmap keeps one shard's pages, not a copy; files in torch's legacy (pre-zip) format cannot map
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds, with long multi-line texts, for a corrupt pickle/zip
        raise LtJaxError(f"cannot read torch checkpoint {path}: it is corrupt or not a torch.save file of "
                         f"tensors ({type(e).__name__}).") from None
    for name, t in state.items():
        yield name, tuple(t.shape), (lambda t=t: t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy())


def read_hf_params(hf_dir: Path, cfg: Config, progress=None) -> dict:
    """Numpy params for `cfg`, filled tensor by tensor from the checkpoint's shards."""
    hf_dir = Path(hf_dir)
    files = _shard_files(hf_dir)
    params = empty_params(cfg)
    wanted = entries(cfg)
    filled = set()
    for path in files:
        for name, shape, load in _tensors(path):
            if name not in wanted:
                if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_embeddings):
                    continue
                raise LtJaxError(f"unexpected tensor {name!r} in {path} for a {cfg.arch} model.")
            our_path, layer, n_in = wanted[name]
            dest = _leaf(params, our_path)
            our_shape = dest.shape[1:] if layer is not None else dest.shape
            if shape != _hf_shape(our_shape, n_in):
                raise LtJaxError(f"tensor {name!r} in {path} has shape {shape} but {hf_dir / 'config.json'} "
                                 f"implies {_hf_shape(our_shape, n_in)}.")
            value = _to_ours(load(), our_shape, n_in)
            if layer is None:
                dest[...] = value
            else:
                dest[layer] = value
            filled.add(name)
            if progress:
                progress(name)
    missing = [n for n in wanted if n not in filled]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LtJaxError(f"checkpoint {hf_dir} lacks tensor(s) {', '.join(missing[:3])}{more}.")
    return params


def copy_tokenizer(src: Path, dst: Path):
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, Path(dst) / name)


# ---- writing ---------------------------------------------------------------------------------------------

def hf_tensors(cfg: Config, params) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy view) in table order; views, so shards are laid out without copying the model."""
    for name, (path, layer, n_in) in entries(cfg).items():
        leaf = np.asarray(_leaf(params, path))
        yield name, _to_hf(leaf if layer is None else leaf[layer], n_in)


def write_hf_dir(out: Path, cfg: Config, params, max_shard_bytes: int = 2 << 30):
    """config.json plus model.safetensors, or numbered shards and an index past `max_shard_bytes`."""
    out = Path(out)
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    shards, current, size = [], {}, 0
    for name, arr in hf_tensors(cfg, params):
        if current and size + arr.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = arr
        size += arr.nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0], {"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / fname, shard, {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(a.nbytes for s in shards for a in s.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
