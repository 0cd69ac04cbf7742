#!/bin/sh
# The commands behind results/peers/smollm2-4k.*: the 24 RULER prompts of results/ruler/ (SmolLM2-135M-Instruct, 6
# tasks at 4K, 4 per task; grown from 3: a rerun keeps the rows), exported by lt-jax, then decoded by torch +
# kvpress in kvpress's own venv.
set -e
A=${LT_JAX_ASSETS:?set LT_JAX_ASSETS}
KVPRESS_PYTHON=${KVPRESS_PYTHON:-/work/kvpress-venv/bin/python}  # python -m venv DIR; DIR/bin/pip install kvpress
.venv/bin/python scripts/export_ruler.py "$A/lt/smollm2-135m-instruct" \
    --tasks niah_single_1,niah_single_2,niah_multikey_1,vt,cwe,fwe --lengths 4096 --samples 4 \
    --out results/peers/smollm2-4k.prompts.jsonl
nice -n 19 "$KVPRESS_PYTHON" scripts/kvpress_peers.py results/peers/smollm2-4k.prompts.jsonl \
    "$A/hf/smollm2-135m-instruct" --methods full,duo,duo-native,simlayerkv --essays "$A/essays" \
    --out results/peers/smollm2-4k.jsonl --compare results/ruler/smollm2-4k.jsonl --json > results/peers/smollm2-4k.json.tmp
mv results/peers/smollm2-4k.json.tmp results/peers/smollm2-4k.json
