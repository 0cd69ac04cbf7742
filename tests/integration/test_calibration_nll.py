"""The nll probe with a real tokenizer (tiny_chat: SmolLM2's vocabulary and chat template on 4 random layers): its
prompts hold what they claim (the keys, one asked value of 8 digits, never a 7-digit eval value), and
`lt-jax calibrate --probe nll` writes the file that `loss-guided` and `retrieval-aware:nll` read."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

import lt_jax
from conftest import last_json
from lt_jax import probes
from lt_jax.calibration import Calibration
from lt_jax.cli.main import main


@pytest.fixture(scope="module")
def chat(tiny_chat):
    return lt_jax.load(tiny_chat)


@pytest.fixture(scope="module")
def essay(assets):
    return sorted(Path(assets["essays"]).glob("*.txt"))[0]


def test_calibration_prompts_hold_their_keys_and_one_answer(chat, essay):
    model = chat
    haystack = model.encode(essay.read_text())
    for length in (300, 500):
        for s, (ids, start) in enumerate(probes.calibration_rows(model, haystack, [length], 2, seed=1, keys=3)):
            prompt, answer = model.decode(ids[:start]), model.decode(ids[start:])
            needles = re.findall(r"special magic numbers for (\w+-\w+) is: (\d+)\.", prompt)
            asked = re.search(r"special magic number for (\w+-\w+) mentioned in the provided text\?", prompt)[1]
            assert len(ids) <= length and len(needles) == 3 and len({k for k, _ in needles}) == 3, (length, s)
            assert all(len(v) == probes.CALIBRATION_DIGITS == 8 for _, v in needles)
            assert answer == " " + dict(needles)[asked] and prompt.count(answer.strip()) == 1


@pytest.mark.slow
def test_calibrate_nll_writes_what_the_plans_read(chat, tiny_chat, essay, tmp_path, capsys):
    model = chat
    out = tmp_path / "nll.json"
    capsys.readouterr()
    code = main(["calibrate", str(tiny_chat), "--probe", "nll", "--lengths", "300", "--samples", "2", "--keys", "3",
                 "--window", "32", "--haystack", str(essay), "--out", str(out), "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    got, cal = last_json(stdout), Calibration.load(out)
    assert json.loads(out.read_text())["format"] == 2 and cal.probe == "nll" and np.shape(cal.head_scores) == (4, 1)
    assert cal.provenance["forwards"] == 2 * (5 + 1) and cal.provenance["settings"]["window"] == 32
    joint = cal.provenance["joint"]  # the default --joint 0.5: the loss-guided set streaming together
    assert [j["lazy_fraction"] for j in joint] == [0.5] and tuple(joint[0]["layers"]) == cal.lowest(2)
    assert abs(joint[0]["additive"] - sum(cal.layer_scores[list(cal.lowest(2))])) <= 1e-5
    assert model.plan(f"loss-guided:{out}").lazy_layers == cal.lowest(2) == tuple(got["lowest_at_half"])
    assert model.plan(f"retrieval-aware:{out}").protect == cal.protected(1) == tuple(got["protected_at_half"])
    # nll-greedy from those single scores: no single-layer pass again; loss-guided reads its choice
    greedy = tmp_path / "nll-greedy.json"
    prompts = ["--lengths", "300", "--samples", "2", "--keys", "3", "--haystack", str(essay)]
    assert main(["calibrate", str(tiny_chat), "--probe", "nll-greedy", *prompts, "--window", "32", "--singles",
                 str(out), "--out", str(greedy), "--json"]) == 0
    chosen = Calibration.load(greedy)
    order = chosen.provenance["order"]
    assert chosen.probe == "nll-greedy" and len(order) == 2 and chosen.provenance["forwards"] >= 2 * 3
    assert model.plan(f"loss-guided:{greedy}").lazy_layers == tuple(sorted(order))
    capsys.readouterr()
    assert main(["calibrate", str(tiny_chat), "--probe", "nll-greedy", *prompts, "--window", "64", "--singles",
                 str(out), "--out", str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an nll calibration of these prompts and S/W (window 32 (here 64))" in err
    assert not (tmp_path / "other.json").exists()
