"""Ahead-of-time compilation for a TPU slice on a host without a TPU (issue 22): every jitted program a user runs,
compiled through libtpu (jax's `tpu` extra) for a named topology with abstract weights, and its per-chip plan.

`jax.experimental.topologies` gives the slice's abstract devices; a `Mesh` over them and `ShapeDtypeStruct`s
carrying the shardings of `lt_jax.sharding` (weights: `param_shardings`, cache: `cache_shardings`, batches:
`rows_sharding`) are lowered and compiled; nothing is allocated and nothing runs, so a 70B model needs neither a
download nor RAM. Every number is compiled-not-run: memory from `memory_analysis()`, FLOPs and bytes from
`cost_analysis()`, step time a roofline lower bound from the chip table below (over the traffic floor).

Weights: stored as a TPU load stores them (`params.default_layers("tpu")`: stacked, so decode scans one layer
body), or, with `layers="split"`, as on CPU (per-layer buffers; decode unrolls the layers), for comparison. Each row
names its storage.

Traffic floor and roofline: XLA's TPU cost analysis counts an in-place dynamic-update-slice at its whole buffer,
read and written (a 1-layer decode step over a 16K cache of 8 MiB per K/V slot per chip: 63.5 MB without the
cache writes, 160 MB with them; one token written per slot). Its `bytes_accessed` therefore over-counts decode
several times and is reported as it is. The roofline uses `floor_bytes` instead, what one step must move at least:
arguments + outputs - aliased (a decode step reads every weight and every cache slot, full slots masked, not
skipped), or one row's cache twice for insert_rows. `roofline_s` = max(FLOPs / peak bf16 FLOP/s, floor / HBM
bandwidth): a lower bound on the step time.

Cost accounting: XLA's cost analysis counts a loop body once. A decode program's `while_loop` body is one decode
step; over split weights it unrolls the layers, so its cost is per step as compiled. Programs that scan over the
layers (prefill, token_nll, the training step, decode over stacked weights) are recompiled as cost variants with
the layers unrolled at a few layers of each kind: a base of one full and one lazy layer (one of the kind for a
single-kind plan), plus one more full, plus one more lazy; per step = base + (full - 1) * (one more full - base)
+ (lazy - 1) * (one more lazy - base) (tests/integration/test_tpu_aot.py checks it against a hand count, against
the whole model unrolled, and a stacked decode against the split one). The variants take split weights (the TPU
compiler reads a stacked layer's weights in place, so both storages cost the same); the training step's weights,
always stacked, are cut into per-layer slices (`_layers_unrolled`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax import model as model_lib
from lt_jax import sharding
from lt_jax.cache import init_cache, insert_rows
from lt_jax.config import Config
from lt_jax.errors import LtJaxError
from lt_jax.inference import DecodeState, Sampling, decode_chunk, generate_loop, prefill
from lt_jax.params import abstract_params, default_layers
from lt_jax.plan import Plan, override

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    bf16_flops: float  # peak dense bf16 FLOP/s per chip
    hbm_bytes_per_s: float
    hbm_bytes: int


# Per chip, from Google Cloud's public TPU documentation pages "TPU v4", "TPU v5e", "TPU v5p" and "TPU v6e"
# (cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e: "peak compute per chip (bf16)", "HBM bandwidth",
# "HBM capacity"). One chip = one JAX device for all four (v4 and v5p run as megacore).
CHIPS = {
    "v4": Chip("v4", 275e12, 1200e9, 32 * GiB),
    "v5e": Chip("v5e", 197e12, 819e9, 16 * GiB),
    "v5p": Chip("v5p", 459e12, 2765e9, 95 * GiB),
    "v6e": Chip("v6e", 918e12, 1640e9, 32 * GiB),
}


@dataclasses.dataclass(frozen=True)
class Target:
    topology: str
    chip: Chip
    mesh: jax.sharding.Mesh


def target(topology: str, mesh: str | None = None) -> Target:
    """A TPU slice by topology name ("v5e:2x4", "v5p:2x2x4") and a mesh over its chips ("data=1,model=8"; default:
    every chip on `model`). Needs libtpu (`pip install "jax[tpu]"`), not a TPU."""
    chip = CHIPS.get(topology.partition(":")[0])
    if chip is None:
        raise LtJaxError(f"target {topology!r}: the chip must be one of {', '.join(CHIPS)} (e.g. v5e:2x4).")
    from jax.experimental import topologies
    if jax.default_backend() != "tpu":  # compiling only: no TPU to guard, so no exclusive libtpu lock either
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as e:  # noqa: BLE001 (libtpu absent or the name unknown: one sentence either way)
        raise LtJaxError(f"target {topology!r}: no TPU topology description ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); TPU targets need libtpu: "
                         f"pip install \"jax[tpu]\".") from None
    try:
        return Target(topology, chip, sharding.make_mesh(mesh or f"model={len(devices)}", devices))
    except LtJaxError as e:
        raise LtJaxError(f"target {topology!r} has {len(devices)} chips: {e}") from None


# ---- abstract arguments ---------------------------------------------------------------------------------------

def _placed(shapes, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def abstract_weights(cfg: Config, mesh, rules=sharding.RULES, split: bool = True) -> dict:
    """The weights as ShapeDtypeStructs in their shardings: per-layer buffers (a Model loaded on CPU) or, with
    split=False, stacked layers (a Model loaded on TPU; training)."""
    stacked = abstract_params(cfg)
    shard = sharding.param_shardings(cfg, mesh, rules, split=split)
    if not split:
        return _placed(stacked, shard)
    out = {k: _placed(v, shard[k]) for k, v in stacked.items() if k != "layers"}
    out["layers"] = tuple({k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype, sharding=shard["layers"][i][k])
                           for k, v in stacked["layers"].items()} for i in range(cfg.num_layers))
    return out


def abstract_cache(cfg: Config, plan: Plan, batch: int, max_len: int, mesh, rules=sharding.RULES):
    shape = jax.eval_shape(partial(init_cache, cfg, plan, batch, max_len, sharding.cache_kv_heads(cfg, mesh, rules)))
    return _placed(shape, sharding.cache_shardings(shape, mesh, rules))


def rows(mesh, shape, dtype, rules=sharding.RULES):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.rows_sharding(mesh, shape, rules))


def chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of placed ShapeDtypeStructs (its shard of each leaf)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(tree))


# ---- programs ---------------------------------------------------------------------------------------------------

TPU_LAYERS = default_layers("tpu")


@dataclasses.dataclass(frozen=True)
class Program:
    """One jitted program with abstract arguments: `lower(cfg, mesh, layout, layers)` lowers it for a config, its plan
    and the weights' storage (`params.LAYERS`; the cost variants use smaller configs and split weights; `layout` and
    `layers` default to the program's own); `scans_layers` whether its layers are a loop."""
    name: str
    plan: str
    batch: int
    context: int
    lower: object
    scans_layers: bool
    takes_weights: bool = True
    layout: Plan | None = None
    layers: str = TPU_LAYERS


