"""The lm-evaluation-harness model `lt-jax` (`lt_jax.lm_eval_model`) on local tasks (task YAMLs over JSONL written
here; lm-eval's own tasks need the network): under `full` its per-request loglikelihoods equal lm-eval's own `hf`
model (transformers, fp32) within 1e-4 with the same accuracy, rolling loglikelihoods too, and `generate_until`
answers equal `Model.generate` cut at the stop string."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
import lm_eval.models  # noqa: E402,F401 - registers lm-eval's own models (hf)

import lt_jax  # noqa: E402
from lt_jax.lm_eval_model import LtJaxLM, cut_at  # noqa: E402

WORDS = ["sea", "boat", "harbour", "keeper", "light", "gull", "tide", "sail", "rock", "wind", "morning", "grey"]


def write_tasks(folder):
    rng = np.random.default_rng(0)
    mc, gen, text = [], [], []
    for i in range(6):
        words = rng.choice(WORDS, 4, replace=False).tolist()
        mc.append({"question": f"The {words[0]} and the {words[1]} met the", "choices": words[1:] + ["sea wall"],
                   "answer": int(rng.integers(0, 4))})
        gen.append({"question": f"Item {i}: the {words[2]} is", "answer": words[3]})
        text.append({"text": " ".join(rng.choice(WORDS, 30).tolist()) + "."})
    for name, rows in (("mc", mc), ("gen", gen), ("text", text)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "lt_mc.yaml").write_text(
        f"task: lt_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "lt_gen.yaml").write_text(
        f"task: lt_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (folder / "lt_text.yaml").write_text(
        f"task: lt_text\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'text.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: '{{text}}'\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n")


def evaluate(model, model_args, tasks, folder):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    return simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                           task_manager=TaskManager(include_path=str(folder)), batch_size=4)


def responses(out, task):
    return {s["doc_id"]: s["filtered_resps"] for s in out["samples"][task]}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, monkeypatch_module):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    write_tasks(folder)
    return folder


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield mp


@pytest.mark.slow
def test_loglikelihoods_equal_hf(tiny_chat, tasks):
    """Per request (every choice of every question, every rolling text) within 1e-4 of lm-eval's `hf` model, the
    same is_greedy flags and the same accuracy."""
    ours = evaluate("lt-jax", f"pretrained={tiny_chat},plan=full", ["lt_mc", "lt_text"], tasks)
    theirs = evaluate("hf", f"pretrained={tiny_chat},dtype=float32,device=cpu", ["lt_mc", "lt_text"], tasks)
    worst = 0.0
    for task in ("lt_mc", "lt_text"):
        a, b = responses(ours, task), responses(theirs, task)
        assert a.keys() == b.keys() and len(a) == 6
        for doc in a:
            for x, y in zip(a[doc], b[doc], strict=True):
                x, y = (x, y) if task == "lt_mc" else ((x, None), (y, None))
                worst = max(worst, abs(float(x[0]) - float(y[0])))
                assert x[1] == y[1]
    print(f"[lm-eval parity] largest |lt-jax - hf| loglikelihood: {worst:.2e}")
    assert worst < 1e-4, worst
    assert ours["results"]["lt_mc"]["acc,none"] == theirs["results"]["lt_mc"]["acc,none"]


@pytest.mark.slow
def test_generate_until_equals_generate(tiny_chat, tasks):
    """Answers under a lazy plan are `Model.generate`'s text cut at the stop string."""
    model = lt_jax.load(tiny_chat)
    lm = LtJaxLM(model=model, plan="first", window=16, sink=2, batch_size=3)
    out = evaluate(lm, None, ["lt_gen"], tasks)
    docs = [json.loads(line) for line in (tasks / "gen.jsonl").read_text().splitlines()]
    got = responses(out, "lt_gen")
    for i, doc in enumerate(docs):
        ids = model.tokenizer.encode(doc["question"])
        (alone,) = model.generate([ids], lm.plan, max_new_tokens=6)
        assert got[i][0] == cut_at(alone["text"], ["."])


