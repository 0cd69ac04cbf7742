"""`lt-jax bench MODEL`: what a layer plan buys in speed and memory, every method measured side by side with `full`
in the same run (methods interleaved), on random token ids (speed and memory do not depend on them).

A context C is the cache's slots: a prompt of C - N random tokens, then N generated tokens (N = --new-tokens).

Default mode, per (method, context, batch): prefill tokens/s, time to first token (prefill + first sample),
decode tokens/s over the compiled generation loop, exact KV bytes, XLA's buffer plan of the prefill and of the
loop, compile times.

--throughput, per (method, context): the paper's experiment. The largest batch whose footprint fits a memory
budget, then the generation throughput at that batch. A batch is served as an engine would: rows are prefilled one
at a time into a batch-1 cache and copied into the batch-B cache in place (`insert_rows`), then the whole batch
decodes in the compiled generation loop. Its footprint, from XLA's buffer plans (compiled, never run):

    max(peak of the batch-B generation loop,  batch-B cache + B rows of logits + peak of one batch-1 prefill)

a peak being arguments + outputs + temporaries - donated (aliased) bytes, the weights among the arguments (an
insert holds the donated batch cache and one small cache: less than the second term).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax import sharding
from lt_jax.batching import left_pad
from lt_jax.cache import KVCache, expected_kv_bytes, init_cache, insert_rows
from lt_jax.errors import LtJaxError
from lt_jax.inference import Sampling, generate_loop, prefill, sample
from lt_jax.plan import Plan
from lt_jax.progress import progress_bar

MIB = 2**20


# ---- small helpers (also used by scripts/bench_inference.py) ---------------------------------------------------

def timed(fn):
    """(fn(), wall seconds)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def block(tree):
    return jax.block_until_ready(tree)


def tree_bytes(tree) -> int:
    """Bytes of every leaf of a pytree of arrays or of `jax.ShapeDtypeStruct`s."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def peak_bytes(compiled) -> int:
    """XLA's buffer plan of a compiled function: arguments + outputs + temporaries - donated (aliased)."""
    s = compiled.memory_analysis()
    return s.argument_size_in_bytes + s.output_size_in_bytes + s.temp_size_in_bytes - s.alias_size_in_bytes


def _fixed(plan: Plan) -> Plan:
    """A plan whose lazy layers are fixed: lighttransfer's per-prompt choice becomes the last layers, same count
    and S/W. The choice never changes the cache's bytes nor the decode's speed (both compile from the count and
    S/W only: `PlanShape.decoding`), so throughput and memory are those of any fixed plan with that count."""
    if not plan.per_prompt:
        return plan
    return plan.resolve(range(plan.num_layers - plan.select_lazy, plan.num_layers))


# ---- compiled executables, by shape --------------------------------------------------------------------------

def _greedy(new_tokens: int) -> Sampling:
    """Greedy, N tokens, no stop id (so every row decodes all N tokens)."""
    return Sampling(new_tokens, stop_ids=()).prepared()



class _OnMesh:
    """A compiled function on a mesh: each argument is first put where the executable expects it (GSPMD chose the
    shardings of an earlier executable's outputs, which the next one may want elsewhere)."""

    def __init__(self, compiled):
        self.compiled = compiled

    def memory_analysis(self):
        return self.compiled.memory_analysis()

    def __call__(self, *args):
        wanted = self.compiled.input_shardings[0]
        return self.compiled(*jax.tree.map(lambda a, s: a if a.sharding == s else jax.device_put(a, s), args, wanted))


