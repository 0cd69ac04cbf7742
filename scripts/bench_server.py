#!/usr/bin/env python
"""`lt-jax serve` under concurrent load against the batch path of `lt-jax generate --input` on the same prompts.

(a) server: `lt_jax.server.serve` in a subprocess on 127.0.0.1; C concurrent clients (the `openai` client, every
    request streamed, greedy) send the prompts; per request: time to first token (the first chunk holding a
    token) and latency (to the last chunk); tokens/s = tokens received / wall seconds of the whole load.
(b) batch: `Model.generate_stream` (what `generate --input` runs) on the same prompts and budgets, batch size the
    server's --max-batch; tokens/s = tokens / wall seconds.

Both paths run the workload twice and time the second run (compilation excluded). Prompts are random ids of
mixed lengths, each with its own budget; both stop at the model's EOS, so they produce the same tokens.

Usage: python scripts/bench_server.py [--model smollm2] [--prompts 24] [--min-len 32] [--max-len 400]
       [--min-new 8] [--max-new 32] [--concurrency 8] [--max-batch 8] [--chunk 8] [--plan full]
       [--out results/server.json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SERVE = """
import sys, lt_jax
from lt_jax.server import serve
model = lt_jax.load(sys.argv[1])
sys.exit(serve(model, port=int(sys.argv[2]), plan=sys.argv[3], max_batch=int(sys.argv[4]), chunk=int(sys.argv[5]),
               name="bench", log_level="warning"))
"""


def percentile(values, q) -> float:
    return round(float(np.percentile(values, q)), 4)


def load(client, prompts, budgets, concurrency: int) -> dict:
    def one(i):
        t0 = time.perf_counter()
        first, ids = None, []
        for chunk in client.completions.create(model="bench", prompt=prompts[i], max_tokens=budgets[i],
                                               temperature=0, stream=True):
            new = (chunk.choices[0].lt_token_ids or []) if chunk.choices else []
            if new and first is None:
                first = time.perf_counter() - t0
            ids += new
        return first, time.perf_counter() - t0, ids

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(one, range(len(prompts))))
    seconds = time.perf_counter() - t0
    tokens = sum(len(o[2]) for o in out)
    ttft, latency = [o[0] for o in out if o[0] is not None], [o[1] for o in out]
    return {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "latency_p50_s": percentile(latency, 50), "latency_p99_s": percentile(latency, 99),
            "ids": [o[2] for o in out]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="an asset name or a checkpoint dir (default smollm2)")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=400)
    p.add_argument("--min-new", type=int, default=8)
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--plan", default="full", help="a plan spec (default full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the numbers to this JSON file")
    args = p.parse_args(argv)

    import openai

    import lt_jax
    from lt_jax import assets
    if args.model in ("smollm2", "qwen2.5-coder"):
        assets.fetch(qwen=args.model == "qwen2.5-coder")
    say = lambda msg: print(f"[bench_server] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    model = lt_jax.load(args.model)
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(0, model.config.vocab_size, int(t)).tolist()
               for t in rng.integers(args.min_len, args.max_len, args.prompts, endpoint=True)]
    budgets = [int(b) for b in rng.integers(args.min_new, args.max_new, args.prompts, endpoint=True)]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(model.path), str(port), args.plan,
                             str(args.max_batch), str(args.chunk)], env=os.environ)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit(f"the server exited with {proc.returncode}")
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
        say(f"{model.label}: {len(prompts)} prompts of {args.min_len}..{args.max_len} tokens, budgets "
            f"{args.min_new}..{args.max_new}, {args.concurrency} clients, batch {args.max_batch}; warm-up ...")
        load(client, prompts, budgets, args.concurrency)
        say("server ...")
        server = load(client, prompts, budgets, args.concurrency)
    finally:
        proc.terminate()
        proc.wait(600)

    say("batch (generate --input's path) ...")
    def batch():
        t0 = time.perf_counter()
        rows = sorted(model.generate_stream(prompts, args.plan, batch_size=args.max_batch, max_new_tokens=budgets,
                                            chunk=args.chunk), key=lambda r: r["index"])
        return time.perf_counter() - t0, [r["ids"] for r in rows]
    batch()
    seconds, ids = batch()
    tokens = sum(map(len, ids))
    result = {"model": model.label, "plan": args.plan, "prompts": len(prompts),
              "lengths": [args.min_len, args.max_len], "budgets": [args.min_new, args.max_new],
              "concurrency": args.concurrency, "max_batch": args.max_batch, "chunk": args.chunk,
              "device": str(__import__("jax").devices()[0].platform),
              "server": {k: v for k, v in server.items() if k != "ids"},
              "batch": {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2)},
              "same_tokens": server["ids"] == ids}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
