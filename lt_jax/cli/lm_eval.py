"""`lt-jax lm-eval MODEL --tasks T,... [--plan P] [--include-path DIR] [--metadata JSON] [--limit N]
[--output results.json]`: EleutherAI's lm-evaluation-harness over the model under a plan
(`lt_jax.lm_eval_model.LtJaxLM`; needs the `lm-eval` extra). Stock tasks download their data, so on a machine without
the network use local tasks (`--include-path`, a folder of task YAMLs over local files). Tasks that build their data
(RULER) read the task metadata: the model's tokenizer folder as `tokenizer`, and what `--metadata` adds (RULER's
`max_seq_lengths`)."""
from __future__ import annotations

import argparse
import json

from lt_jax.cli.flags import (POSITIVE, check_plans, load_model, model_argument, output, plan_flag_values,
                              plan_flags, plan_from_args, plan_json, run_flags, say)
from lt_jax.errors import LtJaxError
from lt_jax.files import output_file, write_atomic

NAME = "lm-eval"
HELP = "run lm-evaluation-harness tasks on the model under a plan (loglikelihood, rolling, generate_until)"
INTERRUPTED = "nothing was written; rerun the same command to evaluate again"


def add_arguments(s):
    run_flags(s)
    model_argument(s)
    s.add_argument("--tasks", required=True, help="lm-eval task names or groups, comma separated")
    s.add_argument("--include-path", default=None, help="a folder of extra task YAMLs (e.g. over local JSONL files)")
    s.add_argument("--metadata", default=None, type=_metadata,
                   help='JSON object for tasks that build their data, e.g. \'{"max_seq_lengths": [4096]}\' for RULER '
                        "(the model's tokenizer folder is passed as tokenizer)")
    s.add_argument("--limit", type=POSITIVE, default=None, help="at most N documents per task (default: all)")
    s.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    s.add_argument("--batch-size", type=POSITIVE, default=8, help="requests scored per compiled call (default 8)")
    output(s, "--output", kind="file", default=None,
           help="write lm-eval's results JSON here (replaces an earlier lm-eval results file only)")
    plan_flags(s)


def _metadata(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--metadata {text!r} is not a JSON object")
    return value


def _is_results(path) -> bool:
    try:
        return {"results", "config"} <= set(json.loads(open(path).read()))
    except (OSError, ValueError, TypeError):
        return False


def run(args) -> dict:
    out = output_file(args.output, "--output", "an lm-eval results file", _is_results)
    check_plans(args, {args.plan: plan_flag_values(args)})
    try:
        from lm_eval import simple_evaluate, utils
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LtJaxError("lt-jax lm-eval needs lm-evaluation-harness: pip install 'lt-jax[lm-eval]'.") from None
    from lt_jax.lm_eval_model import LtJaxLM
    log = say(NAME)
    model = load_model(args)
    plan = plan_from_args(model, args)
    tasks = [t for t in args.tasks.split(",") if t]
    tokenizer = getattr(model.tokenizer, "name_or_path", None)
    metadata = ({"tokenizer": tokenizer} if tokenizer else {}) | (args.metadata or {})
    manager = TaskManager(include_path=args.include_path, metadata=metadata)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LtJaxError(f"--tasks names unknown lm-eval task(s) {unknown}" + (
            f" (not in lm-eval nor in --include-path {args.include_path})" if args.include_path else
            " (give --include-path for local task YAMLs)") + ".")
    log(f"{', '.join(tasks)} under plan {plan.source}")
    results = simple_evaluate(model=LtJaxLM(model=model, plan=plan, batch_size=args.batch_size), tasks=tasks,
                              task_manager=manager, limit=args.limit, num_fewshot=args.num_fewshot)
    if out is not None:
        write_atomic(out, json.dumps(results, indent=2, default=str))
    if not args.json:
        print(utils.make_table(results))
    return {"results": results["results"], "plan": plan_json(plan), "output": None if out is None else str(out)}
