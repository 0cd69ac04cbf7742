#!/bin/sh
# The command behind results/ruler/smollm2-4k.{jsonl,json,png}: SmolLM2-135M-Instruct, 6 RULER tasks at 4K, 4 prompts
# per task, full vs lighttransfer vs streaming (default plan flags), on this machine's CPU (2 shared cores).
set -e
lt-jax eval "${MODEL:-$LT_JAX_ASSETS/lt/smollm2-135m-instruct}" \
    --task ruler:niah_single_1,niah_single_2,niah_multikey_1,vt,cwe,fwe --lengths 4096 --samples 4 \
    --methods full,lighttransfer,streaming --out results/ruler/smollm2-4k.jsonl --plot results/ruler/smollm2-4k.png \
    --json > results/ruler/smollm2-4k.json.tmp
mv results/ruler/smollm2-4k.json.tmp results/ruler/smollm2-4k.json  # the summary, once every prompt is done
