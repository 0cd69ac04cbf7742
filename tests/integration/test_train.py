"""LightTransfer-Train: the loss and its gradient against transformers and torch autograd (full and under a
loop-built streaming mask), the O(T (S + W)) path against the dense mask path, the optimizer against a
hand-written AdamW, frozen leaves, gradient accumulation, compile counts, data formats, resume after SIGKILL,
export, and bad input."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import compile_count
from lt_jax.errors import LtJaxError
from lt_jax.params import stack_layers
from lt_jax.plan import Plan
from lt_jax.train.step import (IGNORE, TrainSettings, gradients, init_state, loss_fn, loss_terms, make_step,
                               train_step)

T = 320  # longer than S + W + a query block: the streaming path (not its short-prompt fallback) runs
SINK, WINDOW = 3, 40
LOSS_TOL = 1e-5  # relative, fp32
GRAD_TOL = 1e-4  # relative per leaf (norm of the difference / norm of the reference)


def _labels(ids):
    labels = ids.copy()
    labels[:, :7] = IGNORE  # a prompt part without loss
    labels[1, 100:130] = IGNORE
    return labels


def _loop_mask(sink, window):
    allowed = np.zeros((T, T), bool)
    for q in range(T):
        for k in range(q + 1):
            allowed[q, k] = k < sink or q - k < window
    return torch.where(torch.from_numpy(allowed), 0.0, torch.finfo(torch.float32).min)[None, None]


def _torch_loss_and_grads(hf, ids, labels, mask, tmp: Path, cfg):
    """transformers' causal-LM loss and torch autograd's gradient, read into our layout through the converter
    (the gradients saved as if they were weights)."""
    from safetensors.torch import save_file
    from checkpoints_conv import read_hf_params
    hf.zero_grad(set_to_none=True)
    loss = hf(torch.from_numpy(ids).long(), attention_mask=mask, labels=torch.from_numpy(labels).long()).loss
    loss.backward()
    tmp.mkdir()
    save_file({n: p.grad.detach().contiguous() for n, p in hf.named_parameters()}, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(hf.config.to_dict()))
    grads = read_hf_params(tmp, cfg)
    hf.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                 / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))


@pytest.mark.parametrize("streaming", [False, True], ids=["full", "streaming"])
def test_loss_and_gradient_equal_transformers_and_torch_autograd(streaming, tiny_models, prompt_ids, tiny_lt,
                                                                 tmp_path):
    """Every layer full: transformers' own loss and autograd. Every layer streaming: transformers under a 4D mask
    built by loops over the rule, so the O(T (S + W)) path and its backward pass meet an independent reference."""
    hf, _ = tiny_models("llama", prompt_ids)
    model = tiny_lt("llama")
    ids = prompt_ids[:, :T]
    labels = _labels(ids)
    plan = Plan(3, (0, 1, 2), sink=SINK, window=WINDOW) if streaming else None
    mask = _loop_mask(SINK, WINDOW) if streaming else None
    ref_loss, ref_grads = _torch_loss_and_grads(hf, ids, labels, mask, tmp_path / "grads", model.config)
    params = stack_layers(model.params)
    batch = {"tokens": jnp.asarray(ids), "labels": jnp.asarray(labels)}
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, model.config, plan)
    assert abs(float(loss) - ref_loss) <= LOSS_TOL * abs(ref_loss)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    ref = dict(jax.tree_util.tree_flatten_with_path(ref_grads)[0])
    for path, g in flat:
        assert _rel(g, ref[path]) <= GRAD_TOL, f"{jax.tree_util.keystr(path)}: {_rel(g, ref[path]):.2e}"
    if streaming:  # the mask matters: the full loss differs
        assert abs(float(loss_fn(params, batch, model.config)) - float(loss)) > 1e-3


def test_streaming_path_equals_the_dense_mask_path_loss_and_gradient(tiny_lt, prompt_ids):
    """A mixed plan: the training path (streaming layers in O(T (S + W)), lax.cond per layer) against the dense
    path that masks every layer's full score matrix with the rule (`forward_masked`), gradients included;
    left-padded rows too."""
    from lt_jax.model import forward_masked
    model = tiny_lt("llama")
    cfg = model.config
    plan = Plan(3, (0, 2), sink=SINK, window=WINDOW)
    ids = prompt_ids[:, :T].copy()
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), ids.shape).copy()
    positions[1] = np.arange(T) - 20  # row 1 left padded by 20: its positions start at 0 after the padding
    positions[1, :20] = -1
    labels = _labels(ids)
    labels[1, :21] = IGNORE  # the first real token has no real predecessor
    batch = {"tokens": jnp.asarray(ids), "labels": jnp.asarray(labels), "positions": jnp.asarray(positions)}

    def dense(params):
        logits = forward_masked(params, batch["tokens"], batch["positions"], plan.layers(cfg), cfg)[:, :-1]
        y = batch["labels"][:, 1:]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(y, 0)[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(y != IGNORE, nll, 0)) / jnp.sum(y != IGNORE)

    params = stack_layers(model.params)
    ref_loss, ref_grads = jax.value_and_grad(dense)(params)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, cfg, plan)
    assert abs(float(loss) - float(ref_loss)) <= LOSS_TOL * float(ref_loss)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert _rel(g, r) <= 1e-5
    remat = jax.grad(loss_fn)(params, batch, cfg, plan, remat=True)
    for g, r in zip(jax.tree.leaves(remat), jax.tree.leaves(grads)):
        assert _rel(g, r) <= 1e-6
    half = jax.value_and_grad(loss_fn)(params, batch, cfg, plan, compute_dtype="bfloat16")
    assert abs(float(half[0]) - float(loss)) <= 0.02 * float(loss)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(half[1]))
    # vmap: the per-row losses of the batch, each row a batch of its own
    rows = jax.vmap(lambda b: loss_fn(params, jax.tree.map(lambda a: a[None], b), cfg, plan))(batch)
    for b in range(2):
        one = loss_fn(params, jax.tree.map(lambda a: a[b:b + 1], batch), cfg, plan)
        assert abs(float(rows[b]) - float(one)) <= 1e-6 * float(one)


def _batch(ids, labels, A=1):
    B = ids.shape[0] // A
    return {"tokens": jnp.asarray(ids).reshape(A, B, -1), "labels": jnp.asarray(labels).reshape(A, B, -1)}


def test_one_step_equals_a_hand_written_adamw_step(tiny_lt, prompt_ids):
    """Clipping, bias-corrected AdamW moments, decoupled weight decay (not on norms), the schedule's first lr."""
    model = tiny_lt("llama")
    cfg = model.config
    plan = Plan(3, (1,), sink=SINK, window=WINDOW)
    s = TrainSettings.for_plan(plan, steps=5, lr=1e-3, schedule="constant", weight_decay=0.1, clip=0.5)
    ids = prompt_ids[:, :T]
    batch = _batch(ids, _labels(ids))
    state = init_state(model.params, s)
    p0 = jax.tree.map(np.asarray, state.params)
    g, _, _ = gradients(state.params, batch, plan.layers(cfg).is_lazy, cfg, s)
    g = jax.tree.map(np.asarray, g)
    norm = np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(g)))
    assert norm > s.clip  # the clip acts
    scale = s.clip / norm

    def adamw(path, p, grad):
        grad = grad * scale
        m, v = (1 - s.b1) * grad, (1 - s.b2) * grad * grad
        update = (m / (1 - s.b1)) / (np.sqrt(v / (1 - s.b2)) + s.eps)
        decay = 0.0 if path[-1].key in ("attn_norm", "mlp_norm", "final_norm") else s.weight_decay
        return p - s.lr * (update + decay * p)

    expected = jax.tree_util.tree_map_with_path(adamw, p0, g)
    state, metrics = train_step(state, batch, plan.layers(cfg), cfg, s)
    assert abs(float(metrics["grad_norm"]) - norm) <= 1e-5 * norm
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # tests/unit/test_trainable.py checks every subset leaf by leaf
@pytest.mark.parametrize("trainable", ["attention", "lazy-layers"])
def test_frozen_weights_stay_bit_identical(trainable, tiny_lt, prompt_ids):
    model = tiny_lt("llama")
    cfg = model.config
    plan = Plan(3, (1,), sink=SINK, window=WINDOW)
    s = TrainSettings.for_plan(plan, steps=5, lr=1e-2, weight_decay=0.1, trainable=trainable)
    ids = prompt_ids[:, :T]
    state = init_state(model.params, s)
    before = jax.tree.map(np.array, state.params)
    for _ in range(2):
        state, _ = train_step(state, _batch(ids, _labels(ids)), plan.layers(cfg), cfg, s)
    after = state.params
    if trainable == "attention":
        for name in ("gate_up_proj", "down_proj", "attn_norm", "mlp_norm"):
            assert np.array_equal(np.asarray(after["layers"][name]), before["layers"][name]), name
        assert np.array_equal(np.asarray(after["embed"]), before["embed"])
        assert not np.array_equal(np.asarray(after["layers"]["qkv_proj"]), before["layers"]["qkv_proj"])
    else:
        for name in before["layers"]:
            got, was = np.asarray(after["layers"][name]), before["layers"][name]
            assert np.array_equal(got[[0, 2]], was[[0, 2]]), name  # the full layers
            assert not np.array_equal(got[1], was[1]), name  # the lazy one trains
        assert np.array_equal(np.asarray(after["embed"]), before["embed"])