@pytest.mark.slow
def test_local_completions_against_lt_jax_serve_equal_native(tiny_chat, tasks):
    """lm-eval's `local-completions` (echo logprobs over HTTP) against `lt-jax serve` gives the native model's
    loglikelihoods."""
    import socket
    import threading
    import time

    import uvicorn

    from lt_jax.server import build_app
    model = lt_jax.load(tiny_chat)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(model, "full", name="tiny"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        served = evaluate("local-completions", f"base_url=http://127.0.0.1:{port}/v1/completions,model=tiny,"
                                               f"tokenizer={tiny_chat},tokenized_requests=True,max_retries=1",
                          ["lt_mc"], tasks)
    finally:
        server.should_exit = True
        thread.join(60)
    native = evaluate(LtJaxLM(model=model, plan="full"), None, ["lt_mc"], tasks)
    a, b = responses(served, "lt_mc"), responses(native, "lt_mc")
    assert a.keys() == b.keys() and len(a) == 6
    for doc in a:
        for x, y in zip(a[doc], b[doc], strict=True):
            assert abs(float(x[0]) - float(y[0])) < 1e-4 and x[1] == y[1]


@pytest.mark.slow
def test_cli_writes_the_results_of_the_model_class(tiny_chat, tasks, tmp_path, capsys):
    """`lt-jax lm-eval` on local tasks: lm-eval's results JSON, the same metrics as the class evaluated directly;
    an unknown task is one sentence before any work."""
    from lt_jax.cli.main import main
    out = tmp_path / "results.json"
    argv = ["lm-eval", str(tiny_chat), "--tasks", "lt_mc", "--include-path", str(tasks), "--plan", "first",
            "--batch-size", "4"]
    assert main(argv + ["--output", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    direct = evaluate(LtJaxLM(model=lt_jax.load(tiny_chat), plan="first", batch_size=4), None, ["lt_mc"], tasks)
    assert written["results"]["lt_mc"]["acc,none"] == printed["results"]["lt_mc"]["acc,none"] \
        == direct["results"]["lt_mc"]["acc,none"]
    capsys.readouterr()
    assert main(["lm-eval", str(tiny_chat), "--tasks", "no_such_task", "--include-path", str(tasks)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_task" in err, err


BUILT_TASK = """task: lt_built
dataset_path: ""
dataset_name: ""
test_split: test
custom_dataset: !function built.make
output_type: multiple_choice
doc_to_text: '{{question}}'
doc_to_choice: '{{choices}}'
doc_to_target: '{{answer}}'
metric_list:
  - metric: acc
"""

BUILT_DATA = """import json, os
import datasets


def make(**metadata):  # what a task that builds its data (RULER) is given; kept for the test to read
    with open(os.path.join(os.path.dirname(__file__), "metadata.json"), "w") as f:
        json.dump({k: v for k, v in metadata.items() if k in ("tokenizer", "max_seq_lengths")}, f)
    rows = [{"question": f"{n} tokens:", "choices": ["sea", "boat"], "answer": 0} for n in metadata["max_seq_lengths"]]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
"""


@pytest.mark.slow
def test_cli_passes_the_tokenizer_and_metadata_to_tasks_that_build_their_data(tiny_chat, tmp_path, capsys):
    """RULER's tasks build their prompts from the task metadata (`tokenizer`, `max_seq_lengths`): `lt-jax lm-eval`
    passes the model's tokenizer folder and `--metadata`; a --metadata that is not a JSON object is refused."""
    from lt_jax.cli.main import main
    folder = tmp_path / "built"
    folder.mkdir()
    (folder / "lt_built.yaml").write_text(BUILT_TASK)
    (folder / "built.py").write_text(BUILT_DATA)
    argv = ["lm-eval", str(tiny_chat), "--tasks", "lt_built", "--include-path", str(folder), "--json"]
    assert main(argv + ["--metadata", '{"max_seq_lengths": [512, 1024]}']) == 0
    assert json.loads(capsys.readouterr().out)["results"]["lt_built"]["acc,none"] in (0.0, 0.5, 1.0)
    seen = json.loads((folder / "metadata.json").read_text())
    assert seen == {"tokenizer": str(lt_jax.load(tiny_chat).tokenizer.name_or_path), "max_seq_lengths": [512, 1024]}
    assert Path(seen["tokenizer"]).resolve() == Path(tiny_chat).resolve()
    assert main(argv + ["--metadata", "[4096]"]) == 2
    assert "is not a JSON object" in capsys.readouterr().err
