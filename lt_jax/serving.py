"""Serving many prompts: `generate_stream` yields one result per prompt as its row finishes, with continuous
batching, so short answers do not wait for long ones and a freed row takes the next prompt at once.

How prompts are served:

- **Groups.** Prompts are grouped by length bucket (`batching.bucket`); each group has one cache length
  (`Model.cache_len` of its longest prompt and largest token budget), so the compiled shapes, and the compile
  count, depend on the buckets seen, never on the number of prompts. Groups run shortest first; a group's batch
  drains before the next opens. `group_by_length=False` serves all prompts from one cache sized for the longest
  (each prompt still prefilled at its own bucket): no drains between buckets, at the price of short rows
  attending over the long cache.
- **Rows.** A decode batch is one cache of `batch_size` rows (`Model.empty_cache`). Each prompt is prefilled
  alone (`Model.prefill` of one row, so its numbers are those of a lone `generate`) and copied into a free row
  (`cache.insert_rows`, in place). The batch decodes in compiled chunks of `chunk` steps (`inference.decode_chunk`)
  with per-row budgets and done flags: no host round trip per token. A chunk ends early when a row finishes and a
  prompt waits for it. A finished or empty row keeps decoding garbage that is never read; rows never mix.
- **Sampling.** Every row has its own PRNG key, split per step as a lone `generate` splits its key: a row samples
  what it would sample alone, whatever shares its batch.
- **Selecting plans** (`lighttransfer`): each prompt chooses its lazy layers in its own prefill, and rows with
  different lazy sets cannot share a cache layout (which slots are rings). So a decode batch holds rows of one
  lazy set: a prefilled row of another set waits (at most `batch_size` rows wait, each a one-row cache); when no
  waiting or new row fits the open batch, it decodes until empty and the next batch takes the set of the
  longest-waiting row. Prompts choosing the same set (e.g. all prompts no longer than S + W: every ratio is 1)
  are batched continuously; prompts that all choose differently decode one at a time. A chosen cache's slots are
  put in layer order (`Plan.layers`), so rows of one set share one layout whatever order the prefill's queue
  filled them in.

`Engine` serves requests that arrive over time (`lt-jax serve`): one thread owns the device, each request joins a
batch of its cache length, plan and sampling settings as a row frees, streams its tokens chunk by chunk, and may be
cancelled (its row freed).
"""
from __future__ import annotations

import collections
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax.batching import bucket
from lt_jax.cache import KVCache, insert_rows
from lt_jax.errors import LtJaxError
from lt_jax.inference import DecodeState, Sampling, decode_chunk
from lt_jax.plan import Plan

DEFAULT_CHUNK = 8


@dataclasses.dataclass
class Request:
    """One prompt to serve: its place in the input, its ids, its token budget."""
    index: int
    ids: list[int]
    budget: int


@dataclasses.dataclass
class _Prefilled:
    """One prompt after its prefill, waiting for a row: the fixed plan (a selecting plan's choice), the cache with its
    slots in layer order, the last logits [1, V], and the lazy ratios [L] (selecting plans only)."""
    request: Request
    plan: Plan
    cache: KVCache
    logits: jax.Array
    ratios: np.ndarray | None


@jax.jit
def _put_row(logits, row_logits, row):
    return jax.lax.dynamic_update_slice_in_dim(logits, row_logits, row, 0)


def in_layer_order(cache: KVCache, is_lazy: np.ndarray, slot: np.ndarray) -> KVCache:
    """The cache a fixed plan's prefill would leave (`Plan.layers`: the lazy layers take ring slots 0, 1, ... in
    layer order, the others full slots) from one whose layer -> slot map is `slot` (a selecting prefill's queue
    order). Only the tuples of slot buffers are reordered; nothing is copied."""
    full = [int(slot[i]) for i in np.flatnonzero(~is_lazy)]
    ring = [int(slot[i]) for i in np.flatnonzero(is_lazy)]
    return dataclasses.replace(cache, full_k=tuple(cache.full_k[j] for j in full),
                               full_v=tuple(cache.full_v[j] for j in full),
                               ring_k=tuple(cache.ring_k[j] for j in ring),
                               ring_v=tuple(cache.ring_v[j] for j in ring))


