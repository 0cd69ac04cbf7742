"""`lt-jax`: a thin command layer over the library. One module per command (NAME, HELP, add_arguments(parser),
run(args) -> the result; INTERRUPTED: what a Ctrl-C leaves, for long commands), listed in COMMANDS. Every
subcommand takes --json (the result on stdout, one JSON object) and reports bad input as one sentence on stderr
with exit status 2; Ctrl-C ends a run with one line and exit status 130."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading

from lt_jax.cli import bench, calibrate, compile, convert, demo, export, fetch, generate, identify, ppl, serve, train
from lt_jax.cli import eval as eval_
from lt_jax.cli import lm_eval
from lt_jax.errors import LtJaxError

COMMANDS = [convert, export, train, ppl, generate, demo, identify, calibrate, eval_, bench, lm_eval, serve, compile,
            fetch]
# these print their own summary
QUIET = {"demo", "generate", "eval", "bench", "identify", "ppl", "train", "calibrate", "serve", "lm-eval", "compile"}
NO_PERSISTENT_CACHE = {"convert", "bench", "compile"}  # bench and compile report compile times


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Bad flags as one line (`lt-jax CMD: error: ...`, exit 2) like every other bad input, not usage + error."""

    def error(self, message):
        raise _UsageError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lt-jax", description="LightTransfer in JAX: hybrid streaming/full attention "
                                "LLMs converted from Hugging Face checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        s = sub.add_parser(command.NAME, help=command.HELP, description=command.HELP)
        s.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
        command.add_arguments(s)
        s.set_defaults(command_module=command)
    return p


@contextlib.contextmanager
def _compilation_cache(enabled: bool):
    """The persistent compilation cache for one command, then the caller's settings back: `main` called in-process
    (tests, notebooks) must not leave a cache on for later work, e.g. TPU compiles that cannot reload from it."""
    if not enabled:
        yield
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    from lt_jax.assets import cache_dir
    settings = {"jax_compilation_cache_dir": str(cache_dir() / "jax_cache"),
                "jax_persistent_cache_min_compile_time_secs": 0.5}
    before = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def skip_absent_tpu():
    """With libtpu installed (the test extra brings it, for `lt-jax compile`) on a host with no TPU chip, jax would
    still start the TPU plugin, which prints worker-hostname warnings before every command: keep jax on the CPU
    there, unless JAX_PLATFORMS says otherwise or a GPU is visible. `lt-jax compile` needs only libtpu's topology,
    not its runtime; loading libtpu for it prints five lines asking for TPU_ACCELERATOR_TYPE and
    TPU_WORKER_HOSTNAMES, which describe this host's own chips: with none, neutral values (unless set) quiet them
    and change nothing compiled (the topology comes from --target; the same plan either way)."""
    import importlib.util
    import os
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    import jax
    try:  # what jax itself reads to decide whether this is a TPU VM (private: a jax without it changes nothing)
        from jax._src import hardware_utils
        accelerator = (hardware_utils.num_available_tpu_chips_and_device_id()[0]
                       or hardware_utils.has_visible_nvidia_gpu() or hardware_utils.num_available_amd_gpus(stop_at=1))
    except (ImportError, AttributeError, TypeError, OSError):
        return
    if accelerator:
        return
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")


def _interrupted(args) -> int:
    from lt_jax import progress
    note = getattr(args.command_module, "INTERRUPTED", "rerun the same command to start again")
    print(f"\nlt-jax {args.command}: interrupted{progress.where()}; {note}.", file=sys.stderr, flush=True)
    return 130


def main(argv=None) -> int:
    from lt_jax import progress
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        print(e, file=sys.stderr)
        return 2
    skip_absent_tpu()
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        progress.catch_interrupts()
    try:
        if getattr(args, "coordinator", None) or getattr(args, "num_processes", None) is not None \
                or getattr(args, "process_id", None) is not None:
            from lt_jax import distributed
            distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        if getattr(args, "mesh", None):
            from lt_jax import sharding
            sharding.check_axes(args.mesh)  # a typo of an axis name, before the load
        with _compilation_cache(args.command not in NO_PERSISTENT_CACHE):
            result = args.command_module.run(args)
        progress.check_interrupt()  # one swallowed on the way (a garbage-collector callback) still ends the run
    except KeyboardInterrupt:
        return _interrupted(args)
    except LtJaxError as e:
        print(f"lt-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread:
            progress.release_interrupts()
    if args.json:
        print(json.dumps(result))
    elif args.command not in QUIET:
        print("\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
