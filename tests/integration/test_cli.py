"""The command line as a new user meets it: flags checked before any model loads, one clear sentence per bad
input, nothing of the user's overwritten, results written before optional figures, short human output, progress
and notes on stderr, and the paths a user relies on (text prompts, chat, presets, plan files in --methods,
eval --task ppl, --keys, bench) run end to end."""
import json
import os
import stat
from pathlib import Path

import pytest

from lt_jax.cli import build_parser, main

MISSING = "/no/such/model"


def run(capsys, *argv):
    capsys.readouterr()
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("text") / "t.txt"
    f.write_text("The sea is wide and deep. " * 40)
    return f


@pytest.mark.parametrize("argv, words", [
    (["generate", MISSING, "--ids", "1", "--temperature", "-1"], "argument --temperature: must be >= 0, got -1"),
    (["generate", MISSING, "--ids", "1", "--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
    (["generate", MISSING, "--ids", "1", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1"),
    (["generate", MISSING, "--ids", "1", "--lazy-fraction", "1.5"], "argument --lazy-fraction: must be in [0, 1]"),
    (["generate", MISSING, "--ids", "1", "--window", "0"], "argument --window: must be at least 1, got 0"),
    (["ppl", MISSING, "--ids-file", "x", "--max-tokens", "0"], "argument --max-tokens: must be at least 1, got 0"),
    (["ppl", MISSING, "--ids-file", "x", "--max-tokens", "-5"], "argument --max-tokens: must be at least 1"),
    (["identify", MISSING, "f", "--out", "p.json", "--context", "0"], "argument --context: must be at least 1"),
    (["identify", MISSING, "f", "--out", "p.json", "--context", "-5"], "argument --context: must be at least 1"),
    (["identify", MISSING, "f", "--out", "p.json", "--max-samples", "0"], "argument --max-samples: must be at"),
    (["eval", MISSING, "--task", "niah", "--samples", "0"], "argument --samples: must be at least 1, got 0"),
    (["eval", MISSING, "--task", "niah", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1"),
    (["eval", MISSING, "--task", "niah", "--keys", "1.5"], "argument --keys: must be an integer, got '1.5'"),
    (["eval", MISSING, "--task", "niah", "--plot", "heat.xyz"], "cannot write --plot heat.xyz: the format .xyz"),
    (["eval", MISSING, "--task", "niah", "--ratio-plot", "r"], "the format (no suffix) is not one of"),
    (["demo", "--new-tokens", "0"], "argument --new-tokens: must be at least 1, got 0"),
])
def test_flags_are_checked_before_the_model_loads(capsys, argv, words):
    """The model path does not exist: a flag error that names the flag proves the flags came first."""
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and words in err, err
    assert err.startswith(f"lt-jax {argv[0]}: error:") and MISSING not in err


def test_identify_plot_checked_first_and_plan_written_before_the_figure(tiny_ckpt, tmp_path, capsys, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"ids": list(range(1, 120))}) for _ in range(2)) + "\n")
    out = tmp_path / "plan.json"
    code, _, err = run(capsys, "identify", tiny_ckpt, data, "--field", "ids", "--out", out, "--plot",
                       tmp_path / "x.xyz")
    assert code == 2 and "the format .xyz" in err and not out.exists()
    from lt_jax.eval import plots

    def broken(*a, **k):
        raise RuntimeError("the figure failed")
    monkeypatch.setattr(plots, "plot_lazy_ratios", broken)
    with pytest.raises(RuntimeError, match="the figure failed"):
        main(["identify", str(tiny_ckpt), str(data), "--field", "ids", "--out", str(out), "--plot",
              str(tmp_path / "r.png"), "--context", "100", "--sink", "2", "--window", "8"])
    assert json.loads(out.read_text())["num_layers"] == 3  # the computed plan survived the failing figure
    monkeypatch.undo()
    code, stdout, _ = run(capsys, "identify", tiny_ckpt, data, "--field", "ids", "--out", tmp_path / "p2.json",
                          "--context", "100", "--sink", "2", "--window", "8")
    assert code == 0 and len(stdout.splitlines()) == 1 and stdout.startswith("lazy layers [")  # no record dump
    code, _, err = run(capsys, "identify", tiny_ckpt, data, "--field", "ids", "--out", tmp_path / "p3.json",
                       "--context", "8", "--sink", "2", "--window", "8")
    assert code == 2 and "samples of --context 8 tokens are no longer than S + W = 10" in err


def test_ppl_refuses_what_the_model_cannot_score_and_says_when_it_cuts(tiny_ckpt, tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(str(i % 300) for i in range(1500)))  # the tiny model's context is 1024
    code, _, err = run(capsys, "ppl", tiny_ckpt, "--ids-file", ids, "--max-tokens", "2000")
    assert code == 2 and "--max-tokens 2000 exceeds the model's context of 1024 tokens" in err
    code, out, err = run(capsys, "ppl", tiny_ckpt, "--ids-file", ids, "--plan", "last", "--sink", "2",
                         "--window", "8")
    assert code == 0 and "the text holds 1500 tokens; scoring its first 1024 (the model context)" in err
    assert out.startswith("ppl ") and "over 1023 tokens" in out and "plan last: layers [1, 2] streaming" in out
    assert "{" not in out  # not a Python dict
    short = tmp_path / "short.txt"
    short.write_text("1 2 3 4 5 6 7 8")
    code, _, err = run(capsys, "ppl", tiny_ckpt, "--ids-file", short, "--plan", "last")
    assert code == 0 and "same numbers as all-full" in err  # 8 tokens <= S + W: the plan cannot matter
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(capsys, "ppl", tiny_ckpt, "--ids-file", empty)
    assert code == 2 and "holds no tokens" in err and "float64" not in err


def test_text_and_chat_prompts_presets_and_notes(tiny_chat, capsys):
    code, out, err = run(capsys, "generate", tiny_chat, "--prompt", "Tell me about the sea.", "--chat",
                         "--max-new-tokens", "4", "--plan", "last", "--stream-preset", "lighttrans-code", "--json")
    result = json.loads(out)
    assert code == 0 and result["plan"]["sink"] == 129 and result["plan"]["window"] == 1025
    assert len(result["ids"]) == 4 and isinstance(result["text"], str)
    assert "prefill of" in err and "same numbers as all-full" in err  # a short chat prompt: S + W covers it
    import lt_jax
    model = lt_jax.load(tiny_chat)
    same = dict(plan="last", preset="lighttrans-code", max_new_tokens=3)  # a lone prompt: the CLI's compilation
    texts = model.generate(["Tell me about the sea.", "Name three primes."], **same)
    assert len(texts) == 2 and all(len(t["ids"]) == 3 for t in texts)
    assert texts[0]["ids"] == model.generate("Tell me about the sea.", **same)[0]["ids"]


def test_eval_ppl_keys_and_plan_files_through_the_cli(tiny_chat, tmp_path, capsys):
    plan = tmp_path / "mine.json"
    plan.write_text(json.dumps({"num_layers": 4, "lazy_layers": [1, 3], "sink": 4, "window": 32}))
    out = tmp_path / "ppl.jsonl"
    code, stdout, _ = run(capsys, "eval", tiny_chat, "--task", "ppl", "--prefix", "200", "--score-tokens", "50",
                          "--samples", "2", "--methods", f"full,{plan}", "--out", out, "--json")
    summary = json.loads(stdout)["summary"]["methods"]
    assert code == 0 and set(summary) == {"full", str(plan)} and summary["full"]["examples"] == 2
    assert summary["full"]["average"] != summary[str(plan)]["average"]
    code, stdout, _ = run(capsys, "eval", tiny_chat, "--task", "niah", "--keys", "3", "--lengths", "300",
                          "--depths", "0.5", "--samples", "1", "--max-new-tokens", "4", "--methods", "full",
                          "--out", tmp_path / "k.jsonl", "--json")
    assert code == 0 and json.loads(stdout)["settings"]["keys"] == 3


def test_bench_through_the_cli(tiny_lt, capsys):
    model = tiny_lt("llama")
    code, out, _ = run(capsys, "bench", model.path, "--methods", "full", "--contexts", "128", "--batches", "1",
                       "--new-tokens", "4", "--repeats", "1", "--json")
    rows = json.loads(out)["records"]
    assert code == 0 and rows[0]["method"] == "full" and rows[0]["decode_tokens_per_s"] > 0


def test_eval_never_writes_into_a_file_that_is_not_its_own(tiny_chat, tmp_path, capsys):
    for text in ("my notes\nlast line without newline", '{"a": 1}\n{"b": 2}', "no newline at all"):
        out = tmp_path / "notes.txt"
        out.write_text(text)
        code, _, err = run(capsys, "eval", tiny_chat, "--task", "passkey", "--lengths", "300", "--out", out)
        assert code == 2 and out.read_text() == text, err


def test_help_names_every_flag_and_its_default():
    sub = build_parser()._subparsers._group_actions[0].choices
    for command, parser in sub.items():
        for action in parser._actions:
            assert action.help, (command, action.dest)
    gen = {a.dest: a.help for a in sub["generate"]._actions}
    for dest in ("max_new_tokens", "top_p", "seed", "temperature", "top_k"):
        assert "default" in gen[dest], dest
    assert "all layers full" not in sub["ppl"].description


def test_output_directories_follow_the_umask(tiny_models, prompt_ids, tmp_path, capsys):
    from conftest import save_hf
    hf = save_hf(tiny_models("qwen2", prompt_ids)[0], tmp_path / "hf", "safetensors")
    old = os.umask(0o022)
    try:
        assert main(["convert", str(hf), str(tmp_path / "ckpt")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    code, _, err = run(capsys, "convert", tmp_path / "nowhere", tmp_path / "x")
    assert code == 2 and "nowhere does not exist" in err and "config.json" not in err


def test_bad_input_found_by_a_second_probe(tiny_ckpt, tiny_chat, tmp_path, capsys):
    """Each one line naming its cause, with no progress line before it."""
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3")
    for argv, words in [
        (["generate", tiny_ckpt, "--ids", "1 2 99999999"], "token ids must lie in 0..299"),
        (["ppl", tiny_ckpt, "--ids-file", ids, "--prefix", "50"], "--prefix 50 leaves nothing to score"),
        (["eval", tiny_chat, "--task", "niah", "--lengths", "30", "--out", tmp_path / "a.jsonl"],
         "--lengths must be at least 64 tokens each; got 30"),
        (["eval", tiny_chat, "--task", "ppl", "--prefix", "4000", "--out", tmp_path / "b.jsonl"],
         "--prefix + --score-tokens = 4512 exceeds the model's context of 2048 tokens"),
    ]:
        code, out, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and words in err, err
        assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "b.jsonl").exists()


# Every output argument of every command (tagged by lt_jax.cli.flags.output), with the argv that reaches it: a new
# command's output must be added here, or test_every_output_is_walked fails.
FOREIGN_CASES = {
    ("convert", "out_dir"): ["convert", MISSING, "{out}"],
    ("export", "hf_out_dir"): ["export", MISSING, "{out}"],
    ("train", "--out"): ["train", MISSING, "--data", "{text}", "--plan", "first", "--out", "{out}"],
    ("generate", "--output"): ["generate", MISSING, "--input", "{jsonl}", "--output", "{out}"],
    ("identify", "--out"): ["identify", MISSING, "{text}", "--out", "{out}"],
    ("identify", "--plot"): ["identify", MISSING, "{text}", "--out", "{new}", "--plot", "{out}"],
    ("calibrate", "--out"): ["calibrate", MISSING, "--probe", "induction", "--out", "{out}"],
    ("calibrate", "--plot"): ["calibrate", MISSING, "--probe", "induction", "--out", "{new}", "--plot", "{out}"],
    ("eval", "--out"): ["eval", MISSING, "--task", "niah", "--out", "{out}"],
    ("eval", "--plot"): ["eval", MISSING, "--task", "niah", "--out", "{new}", "--plot", "{out}"],
    ("eval", "--ratio-plot"): ["eval", MISSING, "--task", "niah", "--out", "{new}", "--ratio-plot", "{out}"],
    ("lm-eval", "--output"): ["lm-eval", MISSING, "--tasks", "x", "--output", "{out}"],
}


def _outputs():
    """(command, flag) -> kind of every argument tagged as an output, from the parsers of the registry."""
    import argparse
    from lt_jax.cli.main import COMMANDS
    found, untagged = {}, []
    for command in COMMANDS:
        parser = argparse.ArgumentParser()
        command.add_arguments(parser)
        for action in parser._actions:
            flag = action.option_strings[0] if action.option_strings else action.dest
            if getattr(action, "output", None):
                found[(command.NAME, flag)] = action.output
            elif any(w in action.dest for w in ("out", "plot", "dir")) and action.dest not in ("hf_dir",
                                                                                                   "ckpt_dir"):
                untagged.append((command.NAME, flag))
    return found, untagged


def test_every_output_is_walked():
    found, untagged = _outputs()
    assert untagged == [] and set(found) == set(FOREIGN_CASES)


@pytest.mark.parametrize("case", sorted(FOREIGN_CASES))
def test_a_file_of_the_users_is_never_written(case, tmp_path, capsys):
    """A 3-line notes file (named .png where an image is wanted) at every output: refused in one sentence naming
    it, byte-for-byte unchanged, nothing else written."""
    kind = _outputs()[0][case]
    notes = tmp_path / ("notes.png" if kind == "image" else "notes.txt")
    notes.write_bytes(b"my notes\nsecond line\nthird, no newline")
    (tmp_path / "t.txt").write_text("The sea is wide. " * 50)
    (tmp_path / "p.jsonl").write_text('{"ids": [1, 2, 3]}\n')
    fill = {"out": notes, "text": tmp_path / "t.txt", "jsonl": tmp_path / "p.jsonl", "new": tmp_path / "new.json"}
    argv = [a.format(**fill) for a in FOREIGN_CASES[case]]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and str(notes) in err, err
    assert notes.read_bytes() == b"my notes\nsecond line\nthird, no newline"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([notes.name, "t.txt", "p.jsonl"])


def _ctrl_c(cmd, ready):
    """Runs `cmd`, sends one SIGINT once `ready(stderr so far)` holds; (exit status, stderr)."""
    import signal
    import subprocess
    import sys
    import threading
    import time
    from conftest import REPO
    proc = subprocess.Popen([sys.executable, "-m", "lt_jax.cli", *map(str, cmd)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    err = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")))
    reader.start()
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ready("".join(err)):
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.01)
    proc.wait()
    reader.join()
    return proc.returncode, "".join(err)


def _rows(path: Path, n: int):
    return lambda _err: path.exists() and len(path.read_text().splitlines()) >= n


@pytest.mark.parametrize("command", ["generate", pytest.param("eval", marks=pytest.mark.slow)])
def test_ctrl_c_ends_in_one_line(command, tiny_ckpt, tiny_chat, tmp_path):
    """A real SIGINT mid-run: exit 130, one line saying how far it got and how to continue (no traceback), and the
    result file consistent (every line whole JSON; the rerun resumes it: test_serving, test_eval)."""
    out = tmp_path / "out.jsonl"
    if command == "generate":
        src = tmp_path / "in.jsonl"
        src.write_text("".join(json.dumps({"ids": list(range(1, 40 + i))}) + "\n" for i in range(40)))
        cmd = ["generate", tiny_ckpt, "--input", src, "--output", out, "--batch-size", "1", "--max-new-tokens",
               "100", "--stop-ids", "-1"]
    else:
        cmd = ["eval", tiny_chat, "--task", "niah", "--out", out, "--lengths", "300,400", "--depths", "0.2,0.8",
               "--samples", "4", "--sink", "4", "--window", "64", "--max-new-tokens", "4"]
    code, err = _ctrl_c(cmd, _rows(out, 2))
    last = err.strip().splitlines()[-1]
    assert code == 130 and "Traceback" not in err, err[-2000:]
    assert last.startswith(f"lt-jax {command}: interrupted after ") and "rerun the same command" in last, last
    for line in out.read_text().splitlines()[:-1]:
        json.loads(line)


def test_names_and_plans_are_checked_before_the_weights_load(tiny_ckpt, tiny_chat, tmp_path, capsys, monkeypatch):
    """Mesh axes, per-method options, chat roles, retrieval-aware probes and plan files: one sentence naming the
    wrong name, before `lt_jax.load` runs (here it cannot)."""
    import lt_jax

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded before the check")
    monkeypatch.setattr(lt_jax, "load", no_load)
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3 4 5 6")
    not_a_plan = tmp_path / "results.json"
    not_a_plan.write_text(json.dumps({"rows": 3}))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "wizard", "content": "hello"}]}) + "\n")
    ppl = ["ppl", tiny_ckpt, "--ids-file", ids]
    for argv, words in [
        ([*ppl, "--mesh", "data=1,banana=1"], "axis 'banana' is not named by the sharding rules, which place arrays "
                                              "on data, fsdp, model"),
        (["eval", tiny_ckpt, "--task", "niah", "--methods", "full,full@protect=3", "--out", tmp_path / "e.jsonl"],
         "method 'full@protect=3': full does not use protect (only retrieval-aware do)"),
        ([*ppl, "--plan", "retrieval-aware:bogus"], "'bogus' is neither a probe (retrieval, induction, nll, "
                                                    "nll-greedy) nor a calibration file (.json)"),
        ([*ppl, "--plan", "retrieval-aware:my-notes.txt"], "'my-notes.txt' is neither a probe"),
        ([*ppl, "--plan", "retrieval-aware"], "run `lt-jax calibrate MODEL --probe retrieval` first"),
        ([*ppl, "--plan", not_a_plan], str(not_a_plan)),
        (["train", tiny_chat, "--data", chat, "--plan", "first", "--out", tmp_path / "run"],
         f"{chat} line 1: role 'wizard' is not one of the chat roles system, user, assistant, tool"),
        (["calibrate", tiny_ckpt, "--probe", "induction", "--span", "600", "--out", tmp_path / "c.json"],
         "--span 600 must be at least 2 and twice it within the model's context of 1024"),
        (["calibrate", tiny_ckpt, "--lengths", "0", "--haystack", ids, "--out", tmp_path / "c.json"],
         "--lengths must list prompt lengths of at least 1 token"),
        (["calibrate", tiny_ckpt, "--probe", "nll", "--joint", "0.5,1.5", "--haystack", ids, "--out",
          tmp_path / "c.json"], "--joint must list lazy fractions between 0 and 1 (or 'none'); got '0.5,1.5'"),
        (["calibrate", tiny_ckpt, "--probe", "nll-greedy", "--up-to", "0.9", "--lengths", "512", "--haystack", ids,
          "--out", tmp_path / "c.json"], "--up-to 0.9 must be a lazy fraction that makes 1..2 of the 3 layers lazy"),
    ]:
        code, out, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and words in err, (argv, err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "e.jsonl").exists()
    assert "calibration-bogus.json" not in err and "calibration-my-notes" not in err