class _Batch:
    """One decode batch: `size` rows of one cache under one fixed plan (changed only while the batch is empty), the
    per-row state on the host between chunks, and each busy row's request and tokens so far."""

    def __init__(self, model, plan: Plan, size: int, max_len: int, sampling: Sampling, first_key: np.ndarray,
                 chunk: int):
        self.model, self.sampling, self.chunk = model, sampling, chunk
        self.rows: list[_Prefilled | None] = [None] * size
        self.tokens: list[list[int]] = [[] for _ in range(size)]
        self.use_plan(plan)
        self.cache = model.empty_cache(plan, size, max_len)
        self.logits = jnp.zeros((size, model.config.vocab_size), jnp.float32)
        self.budget = np.zeros(size, np.int32)
        self.done = np.ones(size, bool)  # an empty row is done
        self.key = np.tile(first_key, (size, 1))
        self.first_key = first_key

    def use_plan(self, plan: Plan):
        assert not self.busy, "a batch changes its plan only while empty"
        self.plan, self.layers = plan, plan.layers(self.model.config)  # same lazy count: same shapes, compilation

    @property
    def busy(self) -> int:
        return sum(r is not None for r in self.rows)

    def free_row(self) -> int | None:
        return next((b for b, r in enumerate(self.rows) if r is None), None)

    def admit(self, row: int, item: _Prefilled):
        self.cache = insert_rows(self.cache, item.cache, jnp.int32(row))
        self.logits = _put_row(self.logits, item.logits, jnp.int32(row))
        self.budget[row], self.done[row], self.key[row] = item.request.budget, False, self.first_key
        self.rows[row], self.tokens[row] = item, []

    def release(self, row: int):
        """Frees a busy row at once (its request was cancelled or met a stop string); it decodes garbage until
        admitted again."""
        self.rows[row], self.done[row] = None, True

    def step(self, until_finish: bool) -> list[tuple[_Prefilled, list[int]]]:
        """One chunk; returns the rows that finished in it (freed), with their tokens."""
        m = self.model
        state = DecodeState(jnp.asarray(self.budget), jnp.asarray(self.done), jnp.asarray(self.key))
        out, self.logits, self.cache, state = decode_chunk(
            m.params, self.logits, self.cache, self.layers, state, self.sampling, m.config,
            self.plan.shape.decoding, self.chunk, until_finish)
        out = np.asarray(out)
        self.budget, self.done, self.key = (np.array(a) for a in (state.budget, state.done, state.key))
        finished = []
        for b, item in enumerate(self.rows):
            if item is None:
                continue
            self.tokens[b] += [int(t) for t in out[b] if t >= 0]
            if self.done[b]:
                finished.append((item, self.tokens[b]))
                self.rows[b] = None
        return finished


def generate_stream(model, prompts, plan: Plan | str | None = None, sampling: Sampling | None = None,
                    batch_size: int = 8, max_new_tokens: int | Sequence[int] | None = None,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_ids=None,
                    chunk: int = DEFAULT_CHUNK, group_by_length: bool = True, **plan_flags) -> Iterator[dict]:
    """Generate for many prompts (texts or id lists, as `Model.generate` takes them) with continuous batching,
    yielding one dict per prompt as its row finishes (not in input order): {"index" (its place in `prompts`),
    "ids", "text" (None without a tokenizer), "plan" (the fixed Plan decoded with), "finish_reason" ("stop": a
    stop id, the last of "ids"; "length": its budget), "prompt_tokens"}, and for a selecting plan "lazy_ratios"
    (its ratio per layer). Sampling settings come as keywords (as `Model.generate` takes them) or as one `Sampling`,
    which then wins; `max_new_tokens` is one budget or one per prompt (default 64, or the `Sampling`'s). `chunk`:
    decode steps per compiled call; `group_by_length=False`: one cache for all prompts (sized for the longest) instead
    of one per length bucket (no batch drains between buckets, but short rows attend over the long cache). All
    prompts are checked before any work starts."""
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise LtJaxError(f"batch_size={batch_size!r} must be a whole number of at least 1.")
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise LtJaxError(f"chunk={chunk!r} must be a whole number of at least 1.")
    plan = model.plan(plan, **plan_flags)
    sampling = (sampling or Sampling(64, temperature, top_k, top_p, seed,
                                     None if stop_ids is None else tuple(stop_ids))).check()
    prompts = prompts if isinstance(prompts, str) else list(prompts)
    rows = model.prompt_rows(prompts) if len(prompts) else []
    budgets = _budgets(max_new_tokens, sampling.max_new_tokens, len(rows))
    context = model.config.max_position_embeddings
    for i, (ids, n) in enumerate(zip(rows, budgets)):
        if len(ids) + n > context:
            raise LtJaxError(f"prompt {i}: {len(ids)} tokens plus max_new_tokens={n} exceed the model's context of "
                             f"{context} tokens.")
    requests = [Request(i, ids, n) for i, (ids, n) in enumerate(zip(rows, budgets))]
    return _serve(model, plan, groups(requests, context) if group_by_length else [requests] if requests else [],
                  sampling, batch_size, chunk)


