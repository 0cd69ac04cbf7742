"""Flags shared by several commands, declared once: the model argument, the plan flags, where a command runs
(--mesh, the processes of a job), sampling, outputs; their argparse types (checked while parsing, before any model
loads); and the few steps every model command takes (load the model, build the plan)."""
from __future__ import annotations

import argparse
import json
import sys

from lt_jax.config import DTYPES
from lt_jax.errors import LtJaxError

MODEL_HELP = "checkpoint dir, HF dir, or an asset name (smollm2, qwen2.5-coder)"


def number(kind, low=None, high=None, low_open=False, what=""):
    """An argparse type: `kind` within [low, high] ((low, high] with low_open), checked while parsing, before any
    model loads (a bad value fails in the time it takes to parse)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}")
        if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


POSITIVE = number(int, 1, what="at least 1")
NON_NEGATIVE = number(int, 0, what=">= 0")
FRACTION = number(float, 0.0, 1.0, what="in [0, 1]")
NON_NEGATIVE_FLOAT = number(float, 0.0, what=">= 0")


def parse_list(text: str, kind, flag: str) -> list:
    """'1,2,4' -> [kind(1), kind(2), kind(4)]; a clear error naming `flag` otherwise."""
    try:
        values = [kind(t.strip()) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise LtJaxError(f"{flag} must be a comma-separated list of {kind.__name__} values; got {text!r}.") from None
    if not values:
        raise LtJaxError(f"{flag} is empty.")
    return values


def parse_ids(text: str, flag: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise LtJaxError(f"{flag} must be whitespace- or comma-separated integers; got {text!r}.") from None


# ---- flag groups ------------------------------------------------------------------------------------------------

def model_argument(s, dtype: bool = True):
    """MODEL, and (unless the command has a --dtype of its own: train's compute dtype) the dtype it serves in."""
    s.add_argument("model", help=MODEL_HELP)
    if dtype:
        s.add_argument("--dtype", dest="weights_dtype", choices=DTYPES, default=None,
                       help="weights and KV cache in float32 or bfloat16 (softmax, lazy ratios and logits stay "
                            "float32; default: the checkpoint's own dtype, float32 for an HF directory)")


def output(s, *names, kind: str, **kwargs):
    """An argument naming something the command writes (`kind`: file, image or folder). Every one goes through
    `lt_jax.files`' guard; tests/integration/test_cli.py walks them all with a file of the user's."""
    action = s.add_argument(*names, **kwargs)
    action.output = kind
    return action


PLAN_HELP = ("full | streaming | first | last | random[:SEED] | periodic[:OFFSET] (evenly spaced lazy layers) | "
             "lighttransfer (chosen per prompt from the lazy ratios) | retrieval-aware[:PROBE|:CALIBRATION.json] "
             "(lighttransfer that never makes the calibration's most copying layers lazy; run `lt-jax calibrate` "
             "first) | loss-guided[:PROBE|:CALIBRATION.json] (fixed: the layers of lowest score stream; run `lt-jax "
             "calibrate --probe nll` first) | PLAN.json")


def plan_flags(s, with_plan: bool = True):
    """--plan (unless eval and bench, which name plans in --methods) and the flags that shape a plan."""
    if with_plan:
        s.add_argument("--plan", default=None, help=f"{PLAN_HELP} (default: the model's stored plan, which a trained "
                       f"hybrid has; otherwise full)")
    s.add_argument("--lazy-fraction", type=FRACTION, default=0.5, help="fraction of lazy layers (default 0.5)")
    stream_flags(s)
    s.add_argument("--prefill", choices=["exact", "hybrid"], default=None,
                   help="exact: full attention over the prompt in every layer (default); hybrid: each layer's mask")
    s.add_argument("--w-last", type=POSITIVE, default=None,
                   help="lighttransfer: last prompt queries that measure the lazy ratios (default 32)")
    s.add_argument("--protect", type=NON_NEGATIVE, default=None,
                   help="retrieval-aware: layers of highest calibration score that never go lazy (default: a "
                        "fifth of the layers, at most those that stay full)")


def stream_flags(s, preset: bool = True):
    s.add_argument("--sink", type=NON_NEGATIVE, default=None, help="sink tokens S of streaming layers (default 4)")
    s.add_argument("--window", type=POSITIVE, default=None, help="window W of streaming layers (default 1020)")
    if preset:
        s.add_argument("--stream-preset", choices=["lighttrans-code"], default=None,
                       help="lighttrans-code: S=129, W=1025 (the released LightTransfer training mask)")


def run_flags(s, processes: bool = False):
    """Where a command runs: a device mesh, and (eval, batch generate) the processes of a multi-host job
    (docs/pods.md)."""
    s.add_argument("--mesh", default=None,
                   help="device mesh AXIS=SIZE,... over the axes data, model, fsdp, e.g. data=2,model=4 (product = "
                        "device count; one size may be -1); weights, KV cache and batches are sharded by "
                        "lt_jax.sharding.RULES (default: one device)")
    if not processes:
        return
    s.add_argument("--coordinator", default=None,
                   help="HOST:PORT of process 0 of a multi-process job, or 'auto' where JAX detects the cluster "
                        "(TPU pods, SLURM); examples are split across processes")
    s.add_argument("--num-processes", type=POSITIVE, default=None, help="processes in the job (with --coordinator)")
    s.add_argument("--process-id", type=NON_NEGATIVE, default=None, help="this process's index (with --coordinator)")


def sampling_flags(s):
    s.add_argument("--max-new-tokens", type=POSITIVE, default=64, help="tokens to generate at most (default 64)")
    s.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=0.0,
                   help="sampling temperature; 0 = greedy (default 0)")
    s.add_argument("--top-k", type=NON_NEGATIVE, default=0, help="sample among the K likeliest tokens; 0 = off "
                   "(default 0)")
    s.add_argument("--top-p", type=number(float, 0.0, 1.0, low_open=True, what="in (0, 1]"), default=1.0,
                   help="sample among the likeliest tokens holding this much probability; 1 = off (default 1)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    s.add_argument("--stop-ids", default=None, help="token ids that end a row (default: the model's EOS ids)")


def sampling(args, stop=None):
    from lt_jax.inference import Sampling
    return Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                    None if stop is None else tuple(stop))


# ---- steps every model command takes -----------------------------------------------------------------------------

def load_model(args):
    """The model in --dtype, on the mesh of --mesh (the part this process addresses) when one is given."""
    import lt_jax
    return lt_jax.load(args.model, dtype=getattr(args, "weights_dtype", None), mesh=args.mesh)


def model_config(args):
    """MODEL's config alone (no weights): what the checks that need only it read before the load; None where
    MODEL is neither a checkpoint nor an HF directory (the load then says so)."""
    from pathlib import Path

    from checkpoints_conv import is_checkpoint, read_hf_config
    from checkpoints_conv.store import CONFIG_FILE
    from lt_jax import assets
    from lt_jax.config import Config
    path = assets.resolve_model(args.model)
    if is_checkpoint(path):
        return Config.from_json(Path(path) / CONFIG_FILE)
    return read_hf_config(path) if (Path(path) / "config.json").exists() else None


def check_plans(args, specs: dict) -> None:
    """Plans built from the config alone before the weights load (a plan file that is not one, a retrieval-aware
    plan without its calibration, a flag out of range fail in seconds): `specs` maps a plan spec (None: the
    model's stored plan, checked by the load) to its keyword flags."""
    from lt_jax import assets, calibration
    from lt_jax.plan import make_plan
    cfg = model_config(args)
    if cfg is None:
        return
    for spec, flags in specs.items():
        if spec is None:
            continue
        flags = {k: v for k, v in flags.items() if v is not None}
        if (found := calibration.for_plan(assets.resolve_model(args.model), spec, cfg)) is not None:
            flags["calibration"] = found
        make_plan(spec, cfg, **flags)


def plan_flag_values(args) -> dict:
    """The plan flags as `Model.plan`'s keyword arguments (those the command has)."""
    return dict(lazy_fraction=args.lazy_fraction, sink=args.sink, window=args.window,
                preset=getattr(args, "stream_preset", None), prefill=getattr(args, "prefill", None),
                w_last=getattr(args, "w_last", None), protect=getattr(args, "protect", None))


def plan_from_args(model, args):
    return model.plan(args.plan, **plan_flag_values(args))


def plan_json(plan) -> dict:
    return json.loads(plan.to_json())


def say(command: str):
    """Progress and notes of `command` on stderr, one line each."""
    return lambda msg: print(f"[lt-jax {command}] {msg}", file=sys.stderr, flush=True)


def note_if_plan_cannot_matter(plan, length: int, what: str = "tokens"):
    """Prompts or texts no longer than S + W: a streaming layer sees everything, every lazy ratio is 1."""
    if (plan.lazy_layers or plan.select_lazy) and length <= plan.sink + plan.window:
        print(f"[note: {length} {what} <= S + W = {plan.sink + plan.window}: a streaming layer still sees every "
              f"token, so this plan gives the same numbers as all-full" + (
                  "; lighttransfer's choice is the tie rule (every ratio is 1)"
                  if plan.source.startswith("lighttransfer") else "") + "]", file=sys.stderr)
