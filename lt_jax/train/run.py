"""`lt-jax train`'s loop around `train_step` (docs/design.md §13): checks every input before creating anything,
saves with orbax's CheckpointManager (atomic saves, the last K kept), resumes bit-exactly (params, optimizer
state and step restored; the data order is a function of the step), logs every step to train_log.jsonl and
finishes the output directory as an lt-jax checkpoint whose default plan is the training plan.

OUT/
  run.json          what defines the run (settings, plan, data fingerprint): --resume must match it
  checkpoints/N/    orbax: the train state after N steps
  train_log.jsonl   one row per step (and per evaluation)
  params/, lt_config.json, plan.json, tokenizer files   the trained model, written when the last step is done
  loss.png          the loss curve
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

from lt_jax import sharding
from lt_jax.errors import LtJaxError
from lt_jax.files import differences, write_atomic
from lt_jax.plan import Plan
from lt_jax.train.data import Sequences, eval_batches, make_batch, read_sequences, step_rows
from lt_jax.train.step import (TrainSettings, TrainState, eval_terms, host_metrics, init_state, model_weights,
                               train_step)

RUN_FILE, LOG_FILE, PLOT_FILE, CHECKPOINTS = "run.json", "train_log.jsonl", "loss.png", "checkpoints"


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """The loop's settings beside the step's: the batch, the data order, saving and evaluation."""
    seq_len: int = 512
    batch_size: int = 1
    grad_accum: int = 1
    seed: int = 0
    save_every: int = 50
    keep: int = 2  # checkpoints kept while training; each holds the weights and AdamW's two moments (3x fp32)
    eval_every: int = 50
    keep_optimizer: bool = True  # False: the checkpoints are deleted once the final weights are saved


def defining(model, plan: Plan, settings: TrainSettings, options: RunOptions, data: Sequences) -> dict:
    """What makes two runs the same run: every setting that changes the parameters (not saving or evaluation)."""
    return {"model": str(model.path), "settings": dataclasses.asdict(settings),
            "plan": {"lazy_layers": list(plan.lazy_layers), "sink": plan.sink, "window": plan.window},
            "seq_len": options.seq_len, "batch_size": options.batch_size, "grad_accum": options.grad_accum,
            "seed": options.seed, "data": data.fingerprint(), "sequences": len(data)}



def check_out(out: Path, resume: bool):
    out = Path(out)
    if out.is_file():
        raise LtJaxError(f"--out {out} is a file, not a folder; it is left as it is: give a new folder path.")
    if out.exists() and not resume:
        raise LtJaxError(f"output directory {out} already exists; pass --resume to continue its run, or choose "
                         f"another path.")
    if resume and not (out / RUN_FILE).exists():
        raise LtJaxError(f"--resume: {out} holds no run to resume (no {RUN_FILE}).")
    parent = out.absolute().parent
    if not out.exists() and not parent.is_dir():
        raise LtJaxError(f"cannot create output directory {out}: {parent} is not an existing directory.")
    if not os.access(out if out.exists() else parent, os.W_OK):
        raise LtJaxError(f"cannot write output directory {out}: {out if out.exists() else parent} is not writable.")


def _manager(out: Path, keep: int):
    import orbax.checkpoint as ocp
    # Synchronous saves: a save is finished (renamed from orbax's temporary directory into place) before the next
    # step, so a kill at any time leaves every earlier finished checkpoint usable.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
    return ocp.CheckpointManager((out / CHECKPOINTS).absolute(), options=options)


def _save(manager, state: TrainState, step: int):
    import orbax.checkpoint as ocp
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
    manager.wait_until_finished()


def _restore(manager, like: TrainState) -> TrainState:
    import orbax.checkpoint as ocp
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored.state


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _keep_log_until(path: Path, step: int):
    """Drops rows after the restored checkpoint (they are recomputed, identically); atomic."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in _read_log(path) if r["step"] <= step))


def evaluate(state: TrainState, data: Sequences, layers, cfg, settings: TrainSettings, options: RunOptions) -> float:
    """Mean NLL of held-out sequences under the training plan."""
    total, count = 0.0, 0
    for batch in eval_batches(data, options.batch_size, options.seq_len):
        t, n = jax.device_get(eval_terms(state.params, batch, layers, cfg, settings))
        total, count = total + float(t), count + int(n)
    return total / max(count, 1)


