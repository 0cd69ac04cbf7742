#!/bin/sh
# The command behind results/ruler/qwen-16k.*: Qwen2.5-Coder-0.5B-Instruct at 16K on RULER's harder tasks (issue 24
# asks for them on Qwen, where full attention is below 100): niah_multikey_3 (uuid keys and values in a haystack
# of needles), niah_multivalue, vt, cwe; 2 prompts per task (seed 0). Methods at 50 % lazy: the paper's rule,
# the periodic interleave, retrieval-aware with the Qwen retrieval probe (results/retrieval/).
R=results/retrieval/calibration-retrieval-qwen.json
exec lt-jax eval "${MODEL:-$LT_JAX_ASSETS/lt/qwen2.5-coder-0.5b-instruct}" \
    --task ruler:niah_multikey_3,niah_multivalue,vt,cwe --lengths 16384 --samples 2 \
    --methods "full,lighttransfer,periodic,retrieval-aware:$R" \
    --out results/ruler/qwen-16k.jsonl --plot results/ruler/qwen-16k.png \
    --json > results/ruler/qwen-16k.json  # (written when all 8 prompts are done)