def _budgets(max_new_tokens, default: int, n: int) -> list[int]:
    if max_new_tokens is None:
        return [int(default)] * n
    many = np.ndim(max_new_tokens) == 1
    budgets = [int(b) for b in max_new_tokens] if many else [max_new_tokens] * n
    if many and len(budgets) != n:
        raise LtJaxError(f"max_new_tokens gives {len(budgets)} budgets for {n} prompts.")
    for b in budgets:
        Sampling(max_new_tokens=b).check()
    return budgets


def groups(requests: list[Request], context: int) -> list[list[Request]]:
    """Requests by prompt-length bucket (each group one prefill width and one cache length), shortest first."""
    by_bucket: dict[int, list[Request]] = {}
    for r in requests:
        by_bucket.setdefault(min(bucket(len(r.ids)), context), []).append(r)
    return [by_bucket[k] for k in sorted(by_bucket)]


def _serve(model, plan: Plan, request_groups: list[list[Request]], sampling: Sampling, batch_size: int,
           chunk: int) -> Iterator[dict]:
    prepared = sampling.prepared(model.config.eos_token_ids)
    stop = {int(t) for t in prepared.stop_ids}
    first_key = np.asarray(jax.random.key_data(jax.random.key(sampling.seed)))
    for group in request_groups:
        max_len = model.cache_len(max(len(r.ids) for r in group), max(r.budget for r in group))
        for item, tokens in _serve_group(model, plan, group, max_len, prepared, batch_size, chunk, first_key):
            result = {"index": item.request.index, "ids": tokens,
                      "text": model.decode(tokens) if model.tokenizer is not None else None, "plan": item.plan,
                      "finish_reason": "stop" if tokens and tokens[-1] in stop else "length",
                      "prompt_tokens": len(item.request.ids)}
            if item.ratios is not None:
                result["lazy_ratios"] = [float(r) for r in item.ratios]
            yield result


def _prefill_one(model, plan: Plan, request: Request, max_len: int) -> _Prefilled:
    done = model.prefill([request.ids], plan, max_len)
    if not plan.per_prompt:
        return _Prefilled(request, done.plan, done.cache, done.logits, None)
    layers = done.layers
    cache = in_layer_order(done.cache, np.asarray(layers.is_lazy), np.asarray(layers.slot))
    return _Prefilled(request, done.plan, cache, done.logits, done.ratios[0])


def _serve_group(model, plan: Plan, group: list[Request], max_len: int, sampling: Sampling, batch_size: int,
                 chunk: int, first_key: np.ndarray):
    """Yields (prefilled item, its tokens) per request of one group as rows finish. `waiting` holds prefilled rows
    not yet in the batch: for a fixed plan at most one (it enters at once), for a selecting plan rows of other
    lazy sets (at most batch_size)."""
    pending = iter(group)
    unprefilled, remaining = len(group), len(group)
    waiting: list[_Prefilled] = []
    batch: _Batch | None = None

    def prefill_next():
        nonlocal unprefilled
        unprefilled -= 1
        waiting.append(_prefill_one(model, plan, next(pending), max_len))

    while remaining:
        if batch is None or not batch.busy:  # (re)open the batch for the longest-waiting row's plan
            if not waiting:
                prefill_next()
            if batch is None:
                batch = _Batch(model, waiting[0].plan, batch_size, max_len, sampling, first_key, chunk)
            batch.use_plan(waiting[0].plan)
        while (row := batch.free_row()) is not None:
            fits = next((w for w in waiting if w.plan == batch.plan), None)
            if fits is not None:
                waiting.remove(fits)
                batch.admit(row, fits)
            elif unprefilled and len(waiting) < batch_size:
                prefill_next()
            else:
                break
        # End the chunk at a row's finish only if something could take that row.
        can_fill = any(w.plan == batch.plan for w in waiting) or (unprefilled > 0 and len(waiting) < batch_size)
        for item, tokens in batch.step(until_finish=can_fill):
            remaining -= 1
            yield item, tokens


