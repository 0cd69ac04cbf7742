#!/usr/bin/env python
"""lt-jax on a GPU in one short run (under 5 minutes on an H100), for the day a GPU is lent (docs/gpu.md). Needs
no network and no downloaded weights.

1. Parity. A tiny random llama made by transformers (seeded, perturbed so no weight is at its init) is saved and
   loaded by lt-jax, in float32 and bfloat16; its logits on this machine's accelerator are compared with
   transformers' float32 forward on the CPU (float32: at XLA's full float32 matmul precision, the default TF32 of
   GPU matmuls reported beside it), and lt-jax's greedy continuation (prefill + compiled decode loop, float32)
   with transformers' `generate`.
2. Speed. A model of SmolLM2-135M's shape with random weights (or --model, an HF config.json: e.g.
   configs/Llama-3.1-8B-Instruct), in float32 and bfloat16: compile seconds, prefill tokens/s, decode tokens/s,
   exact KV bytes and XLA's peak buffers of `full` and `lighttransfer` side by side, per context and batch, through
   `lt_jax.eval.bench` (what `lt-jax bench` reports). Past --budget-s the remaining dtypes are skipped and named.

Writes one JSON object to --out (default $OUT/gpu_check.json where $OUT is set, else ./gpu_check.json); exits 1 if a
parity check fails. --cpu runs everything on the CPU (the test suite runs it so, with --model tiny).

Usage: python scripts/gpu_check.py [--cpu] [--model smollm2|tiny|CONFIG.json] [--contexts 2048,8192]
       [--batches 4] [--new-tokens 64] [--dtypes float32,bfloat16] [--budget-s 200] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

FP32_TOL = 1e-4  # max |logit difference| at full float32 precision (CPU measured: ~1e-6)
BF16_TOL = 0.1  # max |logit difference| / max |logit| with bf16 weights and cache (CPU measured: 0.032)
GREEDY_TOKENS = 16
REPO = Path(__file__).resolve().parents[1]  # a GPU machine runs a copy of the repo, lt-jax not installed

SMOLLM2 = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
           "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
           "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
           "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
TINY = {**SMOLLM2, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (default: JAX's default backend)")
    p.add_argument("--model", default="smollm2", help="shape of the timed model: smollm2, tiny, or an HF "
                   "config.json (or a directory holding one); random weights (default smollm2)")
    p.add_argument("--contexts", default="2048,8192", help="cache slots timed (default 2048,8192)")
    p.add_argument("--batches", default="4", help="batch sizes timed (default 4)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per row (default 64)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="dtypes timed (default float32,bfloat16)")
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="no new dtype starts timing after this many seconds (default 200)")
    p.add_argument("--out", default=None, help="the JSON file (default $OUT/gpu_check.json, else ./gpu_check.json)")
    return p.parse_args(argv)


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def timed_config(name: str, dtype: str):
    from lt_jax.cli.compile import read_config
    from lt_jax.config import Config
    if name in ("smollm2", "tiny"):
        return Config.from_hf({"smollm2": SMOLLM2, "tiny": TINY}[name], source=name, dtype=dtype)
    return read_config(name, dtype)


def reference_model(seed: int = 0):
    """The tiny transformers llama of the parity check, every weight perturbed from its init."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
            "tie_word_embeddings")
    hf = LlamaForCausalLM(LlamaConfig(**{k: TINY[k] for k in keys})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


def parity() -> dict:
    """The tiny model's logits and greedy tokens, lt-jax on the default device against transformers on the CPU."""
    import jax
    import numpy as np
    import torch

    import lt_jax
    hf = reference_model()
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 96)).astype(np.int32)
    with torch.no_grad():
        want = hf(torch.from_numpy(ids).long()).logits.numpy()
        greedy_want = hf.generate(torch.from_numpy(ids[:1]).long(), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                  min_new_tokens=GREEDY_TOKENS)[0, ids.shape[1]:].tolist()
    scale = float(np.abs(want).max())
    out = {"reference": "transformers float32 on CPU", "logits_max_abs": scale}
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        full, half = lt_jax.load(tmp), lt_jax.load(tmp, dtype="bfloat16")
        with jax.default_matmul_precision("float32"):
            fp32 = float(np.abs(full.logits(ids) - want).max())
            greedy = full.generate([ids[0].tolist()], max_new_tokens=GREEDY_TOKENS, stop_ids=[])[0]["ids"]
        fp32_default = float(np.abs(full.logits(ids) - want).max())
        bf16 = float(np.abs(half.logits(ids) - want).max()) / scale
    out.update(float32_max_abs_diff=fp32, float32_tol=FP32_TOL,
               float32_default_precision_max_abs_diff=fp32_default,
               bfloat16_max_rel_diff=bf16, bfloat16_tol=BF16_TOL,
               greedy_equal=greedy == greedy_want, greedy_tokens=GREEDY_TOKENS)
    out["ok"] = fp32 <= FP32_TOL and bf16 <= BF16_TOL and out["greedy_equal"]
    return out


def speed(args, started: float) -> tuple[list[dict], list[str]]:
    """`lt_jax.eval.bench.run` per dtype on random weights: full vs lighttransfer per context and batch."""
    import jax
    import jax.numpy as jnp

    from lt_jax.api import Model
    from lt_jax.eval import bench
    from lt_jax.params import init_params
    results, skipped = [], []
    params = None
    for dtype in args.dtypes.split(","):
        if time.perf_counter() - started > args.budget_s:
            skipped.append(dtype)
            continue
        cfg = timed_config(args.model, dtype)
        if params is None:  # float32 weights made once on the device, cast per dtype
            params = init_params(cfg.replace(dtype="float32"), jax.random.key(0))
        model = Model(cfg, jax.tree.map(lambda a: a.astype(jnp.dtype(dtype)), params))
        plans = {spec: model.plan(spec) for spec in ("full", "lighttransfer")}
        results.append(bench.run(model, plans, ints(args.contexts), ints(args.batches), args.new_tokens,
                                 repeats=2, progress=False))
    return results, skipped


def main(argv=None) -> int:
    args = parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from lt_jax.eval import bench
    started = time.perf_counter()
    device = jax.devices()[0]
    report = {"jax": jax.__version__, "backend": jax.default_backend(), "device": device.device_kind,
              "devices": jax.device_count(), "model": args.model}
    if report["backend"] == "cpu" and not args.cpu:
        print("gpu_check: no accelerator found; running on the CPU", file=sys.stderr)
    report["parity"] = parity()
    report["parity_s"] = round(time.perf_counter() - started, 1)
    report["speed"], report["skipped_dtypes"] = speed(args, started)
    report["total_s"] = round(time.perf_counter() - started, 1)
    default = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    out = Path(args.out) if args.out else default
    out.write_text(json.dumps(report, indent=1))
    p = report["parity"]
    print(f"gpu_check on {report['device']} ({report['backend']}): parity {'ok' if p['ok'] else 'FAILED'} "
          f"(float32 {p['float32_max_abs_diff']:.1e}, bfloat16 {p['bfloat16_max_rel_diff']:.1e} relative, greedy "
          f"{'equal' if p['greedy_equal'] else 'differs'}); {report['total_s']} s; wrote {out}")
    for result in report["speed"]:
        print(f"\n{result['dtype']}:\n{bench.markdown(result)}")
    return 0 if p["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