class Executables:
    """Compiled prefills, generation loops and row inserts keyed by shape: the compile-only memory analysis and
    the timed runs share them. `count` and `seconds` say how many compilations ran and how long each took. On a
    mesh (`model.mesh`) they are lowered for the shardings the model's own calls use (rows over `data`, the cache
    by `lt_jax.sharding`)."""

    def __init__(self, model, new_tokens: int):
        self.model, self.new_tokens = model, new_tokens
        self._compiled, self.seconds = {}, {}

    def rows(self, shape, dtype):
        """A batch's abstract value, with the model's rows sharding on a mesh."""
        m = self.model
        return jax.ShapeDtypeStruct(shape, dtype, sharding=None if m.mesh is None else sharding.rows_sharding(
            m.mesh, shape, m.rules))

    @property
    def count(self) -> int:
        return len(self._compiled)

    def _get(self, key, lower):
        if key not in self._compiled:
            compiled, self.seconds[key] = timed(lambda: lower().compile())
            self._compiled[key] = compiled if self.model.mesh is None else _OnMesh(compiled)
        return self._compiled[key], self.seconds[key]

    def cache_shape(self, plan: Plan, batch: int, context: int):
        """The cache's leaves as `jax.ShapeDtypeStruct`s (allocates nothing), with their shardings on a mesh."""
        m = self.model
        shape = jax.eval_shape(lambda: init_cache(m.config, plan, batch, context,
                                                  sharding.cache_kv_heads(m.config, m.mesh, m.rules)))
        if m.mesh is None:
            return shape
        placed = sharding.cache_shardings(shape, m.mesh, m.rules)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shape, placed)

    def prefill(self, plan: Plan, batch: int, context: int):
        """(compiled prefill of [batch, context - N] into a cache of `context` slots, its compile seconds)."""
        m, T = self.model, context - self.new_tokens
        tokens = self.rows((batch, T), jnp.int32)
        return self._get(("prefill", plan.shape, batch, context), lambda: prefill.lower(
            m.params, tokens, tokens, self.cache_shape(plan, batch, context), plan.prefill_layers(m.config),
            cfg=m.config, shape=plan.shape))

    def loop(self, plan: Plan, batch: int, context: int):
        """(compiled generation loop of N tokens for `batch` rows, its compile seconds)."""
        m, shape = self.model, plan.shape.decoding
        logits = self.rows((batch, m.config.vocab_size), jnp.float32)
        return self._get(("loop", shape, batch, context), lambda: generate_loop.lower(
            m.params, logits, self.cache_shape(plan, batch, context), _fixed(plan).layers(m.config),
            _greedy(self.new_tokens), cfg=m.config, shape=shape))

    def insert(self, plan: Plan, batch: int, context: int):
        return self._get(("insert", plan.shape.decoding, batch, context), lambda: insert_rows.lower(
            self.cache_shape(plan, batch, context), self.cache_shape(plan, 1, context), jnp.int32(0)))

    def first_token(self, batch: int):
        """The loop's own sampling (greedy), alone: the first token after a prefill."""
        logits = self.rows((batch, self.model.config.vocab_size), jnp.float32)
        return self._get(("sample", batch), lambda: jax.jit(sample).lower(
            logits, jax.random.key(0), jnp.float32(0), jnp.int32(0), jnp.float32(1)))

    def footprint(self, plan: Plan, batch: int, context: int) -> int:
        """Peak bytes of serving `batch` rows (module docstring): compiles, runs nothing."""
        held = tree_bytes(self.cache_shape(plan, batch, context)) + batch * self.model.config.vocab_size * 4
        return max(peak_bytes(self.loop(plan, batch, context)[0]),
                   peak_bytes(self.prefill(plan, 1, context)[0]) + held)


