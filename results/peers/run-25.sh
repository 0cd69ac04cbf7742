#!/bin/sh
# The commands behind results/peers/smollm2-4k-lazy25.*: the same 18 prompts as run.sh (its export), the peers at
# 25 % KV budget (--lazy-fraction 0.25: the share of layers, or of (layer, KV head) pairs, that stream at S/W =
# 4/1020). The lt-jax rows at 25 % are in results/sweep/ (`@lazy_fraction=0.25`). Full attention is run.sh's row.
set -e
A=${LT_JAX_ASSETS:?set LT_JAX_ASSETS}
KVPRESS_PYTHON=${KVPRESS_PYTHON:-/work/kvpress-venv/bin/python}  # python -m venv DIR; DIR/bin/pip install kvpress
cp -n results/peers/smollm2-4k.jsonl.duo_heads.json results/peers/smollm2-4k-lazy25.jsonl.duo_heads.json  # head scores: the same model and texts
for methods in duo-native,simlayerkv duo; do  # the cheap ones first: a stopped run has them for every prompt
  nice -n 12 "$KVPRESS_PYTHON" scripts/kvpress_peers.py results/peers/smollm2-4k.prompts.jsonl \
      "$A/hf/smollm2-135m-instruct" --methods $methods --lazy-fraction 0.25 --essays "$A/essays" \
      --out results/peers/smollm2-4k-lazy25.jsonl --json > results/peers/smollm2-4k-lazy25.json
done
