"""`lt-jax eval`: task builders on the real tokenizer, the shared-prefill runner against the model's own paths,
resume after a killed run, summaries, and bad input. The runner tests use a tiny random llama that carries
SmolLM2's tokenizer (compile time, not model size, dominates here)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, sigkill_when
from lt_jax import needles as tasks
from lt_jax.eval import evaluate
from lt_jax.cli import main

ESSAY = "addiction.txt"
TINY_ARGS = ["--lengths", "300,400", "--depths", "0.2,0.8", "--samples", "2", "--sink", "4", "--window", "64",
             "--max-new-tokens", "4", "--methods", "full,lighttransfer,streaming,last"]


@pytest.fixture(scope="module")
def smol_tokenized(assets):
    import lt_jax
    return lt_jax.load(assets["smollm2"])


@pytest.fixture(scope="module")
def essay_ids(assets, smol_tokenized):
    return smol_tokenized.encode((Path(assets["essays"]) / ESSAY).read_text())


# ---- task builders (real tokenizer) ----------------------------------------------------------------------

@pytest.mark.parametrize("depth", [0.0, 0.3, 0.9])
def test_niah_multikey_places_the_asked_needle_at_its_depth(smol_tokenized, essay_ids, depth):
    model = smol_tokenized
    ids, value = tasks.niah_prompt(model, essay_ids, 1500, depth, np.random.default_rng(7), keys=4)
    assert 1500 - 6 <= len(ids) <= 1500
    text = model.decode(ids)
    sentences = re.findall(r"One of the special magic numbers for [a-z]+-[a-z]+ is: \d{7}\.", text)
    assert len(sentences) == 4 and len(set(sentences)) == 4  # the asked needle and three distractors
    asked = text.split("What is the special magic number for ")[1].split(" mentioned")[0]
    sentence = tasks.KEYED_NEEDLE.format(key=asked, value=value)
    assert sentence in sentences and text.rstrip().endswith(tasks.KEYED_ANSWER_PREFIX.format(key=asked))
    assert sum(s.count(value) for s in sentences) == 1  # the value appears only in its own sentence
    body = text[:text.index("What is the special magic number for")]
    before = body[:body.index(sentence)]
    for s in sentences:  # depth is measured in haystack characters, without the needles
        body, before = body.replace(s, ""), before.replace(s, "")
    assert abs(len(before) / len(body) - depth) < 0.03


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_length_and_depth(smol_tokenized, depth):
    model = smol_tokenized
    ids = tasks.passkey_prompt(model, 2000, depth, 48213)
    filler = len(model.encode(" " + tasks.PASSKEY_FILLER))
    assert 2000 - filler <= len(ids) <= 2000
    text = model.decode(ids)
    line = tasks.PASSKEY_LINE.format(key=48213)
    before, after = text.split(line)
    n_before, n_after = before.count(tasks.PASSKEY_FILLER), after.count(tasks.PASSKEY_FILLER)
    assert abs(n_before / (n_before + n_after) - depth) < 0.02
    assert text.startswith(tasks.PASSKEY_TASK) and text.endswith(tasks.PASSKEY_QUESTION)


def test_retrieval_examples_are_deterministic(smol_tokenized, essay_ids):
    """The same settings give the same prompts, and more samples add prompts after the same ones (what lets a rerun
    with more --samples grow a result: `Retrieval.grows`)."""
    task = evaluate.Retrieval("passkey", [256], [0.5], 2)
    a, b = list(task.examples(smol_tokenized)), list(task.examples(smol_tokenized))
    assert [e.ids for e in a] == [e.ids for e in b] and a[0].target != a[1].target
    for name, haystack in (("passkey", None), ("niah", [smol_tokenized.decode(essay_ids[:3000])])):
        few, more = (list(evaluate.Retrieval(name, [256, 300], [0.2, 0.8], n, haystack=haystack)
                          .examples(smol_tokenized)) for n in (1, 3))
        assert task.grows and len(more) == 3 * len(few)
        assert {e.id: (e.ids, e.target) for e in few}.items() <= {e.id: (e.ids, e.target) for e in more}.items()
    assert task.score(a[0], f" {a[0].target}. Remember") == 1.0 and task.score(a[0], " 12.") == 0.0


# ---- runner ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tiny_chat):
    import lt_jax
    return lt_jax.load(tiny_chat)


def test_shared_prefill_rows_equal_each_plans_own_generate(tiny_model, essay_ids, tmp_path):
    """Every method's answer from the one shared prefill == `Model.generate` under that (chosen) plan."""
    model = tiny_model
    task = evaluate.Retrieval("niah", [400], [0.5], 1, max_new_tokens=6, haystack=[model.decode(essay_ids)])
    plans = {m: model.plan(m, sink=4, window=64) for m in ("full", "lighttransfer", "streaming", "first")}
    plans["hybrid"] = model.plan("last", sink=4, window=64, prefill="hybrid")
    rows = evaluate.run(model, task, plans, tmp_path / "r.jsonl", {"t": 1}, progress=False)
    (example,) = task.examples(model)
    assert len(rows) == 5
    for row in rows:
        plan = plans[row["method"]]
        want = model.generate([example.ids], plan=plan, max_new_tokens=6)[0]
        assert row["answer"] == want["text"], row["method"]
        assert row["lazy_layers"] == list(want["plan"].lazy_layers)  # lighttransfer: top-k == the queue's choice
    assert len(next(r for r in rows if r["method"] == "lighttransfer")["ratios"]) == 4
    answers = {r["method"]: r["answer"] for r in rows}
    assert answers["full"] != answers["streaming"], answers  # the weights let plans differ: the test can fail


