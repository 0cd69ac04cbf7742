#!/usr/bin/env python
"""Fetch the real assets (the README's Assets section lists them) into the git-ignored cache: SmolLM2-135M-Instruct
(as an HF checkpoint and as an lt-jax checkpoint), the Paul Graham essays, and with --qwen Qwen2.5-Coder-0.5B-Instruct.
Idempotent: a second run does nothing. Set LT_JAX_ASSETS to choose the folder."""
import argparse
import json
import sys

from lt_jax import assets
from lt_jax.cli.main import skip_absent_tpu
from lt_jax.errors import LtJaxError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--qwen", action="store_true", help="also Qwen2.5-Coder-0.5B-Instruct (~500 MB, slow on CPU)")
    p.add_argument("--json", action="store_true", help="print the asset paths as JSON")
    args = p.parse_args()
    skip_absent_tpu()  # converting runs jax: with libtpu but no TPU, keep it on the CPU and quiet, as the CLI does
    try:
        paths = assets.fetch(qwen=args.qwen)
    except LtJaxError as e:
        print(f"fetch_assets: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(paths) if args.json else "\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