# ---- a long-running engine: requests join while others decode ---------------------------------------------------

@dataclasses.dataclass(eq=False)
class Job(Request):
    """One request to an `Engine` (`index` must be unique among live jobs): its fixed or selecting plan, its
    sampling (temperature, top_k, top_p, stop_ids; `seed` is its row's key; max_new_tokens is unused, `budget`
    counts), and two callbacks run on the engine thread: `on_tokens(new_ids)` after every chunk that gave the row
    tokens, returning True to end the row there (e.g. a stop string; finish reason "stop"), and `on_done(result)`
    once: {"ids", "finish_reason" ("stop", "length" or "cancelled"), "plan", "lazy_ratios" (selecting plans)}, or
    the exception that failed it."""
    plan: Plan = None
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    on_tokens: Callable[[list[int]], bool] = lambda ids: False
    on_done: Callable[[dict | BaseException], None] = lambda result: None


class Engine:
    """Continuous batching for requests that arrive over time: one thread owns the device; `submit`, `cancel` and
    `call` (any device work, e.g. scoring, run between decode chunks) may be called from any thread.

    Each job is prefilled alone (as a lone `generate` would: one row, cache `Model.cache_len` of its prompt and
    budget) and joins a decode batch (`_Batch`, `batch_size` rows) of the same cache length, fixed plan and
    sampling settings, as soon as one of its rows is free; at most `max_batches` batches are open, decoded one
    chunk each in turn, and an emptied batch is dropped. Compiled shapes depend only on the buckets, plan shapes
    and the fixed chunk, never on the number of requests. Rows sample with their own job's seed, so a job gets
    what `Model.generate` gives its prompt alone."""

    def __init__(self, model, batch_size: int = 8, chunk: int = DEFAULT_CHUNK, max_batches: int = 4):
        for name, v in (("batch_size", batch_size), ("chunk", chunk), ("max_batches", max_batches)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise LtJaxError(f"{name}={v!r} must be a whole number of at least 1.")
        self.model, self.batch_size, self.chunk, self.max_batches = model, batch_size, chunk, max_batches
        self._inbox: queue.Queue = queue.Queue()
        self._pending: collections.deque[Job] = collections.deque()  # not yet prefilled, oldest first
        self._waiting: list[tuple[tuple, _Prefilled]] = []  # prefilled, waiting for a row of their batch key
        self._batches: dict[tuple, _Batch] = {}
        self._sent: dict[int, int] = {}  # job index -> tokens passed to on_tokens so far
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lt-jax-engine", daemon=True)

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None):
        """Serve what was submitted, then end the thread."""
        self._inbox.put(("stop",))
        self._thread.join(timeout)

    def submit(self, job: Job):
        self._inbox.put(("job", job))

    def cancel(self, index: int):
        """Drops a job wherever it is (its row is freed); its on_done gets finish reason "cancelled"."""
        self._inbox.put(("cancel", index))

    def call(self, fn: Callable[[], object]) -> Future:
        """Runs fn() on the engine thread between chunks; its result (or exception) comes through the future."""
        future: Future = Future()
        self._inbox.put(("call", fn, future))
        return future

    @property
    def active(self) -> int:
        """Jobs not yet finished (approximate when read from another thread)."""
        return len(self._pending) + len(self._waiting) + sum(b.busy for b in self._batches.values())

    # -- the engine thread --

    def _run(self):
        while not (self._stopping and not self.active and self._inbox.empty()):
            self._read_inbox(block=not self.active)
            try:
                self._admit()
                for key, batch in list(self._batches.items()):
                    if batch.busy:
                        self._step(key, batch)
                    if not batch.busy:
                        del self._batches[key]
            except Exception as e:  # noqa: BLE001 - the device failed a batch: fail its jobs, keep serving
                self._fail_all(e)

    def _read_inbox(self, block: bool):
        while True:
            try:
                message = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            kind = message[0]
            if kind == "job":
                self._pending.append(message[1])
            elif kind == "cancel":
                self._cancel(message[1])
            elif kind == "call":
                _, fn, future = message
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        future.set_exception(e)
            else:
                self._stopping = True

    def _cancel(self, index: int):
        for job in self._pending:
            if job.index == index:
                self._pending.remove(job)
                return self._finish(job, [], "cancelled", job.plan, None)
        for entry in self._waiting:
            if entry[1].request.index == index:
                self._waiting.remove(entry)
                return self._finish(entry[1].request, [], "cancelled", entry[1].plan, entry[1].ratios)
        for batch in self._batches.values():
            for row, item in enumerate(batch.rows):
                if item is not None and item.request.index == index:
                    batch.release(row)
                    return self._finish(item.request, batch.tokens[row], "cancelled", item.plan, item.ratios)

    def _admit(self):
        for entry in list(self._waiting):
            if self._place(*entry):
                self._waiting.remove(entry)
        while self._pending and len(self._waiting) < self.batch_size:
            job = self._pending.popleft()
            try:
                max_len = self.model.cache_len(len(job.ids), job.budget)
                item = _prefill_one(self.model, job.plan, job, max_len)
            except Exception as e:  # noqa: BLE001 - this job's failure, not the engine's
                job.on_done(e)
                continue
            s = job.sampling
            key = (max_len, item.plan, float(s.temperature), int(s.top_k), float(s.top_p), s.stop_ids)
            if not self._place(key, item):
                self._waiting.append((key, item))

    def _place(self, key: tuple, item: _Prefilled) -> bool:
        batch = self._batches.get(key)
        if batch is None:
            if len(self._batches) >= self.max_batches:
                return False
            s = item.request.sampling
            # max_new_tokens=1: the prepared sampling's static `steps` stays one value for every batch
            sampling = dataclasses.replace(s, max_new_tokens=1).prepared(self.model.config.eos_token_ids)
            batch = self._batches[key] = _Batch(self.model, item.plan, self.batch_size, key[0], sampling,
                                                _key_data(0), self.chunk)
        row = batch.free_row()
        if row is None:
            return False
        batch.admit(row, item)
        batch.key[row] = _key_data(item.request.sampling.seed)
        self._sent[item.request.index] = 0
        return True

    def _step(self, key: tuple, batch: _Batch):
        rows = list(enumerate(batch.rows))
        finished = {id(item) for item, _ in batch.step(until_finish=bool(self._pending or self._waiting))}
        stop = {int(t) for t in batch.sampling.stop_ids}
        for row, item in rows:
            if item is None:
                continue
            job, tokens = item.request, batch.tokens[row]
            new = tokens[self._sent[job.index]:]
            self._sent[job.index] = len(tokens)
            ended = bool(new) and job.on_tokens(new)
            if id(item) in finished:
                self._finish(job, tokens, "stop" if tokens and tokens[-1] in stop else "length", item.plan,
                             item.ratios)
            elif ended:
                batch.release(row)
                self._finish(job, tokens, "stop", item.plan, item.ratios)

    def _finish(self, job: Job, tokens: list[int], reason: str, plan: Plan, ratios):
        self._sent.pop(job.index, None)
        result = {"ids": list(tokens), "finish_reason": reason, "plan": plan}
        if ratios is not None:
            result["lazy_ratios"] = [float(r) for r in ratios]
        job.on_done(result)

    def _fail_all(self, error: Exception):
        jobs = [j for j in self._pending] + [item.request for _, item in self._waiting]
        jobs += [item.request for b in self._batches.values() for item in b.rows if item is not None]
        self._pending.clear(), self._waiting.clear(), self._batches.clear(), self._sent.clear()
        for job in jobs:
            job.on_done(error)


def _key_data(seed: int) -> np.ndarray:
    """The raw data of `jax.random.key(seed)`, the key a lone `generate` starts from."""
    return np.asarray(jax.random.key_data(jax.random.key(seed)))