def test_gradient_accumulation_equals_one_batch_and_plans_share_a_compilation(tiny_lt, prompt_ids):
    """Two micro-batches of one row = one batch of two rows (the mean over every labelled token); another plan
    with the same lazy count compiles nothing new."""
    model = tiny_lt("llama")
    cfg = model.config
    ids = prompt_ids[:, :T]
    labels = _labels(ids)
    s = TrainSettings.for_plan(Plan(3, (1,), sink=SINK, window=WINDOW), steps=5)
    is_lazy = np.array([False, True, False])
    g1, l1, n1 = gradients(init_state(model.params, s).params, _batch(ids, labels), is_lazy, cfg, s)
    g2, l2, n2 = gradients(init_state(model.params, s).params, _batch(ids, labels, A=2), is_lazy, cfg, s)
    assert int(n1) == int(n2) == int(np.sum(labels[:, 1:] != IGNORE))
    assert abs(float(l1) - float(l2)) <= 1e-6 * float(l1)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert _rel(a, b) <= 1e-5
    batch = _batch(ids, labels)
    step = make_step(cfg, s, Plan(3, (1,), sink=SINK, window=WINDOW))
    state, _ = step(init_state(model.params, s), batch)
    compiled = compile_count(train_step)
    other = make_step(cfg, s, Plan(3, (2,), sink=SINK, window=WINDOW))
    state, metrics = other(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert compile_count(train_step) == compiled


def test_data_formats_label_what_they_should(tiny_chat, tmp_path):
    """text windows, prompt/completion (loss on the completion and EOS), chat messages (loss on the assistant
    turns only), pre-tokenized ids with labels; malformed lines named by file and line."""
    import lt_jax
    from lt_jax.train.data import make_batch, read_sequences, step_rows
    model = lt_jax.load(tiny_chat)
    tok = model.tokenizer
    text = tmp_path / "a.txt"
    text.write_text("The sea is wide. " * 60)
    data = tmp_path / "b.jsonl"
    chat = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Eleven."}]
    data.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Two plus two is", "completion": " four."},
        {"messages": chat},
        {"ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"ids": [9]},  # too short: dropped
    ]) + "\n")
    seqs = read_sequences([text, data], model, seq_len=64)
    n_text = -(-len(model.encode(text.read_text())) // 64)
    assert len(seqs) == n_text + 3 and seqs.dropped == 1
    assert all(len(i) <= 64 and np.array_equal(i, lab) for i, lab in zip(seqs.ids[:n_text], seqs.labels[:n_text]))
    ids, labels = seqs.ids[n_text], seqs.labels[n_text]
    prompt = len(model.encode("Two plus two is"))
    assert np.all(labels[:prompt] == IGNORE)
    assert tok.decode(labels[prompt:]) == " four." + tok.decode([model.config.eos_token_ids[0]])
    ids, labels = seqs.ids[n_text + 1], seqs.labels[n_text + 1]
    learned = tok.decode(labels[labels != IGNORE])
    assert "Seven." in learned and "Eleven." in learned
    assert "prime" not in learned and "Another" not in learned and "user" not in learned
    assert tok.decode(ids) == tok.apply_chat_template(chat, tokenize=False)
    assert seqs.labels[n_text + 2].tolist() == [-100, -100, 7, 8]
    # the data order: a function of (seed, step); every sequence once per epoch
    n = len(seqs)
    epochs = [step_rows(n, n, 0, e) for e in range(2)]
    assert sorted(epochs[0].tolist()) == list(range(n)) and not np.array_equal(epochs[0], epochs[1])
    assert np.array_equal(np.concatenate([step_rows(n, 1, 0, s) for s in range(2 * n)]), np.concatenate(epochs))
    batch = make_batch(seqs, np.array([n_text, n_text + 2]), 1, 64)
    assert batch["tokens"].shape[:2] == (1, 2) and batch["positions"][0, 1, -4:].tolist() == [0, 1, 2, 3]
    assert np.all(batch["positions"][0, 1, :-4] == -1) and np.all(batch["labels"][0, 1, :-4] == IGNORE)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no completion"}\n')
    with pytest.raises(LtJaxError, match=r"bad.jsonl line 2"):
        read_sequences([bad], model, 64)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"ids": [1]}\n')
    with pytest.raises(LtJaxError, match="no training sequence"):
        read_sequences([empty], model, 64)