def search_max_batch(footprint, budget: int, per_row: int, upper: int) -> tuple[int, list[int]]:
    """(largest batch b >= 1 with footprint(b) <= budget, or 0; the batches probed). `footprint` is nondecreasing
    and nearly affine in b, `upper` is known not to fit, `per_row` is a first guess of its slope. Bisection that
    first tries the secant through the last two probes, so an affine footprint takes about three probes.

    A footprint of `math.inf` is a refusal that says no size (a compiler that stops at buffer assignment, in
    seconds where a batch that fits takes minutes): no secant goes through it; the search steps down from it by
    1, 2, 4, ... batches until one fits, then closes the gap."""
    probed = {}

    def probe(b):
        probed[b] = footprint(b)
        return probed[b]

    if upper <= 1 or probe(1) > budget:
        return 0, list(probed)
    lo, hi, prev, refusals = 1, upper, 1, 0
    guess = 1 + (budget - probed[1]) // max(per_row, 1)
    while hi - lo > 1:
        b = guess if lo < guess < hi else (lo + hi) // 2
        if probe(b) <= budget:
            lo = b
        else:
            hi = b
        if math.isinf(probed[b]):
            guess, refusals = b - 2 ** refusals, refusals + 1
            continue
        refusals = 0
        slope = (probed[b] - probed[prev]) / (b - prev) if b != prev else per_row
        guess = b + math.floor((budget - probed[b]) / max(slope, 1))
        if guess <= lo:
            guess = lo + 1  # the secant says lo is the last that fits: check its neighbour
        if sum(math.isfinite(f) for f in probed.values()) > 4:
            guess = (lo + hi) // 2  # not affine after all: plain bisection
        prev = b
    return lo, list(probed)


# ---- measurements --------------------------------------------------------------------------------------------

def _prompt(rng, cfg, batch: int, length: int):
    rows = [list(r) for r in rng.integers(0, cfg.vocab_size, (batch, length))]
    tokens, positions = left_pad(rows, length)
    return jnp.asarray(tokens), jnp.asarray(positions)


def _new_cache(m, plan: Plan, batch: int, context: int) -> KVCache:
    """A host cache of the shape the executables take (`Executables.cache_shape`: KV heads copied per chip where the
    mesh asks for it, `sharding.cache_kv_heads`); its bytes are the formula's, times those copies."""
    heads = sharding.cache_kv_heads(m.config, m.mesh, m.rules)
    cache = init_cache(m.config, plan, batch, context, heads)
    assert cache.kv_bytes == expected_kv_bytes(m.config, plan, batch, context) * heads // m.config.num_kv_heads, \
        "cache bytes differ from the formula"
    return cache


def _decode_seconds(exe: Executables, plan: Plan, logits, cache, layers, context: int, repeats: int) -> float:
    """Best of `repeats` runs of the compiled generation loop (N tokens per row; the cache is rewound between
    runs, which rewrites the same slots)."""
    loop, _ = exe.loop(plan, logits.shape[0], context)
    best = math.inf
    for _ in range(repeats):
        (_, counts, cache), seconds = timed(lambda: block(loop(exe.model.params, logits, cache, layers,
                                                               _greedy(exe.new_tokens))))
        assert int(np.min(counts)) == exe.new_tokens, "the generation loop stopped early"
        cache = dataclasses.replace(cache, length=cache.length - exe.new_tokens)
        best = min(best, seconds)
    return best


def measure(exe: Executables, plan: Plan, context: int, batch: int, repeats: int, rng) -> dict:
    """Default mode: one (plan, context, batch), all rows prefilled at once."""
    m, N = exe.model, exe.new_tokens
    T = context - N
    pre, pre_compile = exe.prefill(plan, batch, context)
    loop, loop_compile = exe.loop(plan, batch, context)
    first, _ = exe.first_token(batch)
    tokens, positions = _prompt(rng, m.config, batch, T)
    cache = _new_cache(m, plan, batch, context)
    t0 = time.perf_counter()
    logits, cache, layers, _ = block(pre(m.params, tokens, positions, cache, plan.prefill_layers(m.config)))
    prefill_s = time.perf_counter() - t0
    block(first(logits, jax.random.key(0), jnp.float32(0), jnp.int32(0), jnp.float32(1)))
    ttft = time.perf_counter() - t0
    decode_s = _decode_seconds(exe, plan, logits, cache, layers, context, repeats)
    return {"prompt_tokens": T, "prefill_tokens_per_s": round(batch * T / prefill_s, 1),
            "prefill_s": round(prefill_s, 3), "ttft_s": round(ttft, 3),
            "decode_tokens_per_s": round(batch * N / decode_s, 2), "decode_s": round(decode_s, 3),
            "kv_bytes": expected_kv_bytes(m.config, plan, batch, context),
            "peak_prefill_bytes": peak_bytes(pre), "peak_decode_bytes": peak_bytes(loop),
            "compile_prefill_s": round(pre_compile, 2), "compile_decode_s": round(loop_compile, 2)}


