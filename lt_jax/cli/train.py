"""`lt-jax train MODEL --data ... --plan PLAN --out OUT`: LightTransfer-Train."""
from __future__ import annotations

import argparse
from pathlib import Path

from lt_jax.cli.flags import (FRACTION, NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE, check_plans, load_model,
                              model_argument, number, output, plan_flag_values, plan_from_args, run_flags, say,
                              stream_flags)
from lt_jax.errors import LtJaxError

NAME = "train"
HELP = ("LightTransfer-Train: fine-tune the model as a fixed hybrid (streaming layers masked in training too) with "
        "AdamW; resumable; OUT becomes a checkpoint whose default plan is the training plan")
INTERRUPTED = "the checkpoints saved so far are kept; rerun the same command with --resume to continue"


def add_arguments(s):
    run_flags(s)
    model_argument(s, dtype=False)  # its --dtype is the compute dtype; weights load in float32
    s.add_argument("--data", nargs="+", required=True,
                   help="text files (split into --seq-len windows) or JSONL with text, prompt+completion, chat "
                        "messages, or ids (+ labels) per line")
    s.add_argument("--plan", required=True,
                   help="the fixed hybrid to train: a plan file from `lt-jax identify`, first, last, random[:SEED], "
                        "streaming, full")
    output(s, "--out", kind="folder", required=True,
           help="output directory (must not exist, unless --resume)")
    s.add_argument("--steps", type=POSITIVE, default=200, help="optimizer steps (default 200)")
    s.add_argument("--seq-len", type=POSITIVE, default=512, help="tokens per sequence at most (default 512)")
    s.add_argument("--batch-size", type=POSITIVE, default=1, help="sequences per micro-batch (default 1)")
    s.add_argument("--grad-accum", type=POSITIVE, default=1,
                   help="micro-batches per optimizer step; the loss is the mean over all their labelled tokens "
                        "(default 1)")
    s.add_argument("--lr", type=number(float, 0.0, low_open=True, what="> 0"), default=1e-5,
                   help="peak learning rate (default 1e-5)")
    s.add_argument("--warmup", type=NON_NEGATIVE, default=0, help="linear warmup steps (default 0)")
    s.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="after warmup: cosine decay to 10%% of --lr, or constant (default cosine)")
    s.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, default=0.0,
                   help="AdamW's decoupled weight decay, not on norms and biases (default 0)")
    s.add_argument("--clip", type=NON_NEGATIVE_FLOAT, default=1.0,
                   help="clip the global gradient norm to this; 0 = off (default 1.0)")
    s.add_argument("--trainable", choices=["all", "attention", "mlp", "lazy-layers", "lazy-attention"],
                   default="all", help="what trains; the rest stays bit-identical (default all)")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of the forward and backward; master weights stay float32 (default float32)")
    s.add_argument("--remat", action="store_true",
                   help="recompute each layer in the backward pass: less memory, about a third more compute")
    s.add_argument("--lora-rank", type=NON_NEGATIVE, default=0,
                   help="train rank-R LoRA adapters on the projections instead of the weights (merged into the "
                        "saved model); 0 = off (default 0)")
    s.add_argument("--lora-alpha", type=NON_NEGATIVE_FLOAT, default=0.0,
                   help="LoRA scale alpha / R (default: alpha = R)")
    s.add_argument("--seed", type=int, default=0, help="seed of the data order (default 0)")
    s.add_argument("--save-every", type=POSITIVE, default=50, help="checkpoint every N steps (default 50)")
    s.add_argument("--keep", type=POSITIVE, default=2,
                   help="checkpoints kept in OUT/checkpoints (default 2); each holds the float32 weights and "
                        "AdamW's two moments, about 3x the weights (SmolLM2-135M: about 1.5 GB)")
    s.add_argument("--keep-optimizer", action=argparse.BooleanOptionalAction, default=True,
                   help="keep OUT/checkpoints once training ends, so a later --resume with more --steps can "
                        "continue; --no-keep-optimizer deletes them, leaving only the final weights (default: keep)")
    s.add_argument("--eval-data", nargs="+", default=None, help="held-out files (same formats as --data)")
    s.add_argument("--eval-every", type=POSITIVE, default=50, help="held-out loss every N steps (default 50)")
    s.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (same settings and data), bit-exactly")
    s.add_argument("--lazy-fraction", type=FRACTION, default=0.5,
                   help="fraction of lazy layers for first/last/random plans (default 0.5)")
    stream_flags(s)


def run(args) -> dict:
    """Fine-tune a fixed hybrid plan; OUT becomes a checkpoint with that plan as default."""
    from lt_jax.train.data import check_files
    from lt_jax.train.run import RunOptions, check_out, train
    from lt_jax.train.step import TrainSettings
    check_out(Path(args.out), args.resume)  # before the model loads
    for path in [*args.data, *(args.eval_data or [])]:
        if not Path(path).is_file():
            raise LtJaxError(f"data file {path} does not exist (or is not a file).")
    check_files([*args.data, *(args.eval_data or [])])  # the shape of every JSONL line, before the load
    check_plans(args, {args.plan: plan_flag_values(args)})
    model = load_model(args)
    plan = plan_from_args(model, args)
    settings = TrainSettings.for_plan(
        plan, steps=args.steps, lr=args.lr, warmup=args.warmup, schedule=args.schedule,
        weight_decay=args.weight_decay, clip=args.clip, trainable=args.trainable, compute_dtype=args.dtype,
        remat=args.remat, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
    options = RunOptions(seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         seed=args.seed, save_every=args.save_every, keep=args.keep, eval_every=args.eval_every,
                         keep_optimizer=args.keep_optimizer)
    layers = f"layers {list(plan.lazy_layers)} streaming (S={plan.sink}, W={plan.window})" if plan.lazy_layers \
        else "every layer full"
    say(NAME)(f"training {model.label} as {plan.source}: {layers}; {args.steps} steps of {args.batch_size} x "
              f"{args.grad_accum} sequences of <= {args.seq_len} tokens")
    result = train(model, plan, args.data, args.out, settings, options, args.eval_data, args.resume)
    if not args.json:
        if result["already_complete"]:
            print(f"{args.out}: already complete ({args.steps} steps); nothing to do.")
        else:
            resumed = result.get("resumed_from")
            print(f"trained {args.steps} steps" + (f" (resumed at step {resumed})" if resumed is not None else "")
                  + f": loss {result['first_loss']:.4f} -> {result['final_loss']:.4f}"
                  + (f", held-out {result['final_eval_loss']:.4f}" if result["final_eval_loss"] is not None else "")
                  + f"; {result['tokens_per_s']:.0f} tokens/s")
            print(f"checkpoint {args.out} (lt_jax.load opens it with this plan as its default; "
                  f"lt-jax export {args.out} HF_DIR for transformers)")
    return result
