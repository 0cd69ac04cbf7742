#!/bin/sh
# The command behind results/sweep/qwen-8k-kv25.*: issue 24's "25 % KV" (a quarter of full attention's KV bytes) on
# Qwen2.5-Coder-0.5B-Instruct at 8K, the 20 RULER prompts of results/ruler/qwen-8k.* (niah_multikey_3,
# niah_multivalue, vt, cwe; 5 per task, seed 0). Full holds 24 x 8192 = 196,608 token-layers; a quarter is 49,152,
# which 6 full layers fill alone, so 5 stay full and 19 stream (79 %) in S + W = 431 places (S/W = 4/427):
# 5 x 8192 + 19 x 431 = 49,149 token-layers (25.0 %).
R=results/retrieval/calibration-retrieval-qwen.json
F=results/nll/calibration-nll-qwen.json
A="@lazy_fraction=0.79@window=427"
set -e
lt-jax eval "${MODEL:-$LT_JAX_ASSETS/lt/qwen2.5-coder-0.5b-instruct}" \
    --task ruler:niah_multikey_3,niah_multivalue,vt,cwe --lengths 8192 --samples 5 \
    --methods "full,retrieval-aware:$R$A,loss-guided:$F$A" \
    --out results/sweep/qwen-8k-kv25.jsonl --plot results/sweep/qwen-8k-kv25.png \
    --json > results/sweep/qwen-8k-kv25.json.tmp
mv results/sweep/qwen-8k-kv25.json.tmp results/sweep/qwen-8k-kv25.json  # the summary, once every prompt is done