def _fixed(plan: Plan) -> Plan:
    """A selecting plan's decode: its shape is what compiles (which layers are lazy is data), so any choice."""
    return plan.resolve(range(plan.select_lazy)) if plan.per_prompt else plan


def prefill_program(plan: Plan, batch: int, context: int, spec: str, mode: str | None = None,
                    layers: str = TPU_LAYERS) -> Program:
    """Prefill of `batch` prompts of `context` tokens; mode: the plan's own, or "exact"/"hybrid"."""
    plan = override(plan, prefill=mode) if mode and not plan.per_prompt else plan

    def lower(cfg, mesh, plan=plan, layers=layers):
        tokens = rows(mesh, (batch, context), jnp.int32)
        return prefill.lower(abstract_weights(cfg, mesh, split=layers == "split"), tokens, tokens,
                             abstract_cache(cfg, plan, batch, context, mesh), plan.prefill_layers(cfg), cfg=cfg,
                             shape=plan.shape)
    kind = "select" if plan.per_prompt else plan.prefill
    return Program(f"prefill {kind}", spec, batch, context, lower, True, layout=plan, layers=layers)


def decode_programs(plan: Plan, batch: int, context: int, spec: str, steps: int = 16,
                    layers: str = TPU_LAYERS) -> list[Program]:
    """generate_loop, the continuous-batching chunk and insert_rows, at `batch` rows of a `context` cache."""
    plan = _fixed(plan)

    def loop(cfg, mesh, plan=plan, layers=layers):
        sampling = Sampling(max_new_tokens=steps).prepared(cfg.eos_token_ids)
        weights = abstract_weights(cfg, mesh, split=layers == "split")  # split: decode unrolls; stacked: scans
        logits = rows(mesh, (batch, cfg.vocab_size), jnp.float32)
        return generate_loop.lower(weights, logits, abstract_cache(cfg, plan, batch, context, mesh), plan.layers(cfg),
                                   sampling, cfg=cfg, shape=plan.shape.decoding)

    def chunk(cfg, mesh, plan=plan, layers=layers):
        sampling = Sampling(max_new_tokens=steps).prepared(cfg.eos_token_ids)
        state = DecodeState(rows(mesh, (batch,), jnp.int32), rows(mesh, (batch,), bool),
                            rows(mesh, (batch, 2), jnp.uint32))
        weights = abstract_weights(cfg, mesh, split=layers == "split")
        logits = rows(mesh, (batch, cfg.vocab_size), jnp.float32)
        return decode_chunk.lower(weights, logits, abstract_cache(cfg, plan, batch, context, mesh), plan.layers(cfg),
                                  state, sampling, cfg=cfg, shape=plan.shape.decoding, steps=steps)

    def insert(cfg, mesh, plan=plan, layers=layers):
        return insert_rows.lower(abstract_cache(cfg, plan, batch, context, mesh),
                                 abstract_cache(cfg, plan, 1, context, mesh), jnp.int32(0))
    return [Program("generate_loop", spec, batch, context, loop, layers != "split", layout=plan, layers=layers),
            Program("decode_chunk", spec, batch, context, chunk, layers != "split", layout=plan, layers=layers),
            Program("insert_rows", spec, batch, context, insert, False, takes_weights=False, layout=plan,
                    layers=layers)]


