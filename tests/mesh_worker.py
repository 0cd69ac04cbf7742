"""Runs in a subprocess with 8 simulated CPU devices (tests/integration/test_sharding.py): every family on every mesh against
one device, printed as one JSON object. Kept out of the pytest process so the rest of the suite keeps one device.

Usage: python tests/mesh_worker.py WORKDIR [FAMILY:MESH ...] [--train] [--cli]
  FAMILY:MESH  e.g. llama:data=2,model=4 (FAMILY: llama, mistral, qwen2, or smollm2, the real model); nothing at
               all: every tiny family on every mesh
  --train      lt-jax train's loop, one device against data=4,model=2
  --cli        every model command with --mesh data=2,model=4, next to one device"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from helpers import compile_count  # noqa: E402 (counts compilations from here on)

MESHES = ["data=8,model=1", "data=2,model=4", "data=1,model=8", "data=4,model=2"]
FAMILIES = ["llama", "mistral", "qwen2"]
LENGTHS = [50, 120, 200, 90, 64, 180, 30, 150]  # 8 rows of mixed lengths, longer than S + W below
PLAN = dict(sink=4, window=32)


def checkpoints(root: Path) -> dict:
    from checkpoints_conv import convert
    from conftest import save_hf, tiny_hf_model
    out = {}
    for family in FAMILIES:
        ckpt = root / family / "ckpt"
        if not ckpt.exists():
            convert(save_hf(tiny_hf_model(family), root / family / "hf", "safetensors"), ckpt)
        out[family] = ckpt
    return out


def per_device_bytes(arrays) -> dict:
    """device id -> bytes of the shards it holds."""
    held = {}
    for a in arrays:
        for shard in a.addressable_shards:
            held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    return held


def train_loss(model, batch):
    """The training loss and its gradient (LightTransfer-Train's loss_fn) under a hybrid plan, on the model's
    params wherever they live (the batch is put over `data` like any batch)."""
    from lt_jax.params import stack_layers
    from lt_jax.train.step import loss_fn
    plan = model.plan("first", **PLAN)
    placed = {k: model.rows(v) for k, v in batch.items()}
    loss, grads = jax.value_and_grad(loss_fn)(stack_layers(model.params), placed, model.config, plan)
    return float(loss), grads


def train_run(ckpt: Path, root: Path, mesh: str | None) -> dict:
    """`lt-jax train`'s loop (3 steps, batch 8 over `data`) on one device or a mesh: its losses, and how many
    compilations of the step it added."""
    import lt_jax
    from lt_jax.train.run import RunOptions, train
    from lt_jax.train.step import TrainSettings, train_step
    data = root / "train.jsonl"
    rng = np.random.default_rng(1)
    data.write_text("".join(json.dumps({"ids": [int(t) for t in rng.integers(0, 300, 60)]}) + "\n"
                            for _ in range(16)))
    model = lt_jax.load(ckpt, mesh=mesh)
    plan = model.plan("first", **PLAN)
    before = compile_count(train_step)
    result = train(model, plan, [data], root / f"run-{mesh}", TrainSettings.for_plan(plan, steps=3, lr=1e-3),
                   RunOptions(seq_len=64, batch_size=8, save_every=3), progress=False)
    log = [json.loads(line) for line in (root / f"run-{mesh}" / "train_log.jsonl").read_text().splitlines()]
    return {"losses": [row["loss"] for row in log], "step_compilations": compile_count(train_step) - before,
            "final_loss": result["final_loss"]}


def cli_on_mesh(ckpt: Path, root: Path) -> dict:
    """Every model command with --mesh data=2,model=4 (in this process: lt_jax.cli.main), next to one device where
    the result is a number: exit codes and results."""
    import contextlib
    import io
    from lt_jax.cli import main as cli
    rng = np.random.default_rng(2)
    ids = root / "ids.txt"
    ids.write_text(" ".join(str(t) for t in rng.integers(0, 300, 200)))
    samples = root / "samples.jsonl"
    samples.write_text("".join(json.dumps({"ids": [int(t) for t in rng.integers(0, 300, 300)]}) + "\n"
                               for _ in range(3)))
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"ids": [int(t) for t in rng.integers(0, 300, 60)]}) + "\n"
                            for _ in range(8)))
    mesh = ["--mesh", "data=2,model=4"]
    commands = {
        "ppl": ["ppl", str(ckpt), "--ids-file", str(ids), "--plan", "first", "--window", "32"],
        "generate": ["generate", str(ckpt), "--ids", "1 2 3 4 5", "--max-new-tokens", "6", "--stop-ids", "-1"],
        "identify": ["identify", str(ckpt), str(samples), "--field", "ids", "--context", "256", "--window", "64",
                     "--lazy-fraction", "0.34"],
        "bench": ["bench", str(ckpt), "--contexts", "128", "--batches", "2", "--new-tokens", "4", "--methods",
                  "full,lighttransfer", "--window", "32"],
        "train": ["train", str(ckpt), "--data", str(data), "--plan", "first", "--window", "32", "--steps", "2",
                  "--seq-len", "64", "--batch-size", "4"],
    }
    out = {}
    for name, argv in commands.items():
        runs = {}
        for where, extra in (("one_device", []), ("mesh", mesh)):
            tail = {"identify": ["--out", str(root / f"plan-{where}.json")],
                    "train": ["--out", str(root / f"train-{where}")]}.get(name, [])
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                code = cli([*argv, *tail, *extra, "--json"])
            runs[where] = {"code": code, "result": json.loads(stdout.getvalue()) if code == 0 else None}
        out[name] = runs
    return out


def run_family(ckpt: Path, meshes: list[str], rng) -> dict:
    import lt_jax
    from lt_jax import sharding
    from lt_jax.cache import expected_kv_bytes
    from lt_jax.inference import generate_loop, prefill
    prompts = [[int(t) for t in rng.integers(0, 300, n)] for n in LENGTHS]
    ids = np.asarray([p[:30] for p in prompts], np.int32)
    one = lt_jax.load(ckpt)
    ref = {"logits": one.logits(ids),
           "greedy": [r["ids"] for r in one.generate(prompts, plan="first", max_new_tokens=12, stop_ids=[], **PLAN)]}
    ref["select"], ref["ratios"] = one.select(prompts, "lighttransfer", lazy_fraction=0.34, **PLAN)
    batch = {"tokens": ids, "positions": np.tile(np.arange(ids.shape[1], dtype=np.int32), (8, 1)), "labels": ids}
    ref["loss"], ref["grads"] = train_loss(one, batch)
    out = {}
    for spec in meshes:
        model = lt_jax.load(ckpt, mesh=spec)
        mesh = model.mesh
        logits = model.logits(ids)
        greedy = [r["ids"] for r in model.generate(prompts, plan="first", max_new_tokens=12, stop_ids=[], **PLAN)]
        chosen, ratios = model.select(prompts, "lighttransfer", lazy_fraction=0.34, **PLAN)
        compiled = compile_count(prefill), compile_count(generate_loop)
        # other prompts of the same bucket choose again and decode again: no new compilation
        other = [[int(t) for t in rng.integers(0, 300, n)] for n in LENGTHS]
        model.select(other, "lighttransfer", lazy_fraction=0.34, **PLAN)
        model.generate(other, plan="first", max_new_tokens=12, stop_ids=[], **PLAN)
        recompiled = (compile_count(prefill) - compiled[0], compile_count(generate_loop) - compiled[1])
        # the cache: made in its shards; a decode donates it
        plan = model.plan("first", **PLAN)
        cache = model.empty_cache(plan, 8, 256)
        kv = jax.tree.leaves(cache.kv)
        done = model.prefill(prompts, plan, 256)
        donated = done.cache.full_k[0]
        model.generate_from(done)
        loss, grads = train_loss(model, batch)
        grad_diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-12))
                        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref["grads"])))
        weights = jax.tree_util.tree_flatten_with_path(model.params)[0]
        out[spec] = {
            "mesh": dict(mesh.shape),
            "max_abs_logits_diff": float(np.abs(logits - ref["logits"]).max()),
            "max_abs_logits": float(np.abs(ref["logits"]).max()),
            "greedy_equal": greedy == ref["greedy"],
            "lazy_layers": list(chosen.lazy_layers), "lazy_layers_one_device": list(ref["select"].lazy_layers),
            "max_abs_ratio_diff": float(np.abs(ratios - ref["ratios"]).max()),
            "new_compilations": list(recompiled),
            "cache_donated": bool(donated.is_deleted()),
            "cache_bytes_per_device": sorted(set(per_device_bytes(kv).values())),
            "cache_bytes_formula": expected_kv_bytes(model.config, plan, 8, 256),
            "cache_spec": str(tuple(cache.full_k[0].sharding.spec)),
            "weights": {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): {
                "shape": list(a.shape),
                "fractions": sorted({s.data.size / a.size for s in a.addressable_shards}),
                "devices": len(a.addressable_shards)} for path, a in weights},
            "num_kv_heads": model.config.num_kv_heads,
            "cache_kv_heads": sharding.cache_kv_heads(model.config, mesh),  # copied per chip: test_sharding.py
            "train_loss_rel_diff": abs(loss - ref["loss"]) / ref["loss"], "train_grad_max_rel_diff": grad_diff,
        }
    return out


def main() -> int:
    root = Path(sys.argv[1])
    args = sys.argv[2:]
    result = {"devices": jax.device_count()}
    paths = checkpoints(root)
    if "--cli" in args:
        result["cli"] = cli_on_mesh(paths["llama"], root)
    if "--train" in args:
        result["train"] = {"one_device": train_run(paths["llama"], root, None),
                           "mesh": train_run(paths["llama"], root, "data=4,model=2")}
    wanted = [a.split(":") for a in args if not a.startswith("--")]
    if not args:
        wanted = [(f, m) for f in FAMILIES for m in MESHES]
    if any(f == "smollm2" for f, _ in wanted):  # the real model: 9 query / 3 KV heads divide no model axis
        from lt_jax import assets
        paths["smollm2"] = assets.resolve_model("smollm2")
    for family, ckpt in paths.items():
        meshes = [m for f, m in wanted if f == family]
        if meshes:
            result[family] = run_family(ckpt, meshes, np.random.default_rng(0))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