def test_messages_a_user_meets(tiny_ckpt, tiny_chat, assets, tmp_path, capsys):
    """calibrate --lengths too short for a needle: one sentence (not a traceback from the prompt builder); train
    --out onto a file says it is a file; a mesh larger than the machine names the CPU simulation flag."""
    essay = sorted((Path(assets["essays"])).glob("*.txt"))[0]
    code, _, err = run(capsys, "calibrate", tiny_chat, "--lengths", "50", "--samples", "1", "--haystack", essay,
                       "--out", tmp_path / "c.json")
    assert code == 2 and err.count("\n") == 1 and "a 50-token prompt is too short to hold the needle" in err, err
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, _, err = run(capsys, "train", tiny_ckpt, "--data", notes, "--plan", "first", "--out", notes, "--resume")
    assert code == 2 and f"--out {notes} is a file, not a folder" in err and notes.read_text() == "mine"
    code, _, err = run(capsys, "ppl", tiny_ckpt, "--text-file", notes, "--mesh", "data=64")
    assert code == 2 and "XLA_FLAGS=--xla_force_host_platform_device_count=64" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "calibrate", "identify", "ppl"])
def test_ctrl_c_on_the_other_long_commands(command, tiny_ckpt, tmp_path):
    """The same rule on train (then --resume continues), calibrate, identify and ppl."""
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(str(i % 290 + 1) for i in range(1000)))
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps({"ids": list(range(1, 120))}) + "\n" for _ in range(400)))
    out = tmp_path / "out"
    cmd, ready, last_words = {
        "train": (["train", tiny_ckpt, "--data", samples, "--plan", "first", "--out", out, "--steps", "500",
                   "--save-every", "1", "--seq-len", "64"], _rows(out / "train_log.jsonl", 1), "with --resume"),
        "calibrate": (["calibrate", tiny_ckpt, "--probe", "induction", "--span", "256", "--samples", "500",
                       "--out", tmp_path / "c.json"], lambda err: "calibrate induction:" in err and "1/500" in err,
                      "nothing was written"),
        "identify": (["identify", tiny_ckpt, samples, "--field", "ids", "--out", tmp_path / "p.json", "--context",
                      "100", "--sink", "2", "--window", "8", "--max-samples", "400"],
                     lambda err: "1/400" in err, "nothing was written"),
        "ppl": (["ppl", tiny_ckpt, "--ids-file", ids, "--prefix", "8"], lambda err: "scoring" in err,
                "nothing was written"),
    }[command]
    code, err = _ctrl_c(cmd, ready)
    last = err.strip().splitlines()[-1]
    assert code == 130 and "Traceback" not in err and last.startswith(f"lt-jax {command}: interrupted"), err[-2000:]
    assert last_words in last, last
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "p.json").exists()
    if command == "train":
        assert " of 500 steps (train)" in last
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == list(range(1, len(log) + 1))


