#!/bin/sh
# The command behind results/sweep/smollm2-4k.*: sinks and windows at equal KV bytes (issue 24, item 3) on the 24
# RULER prompts of results/ruler/ (SmolLM2-135M-Instruct, 6 tasks x 4 prompts at 4K, seed 0). Layer rules:
# lighttransfer (the paper's per-prompt lazy ratio) and loss-guided (results/nll's calibration); then the periodic
# interleave and retrieval-aware (retrieval probe) at the default S/W, added to the same file later (it resumes).
#  - 50 % lazy (15 of 30 layers), S + W = 1024: S/W = 4/1020, 64/960, 128/896 (equal bytes).
#  - 25 % lazy (8 layers) at S/W = 4/1020 holds 22 x 4096 + 8 x 1024 = 98,304 token-layers; 50 % lazy holds as
#    many at S/W = 4/2454 (15 x 4096 + 15 x 2458): a wide window on many layers vs a small one on few.
F=results/nll/calibration-nll-smollm2.json
M=""
for rule in lighttransfer "loss-guided:$F"; do
  M="$M,$rule,$rule@sink=64@window=960,$rule@sink=128@window=896,$rule@lazy_fraction=0.25,$rule@window=2454"
done
R=results/retrieval/calibration-retrieval-smollm2.json
M="$M,periodic,retrieval-aware:$R,retrieval-aware:$R@sink=64@window=960"  # added later: the same prompts
I=results/retrieval/calibration-induction-smollm2.json
M="$M,retrieval-aware:$F,retrieval-aware:$I"  # retrieval-aware's other two probes (nll, induction), added last
set -e
lt-jax eval "${MODEL:-$LT_JAX_ASSETS/lt/smollm2-135m-instruct}" \
    --task ruler:niah_single_1,niah_single_2,niah_multikey_1,vt,cwe,fwe --lengths 4096 --samples 4 \
    --methods "full$M" --out results/sweep/smollm2-4k.jsonl --plot results/sweep/smollm2-4k.png \
    --json > results/sweep/smollm2-4k.json.tmp
mv results/sweep/smollm2-4k.json.tmp results/sweep/smollm2-4k.json  # the summary, once every prompt is done