def nll_program(plan: Plan, context: int, spec: str, layers: str = TPU_LAYERS) -> Program:
    from lt_jax.api import token_nll
    plan = _fixed(plan)

    def lower(cfg, mesh, plan=plan, layers=layers):
        weights = abstract_weights(cfg, mesh, split=layers == "split")
        return token_nll.lower(weights, rows(mesh, (1, context), jnp.int32), plan.layers(cfg), cfg=cfg)
    return Program("token_nll", spec, 1, context, lower, True, layout=plan, layers=layers)


def train_program(plan: Plan, batch: int, context: int, spec: str, remat: bool) -> Program:
    """One optimizer step (float32 master weights and AdamW state sharded like the weights, bf16 compute)."""
    from lt_jax.train.step import TrainSettings, init_state, train_step
    plan = _fixed(plan)

    def lower(cfg, mesh, plan=plan, layers="stacked"):  # always stacked: the step scans them
        settings = TrainSettings(compute_dtype="bfloat16", remat=remat, num_lazy=plan.lazy_count, sink=plan.sink,
                                 window=plan.window)
        weights = abstract_weights(cfg, mesh, split=False)
        by_shape = {a.shape: a.sharding for a in jax.tree.leaves(weights)}
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state = jax.eval_shape(lambda p: init_state(p, settings), weights)
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=by_shape.get(
            a.shape, replicated)), state)
        batch_ = {k: jax.ShapeDtypeStruct((1, batch, context), jnp.int32, sharding=jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, *sharding.rows_sharding(mesh, (batch, context)).spec)))
            for k in ("tokens", "labels")}
        return train_step.lower(state, batch_, plan.layers(cfg), cfg=cfg, settings=settings)
    return Program(f"train_step remat={'on' if remat else 'off'}", spec, batch, context, lower, True, layout=plan,
                   layers="stacked")


# ---- compile and report -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _layers_unrolled():
    """Every module's `scan_layers` unrolled while a cost variant traces (cost analysis counts a loop body once);
    stacked layers are cut into per-layer slices first."""
    original = model_lib.scan_layers

    def patched(step, carry, layers, xs, unroll=False, remat=False):
        if isinstance(layers, dict):
            layers = tuple(jax.tree.map(lambda a: a[i], layers) for i in range(len(layers["attn_norm"])))
        return original(step, carry, layers, xs, True, remat)
    holders = [m for m in list(sys.modules.values()) if getattr(m, "scan_layers", None) is original]
    for m in holders:
        m.scan_layers = patched
    try:
        yield
    finally:
        for m in holders:
            m.scan_layers = original


