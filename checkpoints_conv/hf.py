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
from lt_jax.params import empty_params, param_specs, qkv_part

# HF name -> our leaf and where the tensor sits in one layer's slice of it ("q"/"k"/"v": `params.qkv_part`; an
# int: that index of the leaf's first axis; None: the whole slice). Every leaf of ours is stored [out..., in] like
# HF's Linear weights, so each tensor is a plain reshape into its place, both ways.
TABLE = [
    ("model.embed_tokens.weight", "embed", None),
    ("model.norm.weight", "final_norm", None),
    ("lm_head.weight", "lm_head", None),
    ("model.layers.{i}.input_layernorm.weight", "attn_norm", None),
    ("model.layers.{i}.self_attn.q_proj.weight", "qkv_proj", "q"),
    ("model.layers.{i}.self_attn.k_proj.weight", "qkv_proj", "k"),
    ("model.layers.{i}.self_attn.v_proj.weight", "qkv_proj", "v"),
    ("model.layers.{i}.self_attn.q_proj.bias", "qkv_bias", "q"),
    ("model.layers.{i}.self_attn.k_proj.bias", "qkv_bias", "k"),
    ("model.layers.{i}.self_attn.v_proj.bias", "qkv_bias", "v"),
    ("model.layers.{i}.self_attn.o_proj.weight", "o_proj", None),
    ("model.layers.{i}.post_attention_layernorm.weight", "mlp_norm", None),
    ("model.layers.{i}.mlp.gate_proj.weight", "gate_up_proj", 0),
    ("model.layers.{i}.mlp.up_proj.weight", "gate_up_proj", 1),
    ("model.layers.{i}.mlp.down_proj.weight", "down_proj", None),
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


INPUT_AXES = {"o_proj": 2}  # trailing axes of our leaf that form HF's input dim (o_proj [D, N, H]); others: 1


def _hf_shape(shape: tuple[int, ...], name: str, leaf: str) -> tuple[int, ...]:
    """HF's shape of one of our slices: a weight [out, in] (our leading axes are the output; norms stay [D]), a
    bias flat."""
    n_in = INPUT_AXES.get(leaf, 1)
    if name.endswith(".weight") and len(shape) > 1:
        return math.prod(shape[:-n_in]), math.prod(shape[-n_in:])
    return (math.prod(shape),)


def entries(cfg: Config) -> dict[str, tuple[str, int | None, object]]:
    """HF name -> (our leaf, layer index or None, index of the tensor within the layer's slice), for the leaves
    this config has."""
    specs = param_specs(cfg)
    out = {}
    for name, leaf, part in TABLE:
        in_layer = "{i}" in name
        if leaf not in (specs["layers"] if in_layer else specs):
            continue
        index = (np.s_[...] if part is None else qkv_part(cfg, part) if isinstance(part, str) else np.s_[part])
        for i in (range(cfg.num_layers) if in_layer else [None]):
            out[name.format(i=i)] = (leaf, i, index)
    return out


def _slot(params, leaf: str, layer, index) -> np.ndarray:
    """The view of our buffer that one HF tensor fills."""
    arr = params["layers"][leaf][layer] if layer is not None else params[leaf]
    return arr[index]


# ---- reading ---------------------------------------------------------------------------------------------

def read_hf_config(hf_dir: Path, dtype: str = "float32") -> Config:
    if not Path(hf_dir).is_dir():
        raise LtJaxError(f"{hf_dir} {'is not a directory' if Path(hf_dir).exists() else 'does not exist'}; give a "
                         f"Hugging Face model directory.")
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
            leaf, layer, index = wanted[name]
            dest = _slot(params, leaf, layer, index)
            want = _hf_shape(dest.shape, name, leaf)
            if shape != want:
                raise LtJaxError(f"tensor {name!r} in {path} has shape {shape} but {hf_dir / 'config.json'} "
                                 f"implies {want}.")
            dest[...] = load().reshape(dest.shape)
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
    """(HF name, numpy array) in table order: views where our slice is contiguous (all but q/k/v and their biases,
    which are copied one tensor at a time)."""
    host = {"layers": {k: np.asarray(v) for k, v in params["layers"].items()},
            **{k: np.asarray(v) for k, v in params.items() if k != "layers"}}
    for name, (leaf, layer, index) in entries(cfg).items():
        arr = _slot(host, leaf, layer, index)
        yield name, np.ascontiguousarray(arr).reshape(_hf_shape(arr.shape, name, leaf))


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