def train(model, plan: Plan, data_paths, out, settings: TrainSettings, options: RunOptions = RunOptions(),
          eval_paths=None, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune `model` as the hybrid `plan` on `data_paths`; returns the run's summary (also the CLI's --json)."""
    out = Path(out)
    cfg = model.config
    plan = plan.validate(cfg)
    context = cfg.max_position_embeddings
    if options.seq_len > context:
        raise LtJaxError(f"--seq-len {options.seq_len} exceeds the model's context of {context} tokens.")
    if options.seq_len < 2:
        raise LtJaxError(f"--seq-len {options.seq_len} leaves nothing to predict; need at least 2.")
    check_out(out, resume)
    data = read_sequences(data_paths, model, options.seq_len)
    held_out = read_sequences(eval_paths, model, options.seq_len) if eval_paths else None
    run = defining(model, plan, settings, options, data)
    if resume:
        saved = json.loads((out / RUN_FILE).read_text())
        diff = differences(saved, run, "saved", "now")
        if diff:
            raise LtJaxError(f"--resume: {out} was trained with other settings: {'; '.join(diff)}.")
        if (out / "lt_config.json").exists():
            return _summary(out, plan, settings, data, already=True)
    else:
        out.mkdir()
        write_atomic(out / RUN_FILE, json.dumps(run, indent=2))

    layers = plan.layers(cfg)
    rows_per_step = options.batch_size * options.grad_accum
    manager = _manager(out, options.keep)
    state = init_state(model.params, settings, options.seed)
    if model.mesh is not None:  # weights keep the model's shardings; counters join the mesh (one compilation)
        state = sharding.onto_mesh(state, model.mesh)
    start = 0
    if manager.latest_step() is not None:
        state = _restore(manager, state)
        start = int(state.step)
        if progress:
            print(f"[lt-jax train] resumed {out} from its checkpoint at step {start} of {settings.steps}",
                  file=sys.stderr, flush=True)
    elif resume and progress:
        print(f"[lt-jax train] resumed {out}: no checkpoint was saved yet, starting at step 0", file=sys.stderr,
              flush=True)
    _keep_log_until(out / LOG_FILE, start)
    bar = _bar(settings.steps, start, progress)
    last_good = start if manager.latest_step() is not None else None
    with open(out / LOG_FILE, "a") as log:
        for step in range(start, settings.steps):
            rows = step_rows(len(data), rows_per_step, options.seed, step)
            batch = make_batch(data, rows, options.grad_accum, options.seq_len)
            t0 = time.perf_counter()
            state, metrics = train_step(state, batch, layers, cfg, settings)
            metrics = host_metrics(metrics)
            seconds = time.perf_counter() - t0
            if not math.isfinite(metrics["loss"]) or not math.isfinite(metrics["grad_norm"]):
                kept = (f"the last good checkpoint is step {last_good} in {out / CHECKPOINTS}" if last_good
                        else "no checkpoint was saved yet")
                raise LtJaxError(f"the loss became {metrics['loss']} (gradient norm {metrics['grad_norm']}) at step "
                                 f"{step + 1}; stopped without saving it: {kept}. Try a lower --lr or --clip.")
            seen = int((batch["positions"] >= 0).sum())
            row = {"step": step + 1, **metrics, "seq_tokens": seen, "seconds": round(seconds, 4),
                   "tokens_per_s": round(seen / seconds, 2)}
            done = step + 1
            if held_out is not None and (done % options.eval_every == 0 or done == settings.steps):
                row["eval_loss"] = evaluate(state, held_out, layers, cfg, settings, options)
            if done % options.save_every == 0 or done == settings.steps:
                _save(manager, state, done)
                last_good = done
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
    bar.close()
    _finish(out, model, state, plan, settings)
    if not options.keep_optimizer:  # the final weights are saved: the optimizer checkpoints can go
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return {**_summary(out, plan, settings, data), "resumed_from": start if resume else None}


def _bar(total: int, start: int, enabled: bool):
    from lt_jax.progress import progress_bar
    return progress_bar(total, "train", "step", disable=not enabled, initial=start)


def _finish(out: Path, model, state: TrainState, plan: Plan, settings: TrainSettings):
    """The trained weights as an lt-jax checkpoint in OUT with the training plan as its default, then the plot."""
    from checkpoints_conv import write_model_files
    cfg = model.config
    params = jax.tree.map(lambda a: np.asarray(a).astype(cfg.dtype), jax.device_get(model_weights(state.params,
                                                                                                  settings)))
    trained = dataclasses.replace(plan, source=f"lt-jax train ({plan.source})")
    tokenizer_dir = model.path if model.path is not None and model.tokenizer is not None else None
    write_model_files(out, cfg, params, tokenizer_dir, trained.to_json())
    try:
        plot_losses(_read_log(out / LOG_FILE), out / PLOT_FILE)
    except Exception as e:  # the model is saved; a figure that fails loses nothing computed
        print(f"[note: could not draw {out / PLOT_FILE}: {e}]", file=sys.stderr)


def _summary(out: Path, plan: Plan, settings: TrainSettings, data: Sequences, already: bool = False) -> dict:
    log = [r for r in _read_log(out / LOG_FILE) if "loss" in r]
    evals = [r for r in log if "eval_loss" in r]
    rates = [r["tokens_per_s"] for r in log[1:]] or [r["tokens_per_s"] for r in log]
    return {"out": str(out), "steps": settings.steps, "already_complete": already,
            "plan": json.loads(plan.to_json()), "sequences": len(data), "data_tokens": data.tokens,
            "dropped": data.dropped, "truncated": data.truncated,
            "first_loss": log[0]["loss"] if log else None, "final_loss": log[-1]["loss"] if log else None,
            "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
            "tokens_per_s": float(np.median(rates)) if rates else None}


def plot_losses(rows: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    # token-weighted mean over the last `span` steps: steps differ in how many tokens carry loss
    span = min(20, len(rows) // 5)
    ax.plot(steps, loss, color="0.55", lw=0.8, marker="." if len(rows) <= 50 else None, ms=4,
            label="train loss per step")
    if span > 1:  # over one step it is the per-step line itself
        weights = np.array([r["tokens"] for r in rows], np.float64)
        kernel = np.ones(span)
        smooth = (np.convolve(loss * weights, kernel)[:len(loss)] /
                  np.maximum(np.convolve(weights, kernel)[:len(loss)], 1))
        ax.plot(steps, smooth, color="tab:blue", lw=1.8, label=f"per token, mean of the last {span} steps")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="tab:orange",
                label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("mean NLL (nats/token)")
    ax.set_title("lt-jax train", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["RunOptions", "defining", "evaluate", "plot_losses", "train"]