def _cost(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _variant(plan: Plan, full: int, lazy: int) -> Plan:
    """The plan's kind (fixed or chosen per prompt), S, W and prefill mode on `full` + `lazy` layers."""
    if plan.per_prompt:
        return dataclasses.replace(plan, num_layers=full + lazy, select_lazy=lazy, protect=())
    return dataclasses.replace(plan, num_layers=full + lazy, lazy_layers=tuple(range(full, full + lazy)))


def step_cost(program: Program, cfg: Config, mesh, compiled) -> tuple[float, float]:
    """(FLOPs, bytes accessed) per chip of one step of the whole model (module docstring): a program whose layers
    are a loop is compiled unrolled at a few layers of each kind, and its cost extrapolated linearly in the counts
    of full and lazy layers (a lazy layer's attention costs less: the kinds are priced apart)."""
    if not program.scans_layers:
        return _cost(compiled)
    plan = program.layout
    n_lazy = plan.lazy_count
    n_full = cfg.num_layers - n_lazy
    # (full, lazy) layer counts of the variants; the first is the base, each other adds one layer of a kind
    if n_lazy and n_full:
        counts, slopes = [(1, 1), (2, 1), (1, 2)], [n_full - 1, n_lazy - 1]
    elif n_lazy:
        counts, slopes = [(0, 1), (0, 2)], [n_lazy - 1]
    else:
        counts, slopes = [(1, 0), (2, 0)], [n_full - 1]
    jax.clear_caches()  # a cached trace (the real program's, scanned) would skip the unrolling below
    variants = []
    for full, lazy in counts:
        with _layers_unrolled():
            lowered = program.lower(cfg.replace(num_layers=full + lazy), mesh, _variant(plan, full, lazy), "split")
            variants.append(_cost(lowered.compile()))
    base = np.asarray(variants[0])
    return tuple(float(v) for v in base + sum(k * (np.asarray(v) - base) for k, v in zip(slopes, variants[1:])))


def compile_row(program: Program, cfg: Config, tgt: Target, cost: bool = True, failure_as_row: bool = False) -> dict:
    """Compile one program for the target; its per-chip plan as a dict (bytes, seconds, FLOPs). A program the TPU
    compiler refuses for HBM (its temporaries alone exceed the chip) is a row too: `fits` False, the temporaries
    the compiler asked for, `refused` its message, and no total or cost. Any other compiler error is raised, or
    with `failure_as_row` a row with `failed` (its message's first sentence) and nothing measured: a libtpu crash
    on one program should not hide the report of the others."""
    t0 = time.perf_counter()
    row = {"program": program.name, "plan": program.plan, "layers": program.layers, "batch": program.batch,
           "context": program.context, "target": tgt.topology, "mesh": dict(tgt.mesh.shape),
           "weights": chip_bytes(abstract_weights(cfg, tgt.mesh, split=program.layers == "split"))
           if program.takes_weights else 0, "hbm": tgt.chip.hbm_bytes, "compiled_not_run": True}
    try:
        compiled = program.lower(cfg, tgt.mesh).compile()
    except jax.errors.JaxRuntimeError as e:
        # libtpu words it two ways: "HLO temporaries (15.91G) exceeds available HBM", or "Ran out of memory in
        # memory space hbm ... HLO temp 125.53M" (the arguments and temporaries together exceed it)
        asked = re.search(r"HLO temp(?:oraries \(|\s+)([\d.]+)([KMG])", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not asked:
            if not failure_as_row:
                raise
            return {**row, "compile_s": round(time.perf_counter() - t0, 2), "arguments": None, "temporaries": None,
                    "outputs": None, "aliased": None, "total": None, "fits": None, "failed": _first_words(str(e))}
        return {**row, "compile_s": round(time.perf_counter() - t0, 2), "arguments": None,
                "temporaries": round(float(asked.group(1)) * 2 ** (10 * " KMG".index(asked.group(2)))),
                "outputs": None, "aliased": None, "total": None, "fits": False, "refused": str(e).splitlines()[0]}
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
             + m.generated_code_size_in_bytes)
    row.update({"compile_s": round(seconds, 2), "arguments": m.argument_size_in_bytes,
                "temporaries": m.temp_size_in_bytes, "outputs": m.output_size_in_bytes,
                "aliased": m.alias_size_in_bytes, "total": total, "fits": total <= tgt.chip.hbm_bytes})
    row["floor_bytes"] = floor_bytes(row, program, cfg, tgt.mesh)
    if cost:
        add_cost(row, program, cfg, tgt, compiled)
    return row


def _first_words(message: str) -> str:
    """A compiler error's kind and what it says, without the HLO it quotes: "INTERNAL: ... Bitcast cannot have
    different shape sizes of output (1024) and operand (512)"."""
    line = message.strip().splitlines()[0]
    kind = line.split(":", 1)[0]
    said = re.split(r"\)\s*:\s*|\}\s*:\s*", line)[-1]  # past the quoted instruction and its metadata
    return f"{kind}: {said}"[:300] if said != line else line[:300]


def floor_bytes(row: dict, program: Program, cfg: Config, mesh) -> int:
    """Per-chip HBM bytes one step must move at least (module docstring): every argument byte read or overwritten
    once and every fresh output byte written once; insert_rows moves one row's cache (read, then written in place)."""
    if program.name == "insert_rows":
        return 2 * kv_cache_bytes(cfg, program.layout, 1, program.context, mesh)
    return row["arguments"] + row["outputs"] - row["aliased"]


def add_cost(row: dict, program: Program, cfg: Config, tgt: Target, compiled=None) -> dict:
    """FLOPs and XLA's bytes accessed per step of the whole model, and the roofline: the larger of FLOPs / peak and
    the floor's bytes / HBM bandwidth. `compiled` is needed only for a program that does not scan its layers."""
    flops, accessed = step_cost(program, cfg, tgt.mesh, compiled)
    row.update(flops=flops, bytes_accessed=accessed,
               roofline_s=max(flops / tgt.chip.bf16_flops, row["floor_bytes"] / tgt.chip.hbm_bytes_per_s))
    return row


def kv_cache_bytes(cfg: Config, plan: Plan, batch: int, context: int, mesh) -> int:
    """Per-chip bytes of the K/V buffers."""
    return chip_bytes(abstract_cache(cfg, _fixed(plan), batch, context, mesh).kv)


def programs(plan: Plan, spec: str, batch: int, context: int, train: bool = True,
             layers: str = TPU_LAYERS) -> list[Program]:
    """Every program a user runs under `plan` with the weights stored as `layers`: prefill (exact and hybrid, or
    selecting), generate_loop, the continuous-batching chunk and insert_rows, token_nll, and the training step with
    remat off and on (its weights are always stacked)."""
    if plan.per_prompt:
        out = [prefill_program(plan, 1, context, spec, layers=layers)]
    else:
        out = [prefill_program(plan, 1, context, spec, "exact", layers)]
        if plan.lazy_count:
            out.append(prefill_program(plan, 1, context, spec, "hybrid", layers))
    out += decode_programs(plan, batch, context, spec, layers=layers)
    out.append(nll_program(plan, context, spec, layers))
    if train:
        out += [train_program(plan, 1, context, spec, remat) for remat in (False, True)]
    return out


def max_batch(plan: Plan, spec: str, cfg: Config, tgt: Target, context: int, upper: int = 4096,
              layers: str = TPU_LAYERS, report=None) -> dict:
    """The largest decode batch whose generate_loop plan fits one chip's HBM (compiles a few batches: the
    secant-then-bisection search of `lt-jax bench --throughput`), and the roofline throughput there:
    {"plan", "context", "max_batch", "roofline_s", "tokens_per_s"} (tokens/s of the slice: every row of the batch
    makes one token per step; null where not even `data` rows fit). `report(batch, row)` hears each probe."""
    from lt_jax.eval.bench import search_max_batch
    probed = {}

    def footprint(b):
        program = decode_programs(plan, b, context, spec, layers=layers)[0]
        probed[b] = program, compile_row(program, cfg, tgt, cost=False)
        row = probed[b][1]
        if report:
            report(b, row)
        return math.inf if row["total"] is None else row["total"]  # a refusal says no size
    per_row = kv_cache_bytes(cfg, plan, 1, context, tgt.mesh)
    data = tgt.mesh.shape.get("data", 1)  # rows split over `data`: batches that it divides
    best, _ = search_max_batch(lambda b: footprint(b * data), tgt.chip.hbm_bytes, per_row, upper // data)
    out = {"plan": spec, "context": context, "max_batch": best * data, "roofline_s": None, "tokens_per_s": None}
    if best:
        program, row = probed[best * data]
        if not program.scans_layers:  # its cost is the compiled program's own: compile it again
            row = compile_row(program, cfg, tgt)
        else:
            add_cost(row, program, cfg, tgt)
        out.update(roofline_s=row["roofline_s"], tokens_per_s=best * data / row["roofline_s"])
    return out