def test_mesh_axes_against_the_rules():
    """An axis no rule names: an error with the default rules (naming the known axes), a warning with a table of
    the user's own; a malformed part is left to make_mesh."""
    from lt_jax import sharding
    from lt_jax.errors import LtJaxError
    sharding.check_axes("data=2,model=4,fsdp=-1")
    sharding.check_axes("data=2;model=4")
    with pytest.raises(LtJaxError, match="axis 'modle' is not named by the sharding rules, which place arrays on "
                                         "data, fsdp, model; nothing would be split over it"):
        sharding.check_axes("data=2,modle=2")
    with pytest.warns(UserWarning, match="axis 'banana' is not named by the sharding rules, which place arrays on "
                                         "model: arrays are only copied over it"):
        sharding.check_axes("banana=2,model=2", rules=(("ffn", "model"),))


def test_no_tpu_warnings_where_there_is_no_tpu(tiny_ckpt):
    """libtpu installed (the test extra) on a host without TPU chips: a command runs on the CPU without the TPU
    plugin's worker-hostname warnings (with JAX_PLATFORMS unset, as a user runs it), and `compile`, which loads
    libtpu for its topology, without libtpu's five lines asking for TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES."""
    import subprocess
    import sys
    from conftest import REPO
    pytest.importorskip("libtpu", reason="the warnings come from libtpu")
    from jax._src import hardware_utils
    if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
        pytest.skip("this host has TPU chips")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    run = subprocess.run([sys.executable, "-m", "lt_jax.cli", "generate", str(tiny_ckpt), "--ids", "1 2 3",
                          "--max-new-tokens", "2", "--json"], capture_output=True, text=True, timeout=300,
                         env=dict(env, PYTHONPATH=str(REPO)))
    assert run.returncode == 0 and len(json.loads(run.stdout)["ids"]) == 2, run.stderr[-2000:]
    assert "TPU" not in run.stderr, run.stderr[-2000:]
    env = {k: v for k, v in env.items() if not k.startswith("TPU_")}
    config = REPO / "configs" / "Llama-3.1-8B-Instruct"
    run = subprocess.run([sys.executable, "-m", "lt_jax.cli", "compile", str(config), "--target", "v5e:2x2",
                          "--context", "256", "--batch", "1", "--plans", "full", "--programs", "insert_rows",
                          "--json"], capture_output=True, text=True, timeout=300, env=dict(env, PYTHONPATH=str(REPO)))
    assert run.returncode == 0 and json.loads(run.stdout)["rows"][0]["fits"], run.stderr[-2000:]
    assert "TPU_" not in run.stderr and "WARNING" not in run.stderr, run.stderr[-2000:]


def test_the_persistent_compilation_cache_is_on_for_a_command_and_off_after_it(monkeypatch, tmp_path, capsys):
    """`main` called in-process (tests, notebooks) leaves jax's settings as it found them: a cache left on made
    later TPU compiles in the same process warn that they cannot reload from it."""
    import jax
    from lt_jax.cli import generate
    seen = []
    monkeypatch.setenv("LT_JAX_ASSETS", str(tmp_path))
    monkeypatch.setattr(generate, "run", lambda args: seen.append(jax.config.jax_compilation_cache_dir) or {})
    before = jax.config.jax_compilation_cache_dir
    assert main(["generate", MISSING, "--ids", "1", "--json"]) == 0
    assert seen == [str(tmp_path / "jax_cache")]
    assert jax.config.jax_compilation_cache_dir == before