def serve(exe: Executables, plan: Plan, context: int, batch: int, repeats: int, rng, every_row: bool) -> dict:
    """Throughput mode: prefill rows one at a time into a batch-1 cache, insert each into the batch cache in place,
    decode the batch. With every_row=False one prompt is prefilled and inserted into every row (decode speed does
    not depend on the values; an engine would spend `batch` times `prefill_s`)."""
    m = exe.model
    pre, _ = exe.prefill(plan, 1, context)
    insert, _ = exe.insert(plan, batch, context)
    given = plan.prefill_layers(m.config)
    cache = _new_cache(m, plan, batch, context)
    rows, prefill_s = [], []
    for row in range(batch):
        if every_row or not rows:
            tokens, positions = _prompt(rng, m.config, 1, context - exe.new_tokens)
            (logits, small, layers, _), seconds = timed(lambda: block(pre(
                m.params, tokens, positions, _new_cache(m, plan, 1, context), given)))
            prefill_s.append(seconds)
        cache = insert(cache, small, jnp.int32(row))
        rows.append(logits)
    logits = block(jnp.concatenate(rows))
    decode_s = _decode_seconds(exe, plan, logits, cache, layers, context, repeats)
    return {"prefill_s": round(float(np.mean(prefill_s)), 3), "prefills": len(prefill_s),
            "decode_s": round(decode_s, 3), "tokens_per_s": round(batch * exe.new_tokens / decode_s, 2)}


def max_batch(exe: Executables, plan: Plan, context: int, budget: int) -> tuple[int, list[int]]:
    """(largest batch whose serving footprint fits `budget`, or 0; the batches whose buffer plans were compiled)."""
    cfg = exe.model.config
    kv = expected_kv_bytes(cfg, plan, 1, context)
    weights = tree_bytes(exe.model.params)
    per_row = tree_bytes(exe.cache_shape(plan, 1, context)) + cfg.vocab_size * 4
    upper = max(0, budget - weights) // kv + 1  # weights + B x KV alone exceed the budget from here on
    return search_max_batch(lambda b: exe.footprint(plan, b, context), budget, per_row, upper)


def throughput_record(exe: Executables, spec: str, plan: Plan, context: int, budget: int, repeats: int, rng,
                      every_row: bool) -> dict:
    """One (method, context) of --throughput; `relative_to_full` and `theoretical` are filled in by the caller."""
    n0, s0 = exe.count, sum(exe.seconds.values())
    weights = tree_bytes(exe.model.params)
    kv = expected_kv_bytes(exe.model.config, plan, 1, context)
    batch, probes = max_batch(exe, plan, context, budget)
    one = exe.footprint(plan, 1, context) if probes else weights + kv
    # From bytes alone: (budget - weights - fixed overhead) / KV per sequence, the fixed overhead being what
    # serving one row needs besides the weights and its KV (prefill temporaries, the batch-1 cache, logits).
    overhead = one - weights - kv
    rec = {"method": spec, "context": context, "max_batch": batch, "tokens_per_s": None, "relative_to_full": None,
           "theoretical": None, "theoretical_batch": max(0, (budget - weights - overhead) // kv),
           "kv_bytes_per_seq": kv, "num_lazy": plan.lazy_count, "sink": plan.sink, "window": plan.window,
           "peak_bytes": exe.footprint(plan, batch, context) if batch else one, "fixed_overhead_bytes": overhead,
           "probes": probes}
    if batch:
        rec.update(serve(exe, plan, context, batch, repeats, rng, every_row))
    else:
        print(f"lt-jax bench: {spec} at context {context}: no batch fits the budget (batch 1 needs "
              f"{one / MIB:.0f} MiB > {budget / MIB:.0f} MiB).", file=sys.stderr)
    rec.update(compilations=exe.count - n0, compile_s=round(sum(exe.seconds.values()) - s0, 2))
    return rec


# ---- transformers baseline -------------------------------------------------------------------------------------

def hf_generate_times(ref, x, steps: int) -> tuple[float, float]:
    """Seconds of transformers' greedy `generate` on the batch x [B, T] for 1 and for steps + 1 new tokens, both
    forced to their length (min_new_tokens): their difference is `steps` decode steps, the prefill cancelling."""
    import torch
    mask = torch.ones_like(x)
    gen = lambda n: ref.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,  # noqa: E731
                                 do_sample=False)
    with torch.no_grad():
        return timed(lambda: gen(1))[1], timed(lambda: gen(steps + 1))[1]


