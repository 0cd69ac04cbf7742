"""Serving many prompts (`lt_jax.serving`, `lt-jax generate --input`): continuous batching gives every row what a
lone `generate` gives it, compiles per bucket (never per prompt), and the file command resumes and refuses bad
input before the model runs. One tiny converted checkpoint and its compiled functions serve every test."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import lt_jax
from helpers import compile_count
from lt_jax.cache import insert_rows
from lt_jax.cli import main
from lt_jax.inference import decode_chunk, prefill
from lt_jax.serving import _put_row

# Prompt lengths from three buckets whose cache lengths (with budgets <= 64) are fixed: 128, 256, 256.
RANGES = ((5, 64), (65, 128), (129, 192))
STOP = tuple(range(0, 300, 9))  # about one token in nine ends a row: some rows stop early, others run out
PLANS = {"full": {}, "first": dict(sink=2, window=16), "lighttransfer": dict(sink=2, window=16)}


def prompts_and_budgets(seed: int, n: int):
    rng = np.random.default_rng(seed)
    lengths = [int(rng.integers(*RANGES[i % 3], endpoint=True)) for i in range(n)]
    return [rng.integers(0, 300, t).tolist() for t in lengths], [int(b) for b in rng.integers(1, 25, n)]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return lt_jax.load(tiny_ckpt)


# all-full: the same engine without lazy layers (the slow tier; the server tests compare full with generate too)
@pytest.mark.parametrize("spec", [pytest.param(s, marks=pytest.mark.slow) if s == "full" else s for s in PLANS])
def test_stream_rows_equal_lone_generate(model, spec):
    """40 prompts of 5..192 tokens, budgets 1..24 and stop ids, 4 rows at a time: each row's greedy ids, plan and
    ratios equal `generate` of that prompt alone; rows finish out of input order, by stop id and by budget."""
    prompts, budgets = prompts_and_budgets(0, 40)
    flags = PLANS[spec]
    results = list(model.generate_stream(prompts, spec, batch_size=4, max_new_tokens=budgets, stop_ids=STOP,
                                         **flags))
    order = [r["index"] for r in results]
    assert sorted(order) == list(range(40)) and order != sorted(order)
    for r in results:
        i = r["index"]
        (alone,) = model.generate([prompts[i]], spec, max_new_tokens=budgets[i], stop_ids=STOP, **flags)
        assert r["ids"] == alone["ids"], f"prompt {i} ({len(prompts[i])} tokens)"
        assert r["plan"] == alone["plan"] and r["prompt_tokens"] == len(prompts[i])
        stopped = bool(r["ids"]) and r["ids"][-1] in STOP
        assert r["finish_reason"] == ("stop" if stopped else "length")
        assert stopped or len(r["ids"]) == budgets[i]
        if spec == "lighttransfer":
            np.testing.assert_allclose(r["lazy_ratios"], alone["lazy_ratios"], rtol=0, atol=1e-6)
        else:
            assert "lazy_ratios" not in r
    assert {r["finish_reason"] for r in results} == {"stop", "length"}
    if spec == "lighttransfer":  # rows of different lazy sets were served (each in a batch of its own set)
        assert len({r["plan"].lazy_layers for r in results}) > 1
    if spec == "first":
        assert results[0]["plan"].lazy_layers == (0, 1)


def test_sampled_rows_equal_lone_generate(model):
    """Every row has its own key, split as a lone `generate` splits its own: sampled rows do not depend on the
    batch they share."""
    prompts, budgets = prompts_and_budgets(1, 8)
    settings = dict(temperature=1.0, top_k=50, top_p=0.95, seed=7)
    for r in model.generate_stream(prompts, "first", batch_size=3, max_new_tokens=budgets, sink=2, window=16,
                                   sampling=lt_jax.Sampling(max_new_tokens=24, **settings)):
        i = r["index"]
        (alone,) = model.generate([prompts[i]], "first", max_new_tokens=budgets[i], sink=2, window=16, **settings)
        assert r["ids"] == alone["ids"], f"prompt {i}"


def test_one_cache_for_all_lengths(model):
    """group_by_length=False: every bucket's prompts share one cache sized for the longest; rows still equal a
    lone generate."""
    prompts, budgets = prompts_and_budgets(5, 12)
    results = list(model.generate_stream(prompts, "first", batch_size=4, max_new_tokens=budgets, stop_ids=STOP,
                                         group_by_length=False, **PLANS["first"]))
    assert sorted(r["index"] for r in results) == list(range(12))
    for r in results:
        i = r["index"]
        (alone,) = model.generate([prompts[i]], "first", max_new_tokens=budgets[i], stop_ids=STOP, **PLANS["first"])
        assert r["ids"] == alone["ids"], f"prompt {i}"


def test_compile_count_does_not_grow_with_prompts(model):
    """After one run, more and other prompts of the same buckets (fixed and selecting plans) compile nothing."""
    fns = (prefill, decode_chunk, insert_rows, _put_row)

    def run(seed, n):
        prompts, budgets = prompts_and_budgets(seed, n)
        for spec in ("first", "lighttransfer"):
            rows = list(model.generate_stream(prompts, spec, batch_size=4, max_new_tokens=budgets, stop_ids=STOP,
                                              **PLANS[spec]))
            assert len(rows) == n
    run(2, 12)
    before = [compile_count(f) for f in fns]
    assert all(before)
    run(3, 30)
    assert [compile_count(f) for f in fns] == before


# ---- lt-jax generate --input / --output --------------------------------------------------------------------

GEN = ["--batch-size", "3", "--max-new-tokens", "10", "--plan", "first", "--sink", "2", "--window", "16"]


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    prompts, budgets = prompts_and_budgets(4, 12)
    path = tmp_path_factory.mktemp("serve") / "prompts.jsonl"
    lines = [json.dumps({"id": f"q{i}", "ids": p, **({"max_new_tokens": b} if i % 3 == 0 else {})})
             for i, (p, b) in enumerate(zip(prompts, budgets))]
    path.write_text("\n".join(lines[:6]) + "\n\n" + "\n".join(lines[6:]) + "\n")  # a blank line is no record
    return path, prompts, budgets


def generate(ckpt, src, out, *extra):
    return main(["generate", str(ckpt), "--input", str(src), "--output", str(out), *GEN, *extra, "--json"])


def rows_of(path):
    assert json.loads(Path(f"{path}.meta.json").read_text())["written_by"] == "lt-jax generate"
    return {r["index"]: r for r in map(json.loads, path.read_text().splitlines())}  # every line a row


@pytest.fixture(scope="module")
def clean(tiny_ckpt, requests, tmp_path_factory):
    src, _, _ = requests
    out = tmp_path_factory.mktemp("clean") / "out.jsonl"
    assert generate(tiny_ckpt, src, out) == 0
    return out


def test_cli_writes_one_row_per_prompt(model, requests, clean):
    _, prompts, budgets = requests
    rows = rows_of(clean)
    assert sorted(rows) == list(range(12))
    for i, row in rows.items():
        assert row["id"] == f"q{i}" and row["prompt_tokens"] == len(prompts[i])
        assert row["new_tokens"] == len(row["ids"]) and row["text"] is None
        assert row["plan"]["lazy_layers"] == [0, 1] and row["finish_reason"] in ("stop", "length")
        budget = budgets[i] if i % 3 == 0 else 10
        (alone,) = model.generate([prompts[i]], "first", max_new_tokens=budget, sink=2, window=16)
        assert row["ids"] == alone["ids"]


def test_cli_resumes_a_killed_run(tiny_ckpt, requests, clean, tmp_path, capsys):
    """A run of an earlier version (the settings as a first line {"meta": ...}) killed after 5 rows and in the
    middle of the 6th: the rerun converts it to rows and sidecar, drops the half line and writes exactly the 7
    missing rows; the file then equals a clean run's rows."""
    src, _, _ = requests
    out = tmp_path / "out.jsonl"
    lines = clean.read_text().splitlines(keepends=True)
    settings = json.loads(Path(f"{clean}.meta.json").read_text())["settings"]
    out.write_text(json.dumps({"meta": settings}) + "\n" + "".join(lines[:5]) + lines[5][:len(lines[5]) // 2])
    capsys.readouterr()
    assert generate(tiny_ckpt, src, out) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert (summary["rows"], summary["skipped"]) == (7, 5)
    assert "moving its settings line to out.jsonl.meta.json and dropping an incomplete last row" in captured.err
    assert len(out.read_text().splitlines()) == 12  # no settings line, no duplicate
    assert rows_of(out) == rows_of(clean)
    assert generate(tiny_ckpt, src, out) == 0  # complete: nothing to do
    assert json.loads(capsys.readouterr().out)["rows"] == 0
    before = out.read_bytes()
    assert generate(tiny_ckpt, src, out, "--temperature", "0.5") == 2  # other settings: refused, file untouched
    err = capsys.readouterr().err
    assert "other settings (sampling.temperature: the file has 0.0, this run 0.5)" in err
    assert len(err.strip().splitlines()) == 1
    assert out.read_bytes() == before


@pytest.mark.parametrize("bad, line", [
    ('{"ids": [1, 2, 3]}\n{"ids": [1, 2\n', 2),  # malformed JSON
    ('{"ids": [1, 2, 3]}\n\n{"id": 7, "text": "neither"}\n', 3),  # no prompt, messages or ids
    ('{"ids": [4, 5]}\n{"ids": [1, 2], "prompt": "both"}\n', 2),
    ('{"ids": [4, 5], "max_new_tokens": 0}\n', 1),
    ('{"ids": [4, 5]}\n{"ids": [4, 300]}\n', 2),  # outside the vocabulary
    ('{"ids": [4, 5]}\n{"prompt": "no tokenizer"}\n', 2),
    ('{"ids": [4, 5]}\n{"ids": ' + json.dumps([3] * 1020) + '}\n', 2),  # 1020 + 10 > the context of 1024
])
def test_cli_bad_input_names_file_and_line(tiny_ckpt, tmp_path, capsys, bad, line):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(bad)
    assert generate(tiny_ckpt, src, out) == 2
    err = capsys.readouterr().err.strip()
    assert f"{src} line {line}" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_cli_output_needs_input(tiny_ckpt, tmp_path, capsys):
    assert main(["generate", str(tiny_ckpt), "--ids", "1 2", "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "--input and --output go together" in capsys.readouterr().err
    assert main(["generate", str(tiny_ckpt), "--ids", "1 2", "--input", str(tmp_path / "i.jsonl")]) == 2


def test_cli_on_two_processes_with_a_mesh(tiny_ckpt, requests, clean, tmp_path):
    """Two jax.distributed processes of 4 CPU devices, --mesh data=8 (each process's batch split over its 4
    devices): every prompt served once, by one process, and the merged file holds a clean one-process run's rows
    (ordered by index); no part file is left."""
    import os
    import socket
    import subprocess
    import sys
    from conftest import REPO, last_json
    src, _, _ = requests
    out = tmp_path / "out.jsonl"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen([sys.executable, "-m", "lt_jax.cli", "generate", str(tiny_ckpt), "--input", str(src),
                               "--output", str(out), *GEN, "--batch-size", "4", "--json", "--mesh", "data=8",
                               "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert [last_json(o)["rows"] for o, _ in outputs] == [6, 6]
    lines = out.read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == list(range(12))
    assert rows_of(out) == rows_of(clean)
    assert not list(tmp_path.glob("out.jsonl.part-*"))


def test_cli_resumes_after_sigkill(tiny_ckpt, tmp_path):
    """A real kill (SIGKILL) of `generate --input` after a few rows, then a rerun: every prompt exactly once,
    and the rows are a clean run's."""
    import os
    import subprocess
    import sys
    from conftest import REPO, sigkill_when
    prompts, _ = prompts_and_budgets(7, 30)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "ids": p}) + "\n" for i, p in enumerate(prompts)))
    flags = ["--batch-size", "4", "--max-new-tokens", "120", "--stop-ids", "-1", "--json"]
    out, clean = tmp_path / "out.jsonl", tmp_path / "clean.jsonl"
    cmd = [sys.executable, "-m", "lt_jax.cli", "generate", str(tiny_ckpt), "--input", str(src), *flags]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([*cmd, "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    killed = sigkill_when(proc, lambda: out.exists() and len(out.read_text().splitlines()) >= 3)
    kept = len(out.read_text().splitlines())
    assert killed and 3 <= kept < 30, "not killed mid-run"
    assert main(["generate", str(tiny_ckpt), "--input", str(src), "--output", str(out), *flags]) == 0
    assert main(["generate", str(tiny_ckpt), "--input", str(src), "--output", str(clean), *flags]) == 0
    indices = [json.loads(line)["index"] for line in out.read_text().splitlines()]
    assert sorted(indices) == list(range(30))  # none missing, none twice
    assert rows_of(out) == rows_of(clean)


def test_cli_refuses_a_foreign_output_before_loading(requests, tmp_path, capsys):
    """An --output that is not a results file (the user's notes) is refused, named, and left as it was; the check
    runs before the model loads (the model path here does not even exist)."""
    src, _, _ = requests
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nlast line without newline")
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "no-model"), "--input", str(src), "--output", str(notes)]) == 2
    err = capsys.readouterr().err
    assert f"--output {notes} exists and is not a results file of lt-jax generate" in err and err.count("\n") == 1
    assert notes.read_text() == "my notes\nlast line without newline"