def _cli(*args, check=True):
    run = subprocess.run([sys.executable, "-m", "lt_jax.cli", *map(str, args)], capture_output=True, text=True)
    if check and run.returncode:
        raise AssertionError(run.stderr[-3000:])
    return run


def _in_process(capsys, *args, check=True):
    """`lt-jax ARGS` run by `main` in this process, as `_cli` returns it."""
    from lt_jax.cli import main
    capsys.readouterr()
    code = main([str(a) for a in args])
    run = subprocess.CompletedProcess(args, code, *capsys.readouterr())
    if check and code:
        raise AssertionError(run.stderr[-3000:])
    return run


def _ids_data(path: Path, n=24, seed=0):
    rng = np.random.default_rng(seed)
    path.write_text("".join(json.dumps({"ids": rng.integers(0, 300, int(rng.integers(40, 120))).tolist()}) + "\n"
                            for _ in range(n)))
    return path


def _params(out: Path):
    from checkpoints_conv import load_checkpoint
    return load_checkpoint(out)[1]


TRAIN_ARGS = ["--plan", "last", "--lazy-fraction", "0.34", "--sink", "2", "--window", "16", "--seq-len", "96",
              "--batch-size", "2", "--lr", "1e-3", "--warmup", "3"]


@pytest.mark.slow  # a subprocess killed mid-run (~30 s); resume's refusals and the settings check stay by default
def test_resume_after_sigkill_is_bit_exact_and_exports_to_transformers(tiny_ckpt, tmp_path):
    """A run killed with SIGKILL between checkpoints and resumed ends with the parameters of an uninterrupted
    run, bit for bit, with every step logged once; the trained model loads with its plan as the default, and its
    HF export loads in transformers with the same logits."""
    data = _ids_data(tmp_path / "d.jsonl")
    steps = 600
    args = [tiny_ckpt, "--data", data, *TRAIN_ARGS, "--steps", steps, "--save-every", 40]
    whole = tmp_path / "whole"
    _cli("train", *args, "--out", whole)
    killed = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-m", "lt_jax.cli", "train", *map(str, args), "--out", str(killed)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 100:
            break
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "lt_config.json").exists()
    saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] % 40 == 0 and saved[-1] < steps
    _cli("train", *args, "--out", killed, "--resume")
    for a, b in zip(jax.tree.leaves(_params(whole)), jax.tree.leaves(_params(killed))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    exact = ("step", "loss", "grad_norm", "lr", "tokens")  # all but the timings
    assert [[r[k] for k in exact] for r in rows] == [[r[k] for k in exact] for r in map(
        json.loads, (whole / "train_log.jsonl").read_text().splitlines())]
    assert (whole / "loss.png").stat().st_size > 0
    again = _cli("train", *args, "--out", killed, "--resume", "--json")
    assert json.loads(again.stdout)["already_complete"]

    import lt_jax
    from transformers import AutoModelForCausalLM
    trained = lt_jax.load(whole)
    assert trained.default_plan.lazy_layers == (2,) and trained.plan().lazy_layers == (2,)
    _cli("export", whole, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["lt_jax_plan"]["lazy_layers"] == [2]
    assert lt_jax.load(tmp_path / "hf").default_plan.lazy_layers == (2,)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = np.random.default_rng(1).integers(0, 300, (1, 80))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(trained.logits(ids, plan="full") - ref).max() <= 2e-5
    base = lt_jax.load(tiny_ckpt)
    assert np.abs(base.logits(ids) - ref).max() > 1e-3  # training moved the weights


def test_bad_input_one_sentence_and_nothing_written(tiny_ckpt, tmp_path, capsys):
    """Run by `main` in this process (a subprocess each cost ~3 s of start; the CLI as its own process: the
    SIGKILL resume test)."""
    data = _ids_data(tmp_path / "d.jsonl", n=4)
    base = [tiny_ckpt, "--data", data, *TRAIN_ARGS, "--steps", 4]
    cases = {
        "context": (["--seq-len", 5000], "exceeds the model's context of 1024"),
        "layers": (["--plan", _plan_file(tmp_path)], "is for 5 layers but the model has 3"),
        "lighttransfer": (["--plan", "lighttransfer"], "fixed lazy layers"),
        "empty": (["--data", _empty(tmp_path)], "no training sequence"),
        "parent": (["--out", tmp_path / "no" / "such" / "dir"], "is not an existing directory"),
    }
    for name, (extra, message) in cases.items():
        out = tmp_path / f"out-{name}"
        args = base + extra + ([] if "--out" in extra else ["--out", out])
        run = _in_process(capsys, "train", *args, check=False)
        assert run.returncode == 2, name
        lines = run.stderr.strip().splitlines()
        assert message in lines[-1] and lines[-1].startswith("lt-jax train: error:"), (name, run.stderr[-500:])
        assert not out.exists(), name
    out = tmp_path / "run"  # a LoRA run through the CLI: its output holds the merged weights
    _in_process(capsys, "train", *base, "--out", out, "--save-every", 2, "--lora-rank", 2, "--eval-data", data,
                "--eval-every", 2, "--no-keep-optimizer")
    assert not (out / "checkpoints").exists() and (out / "lt_config.json").exists()  # only the final weights kept
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval_loss" in r] == [2, 4]
    import lt_jax
    ids = np.arange(40)[None]
    assert np.abs(lt_jax.load(out).logits(ids) - lt_jax.load(tiny_ckpt).logits(ids)).max() > 1e-4
    run = _in_process(capsys, "train", *base, "--out", out, "--resume", "--lr", "2e-3", "--lora-rank", 2,
                      check=False)
    assert run.returncode == 2 and "settings.lr: saved 0.001, now 0.002" in run.stderr
    run = _in_process(capsys, "train", *base, "--out", out, check=False)
    assert run.returncode == 2 and "already exists; pass --resume" in run.stderr
    # a non-finite loss stops the run, names the step and keeps the last good checkpoint
    blown = tmp_path / "blown"
    run = _in_process(capsys, "train", tiny_ckpt, "--data", data, *TRAIN_ARGS, "--steps", 8, "--lr", "1e30",
                      "--warmup", "0", "--clip", "0", "--save-every", 1, "--out", blown, check=False)
    assert run.returncode == 2 and "the loss became nan" in run.stderr.lower(), run.stderr[-500:]
    assert "last good checkpoint is step" in run.stderr and not (blown / "lt_config.json").exists()


def _plan_file(tmp_path):
    path = tmp_path / "plan5.json"
    path.write_text(json.dumps({"num_layers": 5, "lazy_layers": [1], "sink": 2, "window": 16}))
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"ids": [3]}\n')
    return path


def test_loss_terms_are_sums(tiny_lt, prompt_ids):
    """loss_terms returns the NLL sum and count, so the mean is their ratio whatever the batch split."""
    model = tiny_lt("llama")
    ids = prompt_ids[:, :64]
    labels = _labels(ids)
    batch = {"tokens": jnp.asarray(ids), "labels": jnp.asarray(labels)}
    params = stack_layers(model.params)
    total, count = loss_terms(params, batch, np.zeros(3, bool), model.config, Plan.full(3).shape)
    assert int(count) == int(np.sum(labels[:, 1:] != IGNORE))
    assert abs(float(total / count) - float(loss_fn(params, batch, model.config))) <= 1e-6


def test_lora_gradient_is_the_chain_rule_of_the_weight_gradient(tiny_lt, prompt_ids):
    """With W' = W + s B A: dL/dB = s (dL/dW') A^T and dL/dA = s B^T (dL/dW'), against the weight gradient of
    the merged model; a step moves only the adapters, and the merged weights carry them."""
    from lt_jax.train.lora import INPUT_AXES, merge
    from lt_jax.train.step import model_weights
    model = tiny_lt("llama")
    cfg = model.config
    plan = Plan(3, (1,), sink=SINK, window=WINDOW)
    s = TrainSettings.for_plan(plan, steps=5, lr=1e-2, lora_rank=4, lora_alpha=8.0)
    state = init_state(model.params, s, seed=3)
    base = jax.tree.map(np.array, state.params["base"])
    lora = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(1), a.shape), state.params["lora"])
    ids = prompt_ids[:, :T]
    batch = _batch(ids, _labels(ids))
    grads, _, _ = gradients({"base": state.params["base"], "lora": lora}, batch, plan.layers(cfg).is_lazy, cfg, s)
    merged = merge(state.params["base"], lora, s.lora_scale)
    dw = jax.grad(lambda p: loss_fn(p, {k: v[0] for k, v in batch.items()}, cfg, plan))(merged)
    for name, n_in in INPUT_AXES.items():
        g = np.asarray(dw["layers"][name])
        g = g.reshape(g.shape[0], -1, int(np.prod(g.shape[g.ndim - n_in:])))
        a, b = np.asarray(lora["layers"][name]["a"]), np.asarray(lora["layers"][name]["b"])
        assert _rel(grads["lora"]["layers"][name]["b"], s.lora_scale * np.einsum("loi,lri->lor", g, a)) <= 1e-5
        assert _rel(grads["lora"]["layers"][name]["a"], s.lora_scale * np.einsum("lor,loi->lri", b, g)) <= 1e-5
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(grads["base"]))
    for _ in range(2):
        state, _ = train_step(state, batch, plan.layers(cfg), cfg, s)
    for a, b in zip(jax.tree.leaves(state.params["base"]), jax.tree.leaves(base)):
        assert np.array_equal(np.asarray(a), b)
    weights = model_weights(state.params, s)
    assert not np.array_equal(np.asarray(weights["layers"]["qkv_proj"]), base["layers"]["qkv_proj"])
    assert np.array_equal(np.asarray(weights["layers"]["attn_norm"]), base["layers"]["attn_norm"])


def test_streaming_layers_cost_linear_time_forward_and_backward(tiny_lt):
    """XLA's FLOP count of the gradient (forward + backward, compiled, not run): doubling T doubles a streaming
    model's cost (O(T (S + W))) and more than triples a full one's (the T^2 of attention)."""
    model = tiny_lt("llama")
    cfg, params = model.config, stack_layers(model.params)

    def flops(T, plan):
        batch = {k: jax.ShapeDtypeStruct((1, T), jnp.int32) for k in ("tokens", "labels")}
        grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, cfg, plan)))
        return grad.lower(params, batch).compile().cost_analysis()["flops"]

    streaming = Plan(3, (0, 1, 2), sink=SINK, window=WINDOW)
    assert flops(2048, streaming) / flops(1024, streaming) < 2.0
    assert flops(2048, None) / flops(1024, None) > 2.8