def hf_generate_decode_s(ref, x, steps: int, repeats: int = 3) -> float:
    """Seconds transformers' greedy `generate` (its per-step overheads included) spends on `steps` decode steps of
    the batch x [B, T] (`hf_generate_times`). Each length is the best of `repeats` calls, alternated: a difference
    of two single timings on a shared machine swung 11-26 tok/s between calls."""
    one, many = zip(*(hf_generate_times(ref, x, steps) for _ in range(repeats)))
    return min(many) - min(one)


def transformers_record(hf_dir: Path, full: dict, new_tokens: int, vocab: int, rng) -> dict:
    """transformers' fp32 `generate` at the batch `full` reached, prefill excluded."""
    import torch
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    B, context = full["max_batch"], full["context"]
    x = torch.from_numpy(rng.integers(0, vocab, (B, context - new_tokens))).long()
    decode_s = hf_generate_decode_s(ref, x, new_tokens)
    tps = B * new_tokens / decode_s
    return {"method": "transformers", "context": context, "max_batch": B, "tokens_per_s": round(tps, 2),
            "relative_to_full": round(tps / full["tokens_per_s"], 3) if full["tokens_per_s"] else None,
            "theoretical": None, "kv_bytes_per_seq": full["kv_bytes_per_seq"], "decode_s": round(decode_s, 3),
            "note": "batch of full; its own dynamic KV cache"}


# ---- the whole measurement -------------------------------------------------------------------------------------

