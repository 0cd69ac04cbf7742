"""`lt-jax demo`: the README's two minutes: SmolLM2 against transformers, then a question with half of the layers
lazy."""
from __future__ import annotations

import time
from pathlib import Path

from lt_jax.cli import flags
from lt_jax.cli.flags import POSITIVE

NAME = "demo"
HELP = ("fetch SmolLM2-135M-Instruct, compare perplexity with transformers, answer a question about an essay with "
        "half of the layers chosen lazy by LightTransfer-Test")
DEMO_ESSAY = "addiction.txt"
DEMO_TOKENS = 1024
DEMO_QUESTION = "In one sentence: what is this essay about?"


def add_arguments(s):
    s.add_argument("--tokens", type=POSITIVE, default=DEMO_TOKENS,
                   help=f"tokens of the essay scored for perplexity (default {DEMO_TOKENS})")
    s.add_argument("--essay-tokens", type=POSITIVE, default=1800,
                   help="tokens of the essay put before the question (default 1800)")
    s.add_argument("--new-tokens", type=POSITIVE, default=48, help="answer tokens at most (default 48)")
    s.add_argument("--plan", default="lighttransfer",
                   help="layer plan for the answer (default: lighttransfer, 50%% of the layers chosen lazy)")


def transformers_ppl(hf_dir: Path, ids: list[int]) -> float:
    """Perplexity of the same tokens from transformers' torch model in fp32 (the independent reference)."""
    import torch
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        return float(torch.exp(hf(x, labels=x).loss))


def run(args) -> dict:
    import lt_jax
    from lt_jax import assets
    from lt_jax.cache import expected_kv_bytes
    from lt_jax.plan import Plan
    paths = assets.fetch()
    model = lt_jax.load(paths["smollm2"])
    essay_text = (Path(paths["essays"]) / DEMO_ESSAY).read_text()
    ids = model.encode(essay_text)[:args.tokens]
    say = flags.say(NAME)
    say(f"perplexity of {len(ids)} essay tokens, lt-jax ...")
    t0 = time.perf_counter()
    ours = model.perplexity(ids)
    t_ours = time.perf_counter() - t0
    say("the same with transformers (the reference) ...")
    reference = transformers_ppl(Path(paths["smollm2_hf"]), ids)

    # A question about the essay, answered with half of the layers streaming (S=4 sinks + a 1020-token window).
    plan = model.plan(args.plan, lazy_fraction=0.5)
    essay = model.decode(model.encode(essay_text)[:args.essay_tokens])
    prompt = model.chat_ids(f"{essay}\n\n{DEMO_QUESTION}")
    say(f"answering a question after {len(prompt)} tokens of the essay, plan {args.plan} "
        f"(prefill, lazy-layer choice, up to {args.new_tokens} new tokens) ...")
    t0 = time.perf_counter()
    (answer,) = model.generate([prompt], plan=plan, max_new_tokens=args.new_tokens)
    t_gen = time.perf_counter() - t0
    chosen = answer["plan"]
    slots = model.cache_len(len(prompt), args.new_tokens)
    kv = expected_kv_bytes(model.config, plan, 1, slots)
    kv_full = expected_kv_bytes(model.config, Plan.full(model.config.num_layers), 1, slots)
    result = {"model": model.label, "essay": DEMO_ESSAY, "tokens": ours["tokens"] + 1,
              "ppl_lt_jax": ours["ppl"], "ppl_transformers": reference,
              "ppl_rel_diff": abs(ours["ppl"] - reference) / reference, "seconds_ppl": round(t_ours, 2),
              "question": DEMO_QUESTION, "prompt_tokens": len(prompt), "plan": flags.plan_json(chosen),
              "lazy_ratios": answer.get("lazy_ratios"),
              "answer": answer["text"], "seconds_generate": round(t_gen, 2),
              "kv_cache_bytes": kv, "kv_cache_bytes_all_full": kv_full}
    if not args.json:
        mib = 1 / 2**20
        print(f"model       {result['model']} ({model.config.arch}, {model.config.num_layers} layers)")
        print(f"perplexity  {ours['ppl']:.4f} lt-jax  vs  {reference:.4f} transformers  "
              f"on {result['tokens']} tokens of {DEMO_ESSAY} (relative difference {result['ppl_rel_diff']:.1e})")
        print(f"question    {DEMO_QUESTION}  (after {len(prompt)} tokens of the essay)")
        print(f"plan        {chosen.source}: layers {list(chosen.lazy_layers)} streaming (S={chosen.sink}, "
              f"W={chosen.window}), the rest full")
        if answer.get("lazy_ratios"):
            print(f"ratios      {' '.join(f'{r:.2f}' for r in answer['lazy_ratios'])}  (per layer; higher = lazier)")
        print(f"answer      {answer['text'].strip()}")
        print(f"KV cache    {kv * mib:.1f} MiB vs {kv_full * mib:.1f} MiB with every layer full "
              f"({1 - kv / kv_full:.0%} saved; {t_gen:.1f} s)")
        ring = min(chosen.sink + chosen.window, slots)
        print(f"            a streaming layer keeps {ring} of the cache's {slots} slots, so the saving grows with the "
              f"context toward {len(chosen.lazy_layers) / model.config.num_layers:.0%} (the share of streaming "
              f"layers)")
    return result
