#!/bin/sh
# The command behind results/sweep/smollm2-8k.*: the same 6 RULER tasks as at 4K, 4 prompts each, at 8K
# (SmolLM2-135M-Instruct, seed 0), for issue 24's SmolLM2-8K target: full, the paper's rule, the loss-guided plan
# (results/nll's calibration, at S/W 4/1020 and 64/960), the periodic interleave and retrieval-aware (retrieval probe),
# all at 50 % lazy.
F=results/nll/calibration-nll-smollm2.json
R=results/retrieval/calibration-retrieval-smollm2.json
set -e
lt-jax eval "${MODEL:-$LT_JAX_ASSETS/lt/smollm2-135m-instruct}" \
    --task ruler:niah_single_1,niah_single_2,niah_multikey_1,vt,cwe,fwe --lengths 8192 --samples 4 \
    --methods "full,lighttransfer,loss-guided:$F,loss-guided:$F@sink=64@window=960,periodic,retrieval-aware:$R" \
    --out results/sweep/smollm2-8k.jsonl --plot results/sweep/smollm2-8k.png \
    --json > results/sweep/smollm2-8k.json.tmp
mv results/sweep/smollm2-8k.json.tmp results/sweep/smollm2-8k.json  # the summary, once every prompt is done
