"""scripts/export_ruler.py writes the prompts `lt-jax eval --task ruler` evaluates; scripts/kvpress_peers.py (run in
kvpress's own venv, skipped where it is absent) decodes them with torch as lt-jax does, at lt-jax's KV budget."""
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from lt_jax.eval import evaluate

REPO = Path(__file__).resolve().parents[2]
KVPRESS_PYTHON = Path(os.environ.get("KVPRESS_PYTHON", "/work/kvpress-venv/bin/python"))
TASKS, LENGTH, NEW, S, W = ["niah_single_1", "fwe"], 512, 4, 4, 64


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def chat_model(tiny_chat):
    import lt_jax
    return lt_jax.load(tiny_chat)


@pytest.fixture(scope="module")
def exported(tiny_chat, chat_model, assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("peers") / "prompts.jsonl"
    assert _script("export_ruler").main([str(tiny_chat), "--tasks", ",".join(TASKS), "--lengths", str(LENGTH),
                                         "--samples", "1", "--max-new-tokens", str(NEW), "--out", str(out)]) == 0
    return out


def test_export_gives_the_prompts_lt_jax_eval_evaluates(exported, chat_model, assets):
    texts = [p.read_text() for p in sorted(Path(assets["essays"]).glob("*.txt"))]
    want = list(evaluate.Ruler(TASKS, [LENGTH], 1, 0, NEW, texts).examples(chat_model))  # what `lt-jax eval` runs
    got = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [g["example"] for g in got] == [e.id for e in want] == ["niah_single_1/512/0", "fwe/512/0"]
    for g, e in zip(got, want):
        assert g["ids"] == list(e.ids) and g["target"] == e.target and g["max_new_tokens"] == NEW
        assert g["cell"] == e.cell and LENGTH - 64 < len(g["ids"]) <= LENGTH - NEW
    # the chat template and RULER's answer prefix are in the ids: the prompt ends with the prefix's tokens
    assert chat_model.decode(got[0]["ids"]).rstrip().endswith("mentioned in the provided text is")
    settings = json.loads(exported.with_name(exported.name + ".meta.json").read_text())["settings"]
    assert settings["tasks"] == TASKS and settings["samples"] == 1 and settings["max_new_tokens"] == NEW


def test_peers_refuse_a_prompts_file_without_its_sidecar(tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"example": "x"}\n')
    assert _script("kvpress_peers").main([str(bad), str(tmp_path), "--out", str(tmp_path / "rows.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "is not a whole file written by scripts/export_ruler.py" in err and err.count("\n") == 1
    assert not (tmp_path / "rows.jsonl").exists()


def test_peers_rows_grow_into_more_samples_and_refuse_other_settings(tmp_path, capsys):
    """An export with more --samples (the same prompts first) grows the rows file, keeping its rows; another seed
    is refused, naming what differs."""
    peers = _script("kvpress_peers")
    out = tmp_path / "rows.jsonl"
    def settings(**prompts):
        return {"prompts": "p.jsonl", "prompt_settings": {"samples": 1, "seed": 0, **prompts}, "sink": 4}
    peers.Rows(out, settings()).add({"example": "a/512/0", "method": "full"})
    grown = peers.Rows(out, settings(samples=3))
    assert grown.done == {("a/512/0", "full")} and "growing from 1 to 3 samples" in capsys.readouterr().err
    assert json.loads(out.with_name(out.name + ".meta.json").read_text())["settings"] == settings(samples=3)
    for other in (settings(samples=2), settings(samples=4, seed=1)):  # fewer, or another draw
        with pytest.raises(peers.BadInput, match="prompt_settings differ"):
            peers.Rows(out, other)


@pytest.mark.slow  # ~55 s on this CPU: torch, transformers and kvpress imports in a subprocess, 50 head-scoring forwards
@pytest.mark.skipif(not KVPRESS_PYTHON.exists(), reason=f"no kvpress venv at {KVPRESS_PYTHON} (set KVPRESS_PYTHON)")
def test_torch_full_equals_lt_jax_and_peers_keep_lt_jax_budget(exported, tiny_chat, chat_model, assets, tmp_path):
    """torch's greedy answer without a press == lt-jax's full answer on each exported prompt; DuoAttention and
    SimLayerKV keep exactly lt-jax's prompt KV at 50 %: half the (layer, KV head) units keep S + W tokens."""
    out = tmp_path / "rows.jsonl"
    run = subprocess.run([str(KVPRESS_PYTHON), str(REPO / "scripts" / "kvpress_peers.py"), str(exported),
                          str(tiny_chat), "--out", str(out), "--sink", str(S), "--window", str(W), "--essays",
                          str(assets["essays"]), "--json"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {(r["example"], r["method"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert len(rows) == 3 * len(TASKS)
    for line in map(json.loads, exported.read_text().splitlines()):
        ids = chat_model.generate([line["ids"]], max_new_tokens=NEW)[0]["ids"]
        assert rows[line["example"], "full"]["answer"] == chat_model.decode(ids)
        n = len(line["ids"])
        assert rows[line["example"], "full"]["kv_fraction"] == 1.0
        for method in ("duo", "simlayerkv"):
            assert rows[line["example"], method]["kv_fraction"] == pytest.approx(1 - 0.5 * (1 - (S + W) / n), abs=1e-5)
        assert len(rows[line["example"], "simlayerkv"]["lazy_layers"]) == chat_model.config.num_layers // 2