def test_ppl_rows_equal_model_perplexity(tiny_model, essay_ids, tmp_path):
    model = tiny_model
    text = model.decode(essay_ids)
    task = evaluate.Perplexity(300, 100, 2, [text])
    plans = {m: model.plan(m, sink=4, window=64) for m in ("full", "lighttransfer", "random:3")}
    rows = evaluate.run(model, task, plans, tmp_path / "p.jsonl", {"t": 1}, progress=False)
    summary = evaluate.summarize(task, rows, list(plans))
    for name, plan in plans.items():
        nll, n = 0.0, 0
        for example in task.examples(model):
            got = model.perplexity(example.ids, plan=plan, prefix=300)
            nll, n = nll + got["nll"] * got["tokens"], n + got["tokens"]
        assert n == 200
        np.testing.assert_allclose(summary["methods"][name]["average"], np.exp(nll / n), rtol=1e-5)
    assert "| full |" in evaluate.markdown(task, summary) and "+0.00%" in evaluate.markdown(task, summary)


def _eval_cmd(model_dir, out, extra=()):
    return [sys.executable, "-m", "lt_jax.cli", "eval", str(model_dir), "--task", "niah", "--out", str(out),
            "--json", *TINY_ARGS, *extra]


@pytest.mark.slow  # SIGKILL resume stays in test_serving; the repair rules in tests/unit/test_records.py
def test_resume_after_a_killed_run(tiny_chat, tmp_path):
    """Kill the process mid-run (SIGKILL), leave a half-written row behind, rerun: no row lost or doubled, and the
    summary equals that of an uninterrupted run."""
    out = tmp_path / "niah.jsonl"
    total = 2 * 2 * 2 * 4
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(_eval_cmd(tiny_chat, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    killed = sigkill_when(proc, lambda: out.exists() and len(out.read_text().splitlines()) >= 5)
    written = out.read_text().splitlines()
    assert killed and 5 <= len(written) < total, "not killed mid-run"
    with open(out, "a") as f:
        f.write('{"example": "300/0.2/0", "method": "fu')  # what a kill during a write leaves
    resumed = subprocess.run(_eval_cmd(tiny_chat, out), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "dropping an incomplete last row" in resumed.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # every line a row (the settings: a sidecar)
    assert rows[:len(written)] == [json.loads(line) for line in written]  # kept as they were
    assert len(rows) == total and len({(r["example"], r["method"]) for r in rows}) == total
    again = tmp_path / "again.jsonl"
    fresh = subprocess.run(_eval_cmd(tiny_chat, again), capture_output=True, text=True, env=env)
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads(resumed.stdout)["summary"] == json.loads(fresh.stdout)["summary"]
    by_key = lambda path: {(r["example"], r["method"]): (r["answer"], r["score"], r["lazy_layers"])  # noqa: E731
                           for r in map(json.loads, path.read_text().splitlines())}
    fresh_rows = by_key(again)
    assert by_key(out) == fresh_rows  # row by row, not only the summary
    assert len({answer for answer, _, _ in fresh_rows.values()}) > 1  # answers differ across methods/examples
    rerun = subprocess.run(_eval_cmd(tiny_chat, out), capture_output=True, text=True, env=env)  # nothing left
    assert rerun.returncode == 0 and len(out.read_text().splitlines()) == total
    assert "already complete (32 rows)" in rerun.stderr and "0run" not in rerun.stderr


def test_eval_plots_and_table(tiny_chat, tmp_path, capsys):
    out, plot, ratio_plot = tmp_path / "r.jsonl", tmp_path / "heat.png", tmp_path / "ratios.png"
    capsys.readouterr()
    assert main(["eval", str(tiny_chat), "--task", "passkey", "--out", str(out), "--plot", str(plot),
                 "--ratio-plot", str(ratio_plot), *TINY_ARGS[:8], "--max-new-tokens", "3"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0] == ("| method | passkey 300 | passkey 400 | average | vs full (95 % CI) "
                                     "| examples |")
    assert len(table.splitlines()) == 2 + 3  # full, lighttransfer, streaming (the default methods)
    assert plot.read_bytes()[:4] == b"\x89PNG" and ratio_plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["--task", "niah", "--methods", "full,bogus"], "unknown plan 'bogus'"),
    (["--task", "niah", "--methods", "full,full"], "names a method twice"),
    (["--task", "niah", "--depths", "0.5,1.5"], "--depths must lie in [0, 1]"),
    (["--task", "niah", "--lengths", "4k"], "--lengths must be a comma-separated list of int"),
    (["--task", "passkey", "--lengths", "4096"], "--lengths 4096 exceeds the model's context of 2048 tokens"),
    (["--task", "longbench"], "--task longbench needs --data"),
    (["--task", "longbench", "--data", "/no/such/hotpotqa.jsonl"], "/no/such/hotpotqa.jsonl"),
    (["--task", "niah", "--out", "/no/such/dir/r.jsonl"], "cannot write --out /no/such/dir/r.jsonl"),
    (["--task", "niah", "--samples", "0"], "argument --samples: must be at least 1, got 0"),  # was: 2 samples
    (["--task", "passkey", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1"),  # was: 16
    (["--task", "ppl", "--samples", "0"], "argument --samples: must be at least 1, got 0"),
])
def test_bad_input_is_one_clear_sentence(tiny_chat, tmp_path, capsys, argv, message):
    capsys.readouterr()
    code = main(["eval", str(tiny_chat), *argv] + ([] if "--out" in argv else ["--out", str(tmp_path / "x.jsonl")]))
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.jsonl").exists()


def test_unknown_task_and_foreign_results_file(tiny_chat, tmp_path, capsys):
    capsys.readouterr()
    assert main(["eval", str(tiny_chat), "--task", "mmlu"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'mmlu'" in err and err.count("\n") == 1  # one line, no usage block
    out = tmp_path / "r.jsonl"
    out.write_text('{"meta": {"task": "niah", "settings": {}}}\n')
    assert main(["eval", str(tiny_chat), "--task", "niah", "--out", str(out), *TINY_ARGS]) == 2
    assert "holds results made with other settings" in capsys.readouterr().err
    out.write_text("not json\n")
    assert main(["eval", str(tiny_chat), "--task", "niah", "--out", str(out), *TINY_ARGS]) == 2
    assert f"--out {out} exists and is not a results file of lt-jax eval" in capsys.readouterr().err
    # A file that is not ours, whose last line has no newline: refused, and left byte for byte as it was (the
    # repair of a killed run's last row must not run before the file is known to be a results file).
    for text in ("my notes\nlast line without newline", '{"a": 1}\n{"b": 2}', "no newline at all"):
        out.write_text(text)
        assert main(["eval", str(tiny_chat), "--task", "niah", "--out", str(out), *TINY_ARGS]) == 2
        assert out.read_text() == text, text
        capsys.readouterr()


@pytest.mark.slow  # LongBench's metrics stay in test_longbench.py
def test_longbench_end_to_end(tiny_chat, tmp_path, capsys):
    """LongBench's fixtures: chat template only where LongBench applies one, middle truncation to --max-length,
    every row scored by the official metric, one table column per dataset."""
    import lt_jax
    from lt_jax.eval import longbench
    data = REPO / "tests" / "data" / "longbench"
    model = lt_jax.load(tiny_chat)
    task = evaluate.LongBench(sorted(data.glob("*.jsonl")), max_length=120, limit=2)
    examples = {e.id.split("/")[0]: e for e in task.examples(model)}
    template = model.chat_ids("")
    for name, example in examples.items():
        ds, record = example.target
        assert (example.ids[:3] == template[:3]) == ds.chat, name  # trec and lcc: no chat template
        raw = model.tokenizer(longbench.prompt_text(ds, record), add_special_tokens=False)["input_ids"]
        budget = 120 - ds.max_new_tokens - len(template) - 8
        assert len(example.ids) <= min(len(raw), budget) + len(template) + 4
    capsys.readouterr()
    out = tmp_path / "lb.jsonl"
    assert main(["eval", str(tiny_chat), "--task", "longbench", "--data", str(data), "--limit", "2", "--max-length",
                 "120", "--methods", "full,streaming", "--sink", "4", "--window", "16", "--out", str(out),
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["summary"]["columns"] == sorted(examples)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * sum(min(2, len(longbench.load(f)[1])) for f in data.glob("*.jsonl"))
    by_id = {f"{ds.name}/{r.get('_id', i)}": (ds, r) for f in data.glob("*.jsonl")
             for ds, records in [longbench.load(f)] for i, r in enumerate(records)}
    for row in rows:
        ds, record = by_id[row["example"]]
        assert row["score"] == longbench.score(ds, row["answer"], record)
    mean = {c: 100 * np.mean([r["score"] for r in rows if r["method"] == "full" and r["cell"]["dataset"] == c])
            for c in got["summary"]["columns"]}
    assert got["summary"]["methods"]["full"]["average"] == pytest.approx(np.mean(list(mean.values())))


def test_malformed_longbench_line_names_file_and_line(tiny_chat, tmp_path, capsys):
    data = tmp_path / "hotpotqa.jsonl"
    good = (REPO / "tests" / "data" / "longbench" / "hotpotqa.jsonl").read_text().splitlines()[0]
    data.write_text(good + "\n{\"input\": \"half a record\n")
    capsys.readouterr()
    assert main(["eval", str(tiny_chat), "--task", "longbench", "--data", str(data), "--out",
                 str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{data} line 2 is not valid JSON" in err and err.count("\n") == 1
    assert not (tmp_path / "r.jsonl").exists()


def test_ruler_end_to_end_and_resume(tiny_chat, tiny_model, assets, tmp_path, capsys):
    """`--task ruler:TASKS`: every method on the same generated prompts, each row scored by string_match_all
    against its prompt's answers, one summary column per task, each method beside full; a rerun with one more method
    adds only its rows, one with more --samples only the new prompts' rows, one with another seed is refused."""
    from lt_jax.eval import ruler
    out = tmp_path / "ruler.jsonl"
    argv = ["eval", str(tiny_chat), "--task", "ruler:niah_single_1,fwe", "--lengths", "512", "--samples", "1",
            "--max-new-tokens", "4", "--sink", "4", "--window", "64", "--out", str(out), "--json"]
    capsys.readouterr()
    assert main([*argv, "--methods", "full,streaming"]) == 0
    before = out.read_text()
    assert main([*argv, "--methods", "full,streaming,lighttransfer"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out.read_text().startswith(before)  # the first run's rows kept as they were
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * 3 and len({(r["example"], r["method"]) for r in rows}) == 6
    texts = [p.read_text() for p in sorted(Path(assets["essays"]).glob("*.txt"))]
    task = evaluate.Ruler(["niah_single_1", "fwe"], [512], 1, max_new_tokens=4, haystack=texts)
    answers = {e.id: e.target for e in task.examples(tiny_model)}
    assert sorted(answers) == sorted({r["example"] for r in rows})
    for row in rows:
        assert row["target"] == answers[row["example"]]
        assert row["score"] == ruler.string_match_all(ruler.postprocess(row["answer"]), row["target"])
    summary = got["summary"]
    assert summary["columns"] == ["fwe", "niah_single_1"] and got["settings"]["tasks"] == ["niah_single_1", "fwe"]
    for method, cells in summary["methods"].items():
        mine = [r for r in rows if r["method"] == method]
        for column in summary["columns"]:
            want = 100 * np.mean([r["score"] for r in mine if r["cell"]["task"] == column])
            assert cells[column] == pytest.approx(want)
        assert cells["average"] == pytest.approx(np.mean([cells[c] for c in summary["columns"]]))
        if method != "full":  # the difference of the averages (its interval: tests/unit/test_paired.py)
            vs = cells["vs_full"]
            assert vs["delta"] == pytest.approx(cells["average"] - summary["methods"]["full"]["average"])
            assert vs["ci95"][0] <= vs["delta"] <= vs["ci95"][1] and vs["examples"] == 2
    assert "vs_full" not in summary["methods"]["full"]
    assert got["table"].splitlines()[0] == ("| method | ruler fwe | ruler niah_single_1 | average | vs full (95 % CI) "
                                            "| examples |")
    before = out.read_text()
    samples = argv.index("--samples") + 1
    grown = [*argv[:samples], "2", *argv[samples + 1:], "--methods", "full,streaming,lighttransfer"]
    assert main(grown) == 0
    captured = capsys.readouterr()
    assert "growing its 6 rows" in captured.err and "settings.samples: the file has 1, this run 2" in captured.err
    assert out.read_text().startswith(before)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 * 3 and len({(r["example"], r["method"]) for r in rows}) == 12
    task = evaluate.Ruler(["niah_single_1", "fwe"], [512], 2, max_new_tokens=4, haystack=texts)
    answers = {e.id: e.target for e in task.examples(tiny_model)}  # sample 0 as drawn with --samples 1
    assert sorted(answers) == sorted({r["example"] for r in rows})
    assert all(r["target"] == answers[r["example"]] for r in rows)
    assert json.loads(captured.out.strip().splitlines()[-1])["summary"]["methods"]["full"]["examples"] == 4
    assert main([*grown[:-2], "--seed", "1", "--methods", "full"]) == 2
    assert "settings.seed: the file has 0, this run 1" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["eval", str(tiny_chat), "--task", "ruler:niah_single_1,qa_1", "--out", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "ruler tasks must be distinct names among" in err and err.count("\n") == 1