def run(model, plans: dict[str, Plan], contexts: list[int], batches: list[int] = (1,), new_tokens: int = 32,
        repeats: int = 1, seed: int = 0, budget: int | None = None, prefill_every_row: bool = False,
        hf_dir: Path | None = None, executables: Executables | None = None, progress: bool = True) -> dict:
    """Every plan measured against `plans["full"]` in the same run: speed mode (per context and batch), or with a
    memory `budget` in bytes the throughput mode (the largest batch that fits, per context; `hf_dir`: also
    transformers' generate there). `executables`: compiled functions to reuse (for `new_tokens`)."""
    cfg, N = model.config, new_tokens
    throughput = budget is not None
    if min(contexts) <= N:
        raise LtJaxError(f"context {min(contexts)} leaves no prompt before {N} new tokens; give larger contexts.")
    too_long = [c for c in contexts if c > cfg.max_position_embeddings]
    if too_long and not throughput:
        raise LtJaxError(f"context {too_long[0]} exceeds the model's {cfg.max_position_embeddings} positions.")
    if too_long:
        print(f"lt-jax bench: warning: contexts {too_long} are beyond the model's trained context "
              f"({cfg.max_position_embeddings}): measures speed only.", file=sys.stderr)
    assert "full" in plans, "every ratio is against full, measured in the same run"
    exe, rng = executables or Executables(model, N), np.random.default_rng(seed)
    assert exe.model is model and exe.new_tokens == N, "executables compiled for another model or new_tokens"
    weights = tree_bytes(model.params)
    records = []
    if throughput:
        plans = {s: _fixed(p) for s, p in plans.items()}
        with progress_bar(len(contexts) * len(plans), "bench", "run", disable=not progress) as bar:
            for context in contexts:
                group = []
                for spec, plan in plans.items():
                    bar.set_postfix_str(f"{spec} @ {context}")
                    group.append(throughput_record(exe, spec, plan, context, budget, repeats, rng,
                                                   prefill_every_row))
                    bar.update()
                full = next(r for r in group if r["method"] == "full")
                for r in group:
                    if full["tokens_per_s"] and r["tokens_per_s"]:
                        r["relative_to_full"] = round(r["tokens_per_s"] / full["tokens_per_s"], 3)
                    if full["theoretical_batch"]:
                        r["theoretical"] = round(r["theoretical_batch"] / full["theoretical_batch"], 3)
                records += group
        if hf_dir is not None:  # after every JAX timing: torch's idle threads would slow what runs next
            for full in [r for r in records if r["method"] == "full"]:
                if full["max_batch"]:
                    records.append(transformers_record(hf_dir, full, N, cfg.vocab_size, rng))
    else:
        items = [(c, b, s) for c in contexts for b in batches for s in plans]
        for context, batch, spec in progress_bar(len(items), "bench", "run", disable=not progress).wrap(items):
            plan = plans[spec]
            records.append({"method": spec, "context": context, "batch": batch, "num_lazy": plan.lazy_count,
                            "sink": plan.sink, "window": plan.window,
                            **measure(exe, plan, context, batch, repeats, rng)})
        for r in records:
            full = next(f for f in records if f["method"] == "full" and (f["context"], f["batch"]) ==
                        (r["context"], r["batch"]))
            r["decode_vs_full"] = round(r["decode_tokens_per_s"] / full["decode_tokens_per_s"], 3)
            r["kv_vs_full"] = round(r["kv_bytes"] / full["kv_bytes"], 4)
    result = {"mode": "throughput" if throughput else "speed", "model": model.label, "dtype": cfg.dtype,
              "new_tokens": N, "weights_bytes": weights, "compilations": exe.count,
              "compile_s": round(sum(exe.seconds.values()), 1), "records": records}
    if throughput:
        result.update(budget_bytes=budget, prefill="every row" if prefill_every_row else "one prompt per batch",
                      note="tokens_per_s = batch x new tokens / seconds of the compiled generation loop (prefill "
                           "excluded; prefill_s is one row's prefill); lighttransfer is measured as a fixed plan "
                           "with the same number of lazy layers")
    return result


def markdown(result: dict) -> str:
    mib = lambda b: f"{b / MIB:.0f}" if b is not None else "–"  # noqa: E731
    val = lambda v: "–" if v is None else str(v)  # noqa: E731
    if result["mode"] == "throughput":
        lines = [f"budget {mib(result['budget_bytes'])} MiB, weights {mib(result['weights_bytes'])} MiB, "
                 f"{result['new_tokens']} new tokens per row, prefill excluded; {result['compilations']} "
                 f"compilations ({result['compile_s']} s)", "",
                 "| method | context | max batch | tokens/s | × full | theoretical × | KV/seq MiB |",
                 "|---|---|---|---|---|---|---|"]
        for r in result["records"]:
            lines.append(f"| {r['method']} | {r['context']} | {r['max_batch']} | {val(r['tokens_per_s'])} | "
                         f"{val(r['relative_to_full'])} | {val(r['theoretical'])} | "
                         f"{r['kv_bytes_per_seq'] / MIB:.1f} |")
        return "\n".join(lines)
    lines = ["| method | context | batch | prefill tok/s | TTFT s | decode tok/s | × full | KV MiB | "
             "peak prefill MiB | peak decode MiB | compile s (prefill / decode) |", "|" + "---|" * 11]
    for r in result["records"]:
        lines.append(f"| {r['method']} | {r['context']} | {r['batch']} | {r['prefill_tokens_per_s']} | {r['ttft_s']} "
                     f"| {r['decode_tokens_per_s']} | {r['decode_vs_full']} | {r['kv_bytes'] / MIB:.1f} | "
                     f"{mib(r['peak_prefill_bytes'])} | {mib(r['peak_decode_bytes'])} | "
                     f"{r['compile_prefill_s']} / {r['compile_decode_s']} |")
    return "\n".join(lines)
