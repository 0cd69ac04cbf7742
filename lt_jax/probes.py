"""Calibration probes: how much each attention head copies from far back in the prompt, or how much making a layer
stream costs the answer (docs/design.md §11).

The two head probes run one exact forward (every layer full) per sample and read, for a few query columns, each query
head's attention over the whole prompt (`attention_on`): whether its top-1 key is one of the query's targets, and
the probability mass on them. They differ in the prompts and the targets:

- `retrieval` (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality"): a number hidden
  in essays (`needles.needle_prompt`, the unkeyed needle, a format the evaluation tasks do not use); the model's own
  greedy answer (all layers full) is replayed, and for every answer token that is one of the needle's tokens the
  query predicting it targets the needle positions holding that token. A head's score is its top-1 hit rate over
  those answer tokens, averaged over the samples the full model answers right (the others are skipped).
- `induction` (RazorAttention's echo/induction heads, data-free): random tokens, a block of `span` tokens repeated
  once; a query in the second copy targets the token after its previous occurrence, `span` positions back (beyond
  a window of W < span). A head's score is its mean attention mass there.

A head probe's layer score is the maximum over its heads: one copying head among nine is what a layer mean hides.

- `nll` (loss-guided selection, arXiv 2606.27791): scores layers, not heads. Keyed needles in essays with
  distractors (`calibration_prompt`: 8-digit values, where the evaluation's keyed needles have 7, so no calibration
  prompt is an evaluation prompt), the true answer appended; a layer's score is the increase of the answer tokens'
  mean NLL when that layer alone streams (sink S, window W) over the all-full model, averaged over the prompts:
  L + 1 forwards per prompt. Higher: the layer costs more to stream. Optionally (`joint`) the loss-guided set of a
  lazy fraction is measured streaming together, against the sum of its scores: whether one-at-a-time ranking holds.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax.attention import attend_causal, masked_scores, native_window
from lt_jax.batching import bucket, left_pad
from lt_jax.calibration import Calibration
from lt_jax.config import Config
from lt_jax.errors import LtJaxError
from lt_jax.model import decoder
from lt_jax.plan import Plan, num_lazy
from lt_jax.progress import progress_bar


@partial(jax.jit, static_argnames=("cfg",))
def attention_on(params, tokens, positions, queries, targets, cfg: Config):
    """One exact forward of a row tokens/positions [1, T]; for the query columns `queries` int32 [Q] and their
    target keys `targets` bool [Q, T] -> (hit bool [L, N, Q]: the head's top-1 key is a target; mass float32
    [L, N, Q]: its attention probability on the targets). Attention uses each layer's full mask."""
    native = native_window(cfg)
    q_pos = positions[:, queries]

    def attention(q, k, v, _, carry):
        scores = masked_scores(q[:, queries], k, q_pos, positions, 0, native)  # [1, K, G, Q, T]
        probs = jax.nn.softmax(scores, axis=-1).reshape(-1, *scores.shape[-2:])  # [N, Q, T]
        top = jnp.argmax(probs, axis=-1)
        hit = jnp.take_along_axis(targets[None], top[..., None], axis=-1)[..., 0]
        mass = jnp.sum(jnp.where(targets[None], probs, 0.0), axis=-1)
        return attend_causal(q, k, v, positions, 0, native), carry, (hit, mass)

    _, _, (hit, mass) = decoder(params, tokens, positions, cfg, attention, head=None)
    return hit, mass


def probe_row(model, ids: list[int], queries: list[int], targets: np.ndarray, width: int = 0):
    """`attention_on` for one sequence, left padded to its bucket (or `width`), with the query list padded to a
    fixed size by repeating the last (their results are dropped) -> (hit [L, N, Q], mass [L, N, Q]) numpy."""
    T = max(width, bucket(len(ids)))
    tokens, positions = left_pad([ids], T)
    pad = T - len(ids)
    Q = bucket(len(queries), 8)
    cols = np.asarray(list(queries) + [queries[-1]] * (Q - len(queries)), np.int32) + pad
    tgt = np.zeros((Q, T), bool)
    tgt[:len(queries), pad:] = targets
    hit, mass = attention_on(model.params, model.rows(tokens), model.rows(positions), jnp.asarray(cols),
                             jnp.asarray(tgt), model.config)
    return np.asarray(hit)[..., :len(queries)], np.asarray(mass)[..., :len(queries)]


def digit_runs(model, ids: list[int]) -> list[tuple[int, int, str]]:
    """(start, end, digits) of every maximal run of tokens that decode to digits only (spaces aside)."""
    runs, start = [], None
    texts = [model.decode([t]).strip() for t in ids]
    for i, text in enumerate(texts + [""]):
        digit = bool(text) and text.isdigit()
        if digit and start is None:
            start = i
        elif not digit and start is not None:
            runs.append((start, i, "".join(texts[start:i])))
            start = None
    return runs


def needle_mask(model, prompt: list[int], number: str) -> np.ndarray | None:
    """bool [len(prompt)]: the tokens spelling `number` (every run of digit tokens that reads it), or None."""
    spans = [(s, e) for s, e, text in digit_runs(model, prompt) if text == number]
    if not spans:
        return None
    needle = np.zeros(len(prompt), bool)
    for s, e in spans:
        needle[s:e] = True
    return needle


def retrieval_sample(model, prompt: list[int], answer: list[int], needle: np.ndarray):
    """One replayed answer -> (hits [L, N], scored answer tokens), or None when no answer token is one of the
    needle's: the query predicting answer[j] (column len(prompt)-1+j) targets the needle positions holding
    answer[j], and a head hits when its top-1 key is one of them."""
    seq = np.asarray(prompt + answer)
    queries, targets = [], []
    for j, token in enumerate(answer):
        target = np.zeros(len(seq), bool)
        target[:len(prompt)] = needle & (seq[:len(prompt)] == token)
        if target.any():
            queries.append(len(prompt) - 1 + j)
            targets.append(target)
    if not queries:
        return None
    last = queries[-1] + 1  # the forward needs the sequence up to the last query only
    hit, _ = probe_row(model, seq[:last].tolist(), queries, np.stack(targets)[:, :last])
    return hit.sum(axis=-1), len(queries)


def retrieval_scores(model, haystack_ids: list[int], lengths=(2048,), samples: int = 8, seed: int = 0,
                     max_new_tokens: int = 8, progress: bool = True) -> dict:
    """The retrieval probe over `samples` needle prompts per length (depths spread over 0.05..0.95)."""
    from lt_jax import needles
    L, N = model.config.num_layers, model.config.num_heads
    hits, counts, used, skipped = np.zeros((L, N)), 0, 0, []
    for length in lengths:
        if len(haystack_ids) < length:
            raise LtJaxError(f"the haystack holds {len(haystack_ids)} tokens, too few for {length}-token prompts.")
    jobs = [(length, s) for length in lengths for s in range(samples)]
    for length, s in progress_bar(len(jobs), "calibrate retrieval", "sample", disable=not progress).wrap(jobs):
        rng = np.random.default_rng([seed, length, s])
        number = int(rng.integers(10_000, 100_000))
        depth = 0.05 + 0.9 * (s + 0.5) / samples
        offset = int(rng.integers(0, len(haystack_ids) - length + 1))
        hay = haystack_ids[offset:] + haystack_ids[:offset]
        try:
            prompt = needles.needle_prompt(model, hay, length - max_new_tokens, depth, number)
        except ValueError:
            raise LtJaxError(f"a {length}-token prompt is too short to hold the needle, the question and a "
                             f"{max_new_tokens}-token answer; give longer lengths.") from None
        answer = model.generate([prompt], plan="full", max_new_tokens=max_new_tokens)[0]["ids"]
        if needles.first_number(model.decode(answer)) != str(number):
            skipped.append(f"{length}/{s}: wrong answer")
            continue
        needle = needle_mask(model, prompt, str(number))
        got = None if needle is None else retrieval_sample(model, prompt, answer, needle)
        if got is None:
            skipped.append(f"{length}/{s}: needle tokens not found")
            continue
        hits += got[0] / got[1]
        counts += got[1]
        used += 1
    if not used:
        raise LtJaxError(f"the full model answered none of the {len(jobs)} calibration needles; nothing to score "
                         f"(try shorter --lengths).")
    return {"head_scores": hits / used, "samples_used": used, "answer_tokens": counts, "skipped": skipped}


def check_induction(span: int, queries: int, context: int) -> None:
    """The induction probe's sizes against a context (needs only the config: the CLI runs it before the load)."""
    if 2 * span > context or span < 2 or queries < 1:
        raise LtJaxError(f"--span {span} must be at least 2 and twice it within the model's context of {context}; "
                         f"--queries {queries} at least 1.")


def induction_scores(model, span: int = 1024, samples: int = 8, queries: int = 64, seed: int = 0,
                     progress: bool = True) -> dict:
    """The induction probe: `samples` rows of a random `span`-token block repeated once; `queries` columns of the
    second copy (evenly spaced) each target the token after its first occurrence."""
    V = model.config.vocab_size
    L, N = model.config.num_layers, model.config.num_heads
    check_induction(span, queries, model.config.max_position_embeddings)
    cols = np.unique(np.linspace(span, 2 * span - 2, min(queries, span - 1)).astype(int))
    targets = np.zeros((len(cols), 2 * span), bool)
    targets[np.arange(len(cols)), cols - span + 1] = True
    mass = np.zeros((L, N))
    for s in progress_bar(samples, "calibrate induction", "sample", disable=not progress).wrap(range(samples)):
        block = np.random.default_rng([seed, s]).integers(min(1000, V // 4), V, span).tolist()
        _, m = probe_row(model, block + block, cols.tolist(), targets)
        mass += m.mean(axis=-1)
    return {"head_scores": mass / samples, "samples_used": samples}


CALIBRATION_DIGITS = 8  # the nll probe's values; evaluate.Retrieval's keyed needles (needles.niah_prompt) have 7


def calibration_prompt(model, haystack_ids: list[int], length: int, depth: float, rng: np.random.Generator,
                       keys: int) -> tuple[list[int], list[int]]:
    """A keyed needle prompt of at most `length` tokens (`needles.haystack_prompt`): `keys` needles with distinct
    keys and CALIBRATION_DIGITS-digit values, the asked one at `depth`, the distractors at depths drawn from `rng`
    -> (prompt ids, answer ids: the asked value after a space, as the answer prefix leaves it)."""
    from lt_jax import needles
    pairs = rng.choice(len(needles.ADJECTIVES) * len(needles.NOUNS), keys, replace=False)
    names = [f"{needles.ADJECTIVES[i // len(needles.NOUNS)]}-{needles.NOUNS[i % len(needles.NOUNS)]}" for i in pairs]
    values = [str(v) for v in rng.integers(10 ** (CALIBRATION_DIGITS - 1), 10 ** CALIBRATION_DIGITS, keys)]
    depths = [depth] + [float(d) for d in rng.uniform(0, 1, keys - 1)]
    prompt = needles.haystack_prompt(
        model, haystack_ids, length, [(d, needles.KEYED_NEEDLE.format(key=k, value=v)) for d, k, v in
                                      zip(depths, names, values)],
        needles.KEYED_QUESTION.format(key=names[0]), needles.KEYED_ANSWER_PREFIX.format(key=names[0]))
    return prompt, model.tokenizer(" " + values[0], add_special_tokens=False)["input_ids"]


def calibration_rows(model, haystack_ids: list[int], lengths=(2048,), samples: int = 8, seed: int = 0,
                     keys: int = 4) -> list[tuple[list[int], int]]:
    """The nll probe's rows: (prompt + answer ids, where the answer starts) for `samples` prompts per length, each
    at most `length` tokens with its answer, the asked needle's depths spread over 0.05..0.95."""
    rows = []
    for length in lengths:
        if len(haystack_ids) < length:
            raise LtJaxError(f"the haystack holds {len(haystack_ids)} tokens, too few for {length}-token prompts.")
        for s in range(samples):
            rng = np.random.default_rng([seed, length, s])
            offset = int(rng.integers(0, len(haystack_ids) - length + 1))
            hay = haystack_ids[offset:] + haystack_ids[:offset]
            try:
                prompt, answer = calibration_prompt(model, hay, length - CALIBRATION_DIGITS - 2,
                                                    0.05 + 0.9 * (s + 0.5) / samples, rng, keys)
            except ValueError:
                raise LtJaxError(f"a {length}-token prompt is too short to hold {keys} needles, the question and "
                                 f"the answer; give longer lengths.") from None
            rows.append((prompt + answer, len(prompt)))
    return rows


def single_layer_plans(num_layers: int, sink: int, window: int) -> list[Plan]:
    """All layers full, then each layer alone streaming: the L + 1 plans the nll probe compares."""
    return [Plan.full(num_layers)] + [Plan(num_layers, (i,), sink, window, source=f"layer {i} streams")
                                      for i in range(num_layers)]


def answer_nll(model, rows: list[tuple[list[int], int]], plans: list[Plan], progress: bool = True) -> np.ndarray:
    """float64 [rows, plans]: each row's mean NLL of its answer tokens (ids[start:] given what precedes them) under
    each fixed plan, one forward (`Model.token_nll`) per row and plan. Rows are right padded to one bucket: tokens
    after the answer change nothing before it (causal), and every row then shares the compilations (one for the
    all-full plan, one for the single-layer ones)."""
    T = min(bucket(max(len(ids) for ids, _ in rows)), model.config.max_position_embeddings)
    out = np.zeros((len(rows), len(plans)))
    with progress_bar(len(rows) * len(plans), "calibrate nll", "forward", disable=not progress) as bar:
        for r, (ids, start) in enumerate(rows):
            if not 1 <= start < len(ids) <= T:
                raise LtJaxError(f"calibration row {r}: its answer must start in 1..{len(ids) - 1} and the row fit "
                                 f"the model's context of {T} tokens; got start {start}, {len(ids)} tokens.")
            padded = np.zeros((1, T), np.int32)
            padded[0, :len(ids)] = ids
            for p, plan in enumerate(plans):
                out[r, p] = model.token_nll(padded, plan)[0, start - 1:len(ids) - 1].astype(np.float64).mean()
                bar.update()
    return out


def nll_scores(model, rows: list[tuple[list[int], int]], sink: int, window: int, progress: bool = True,
               joint: tuple[float, ...] = ()) -> dict:
    """The nll probe over `rows` (`calibration_rows`): each layer's answer-NLL increase when it alone streams,
    averaged over the rows, as a one-column [L, 1] table (the calibration file's head_scores).

    `joint`: lazy fractions whose loss-guided set (the lowest-scored layers) is also measured streaming together,
    one more forward per row each: `joint` the set's increase, `additive` the sum of its layers' scores. Scores
    that add up (joint ~ additive) are what ranking layers one at a time assumes."""
    L = model.config.num_layers
    nll = answer_nll(model, rows, single_layer_plans(L, sink, window), progress)
    scores = (nll[:, 1:] - nll[:, :1]).mean(axis=0)
    found = {"head_scores": scores[:, None], "samples_used": len(rows),
             "forwards": len(rows) * (L + len(joint) + 1), "full_answer_nll": round(float(nll[:, 0].mean()), 6)}
    if joint:
        ranked = Calibration("nll", tuple((float(x),) for x in scores), {})
        sets = [ranked.lowest(num_lazy(L, f)) for f in joint]
        together = answer_nll(model, rows, [Plan(L, lazy, sink, window, source=f"loss-guided {f}")
                                            for f, lazy in zip(joint, sets)], progress)
        found["joint"] = [{"lazy_fraction": f, "layers": list(lazy),
                           "joint": round(float((together[:, j] - nll[:, 0]).mean()), 6),
                           "additive": round(float(scores[list(lazy)].sum()), 6)}
                          for j, (f, lazy) in enumerate(zip(joint, sets))]
    return found


def nll_greedy(model, rows: list[tuple[list[int], int]], sink: int, window: int, count: int,
               singles: np.ndarray | None = None, progress: bool = True) -> dict:
    """Greedy loss-guided selection (`--probe nll-greedy`): `count` lazy layers chosen one at a time, each the layer
    whose streaming *together with those already chosen* raises the rows' mean answer NLL least. One-at-a-time
    scores miss layers that stand in for each other (each harmless alone, both together losing the needle: Qwen's
    calibration prompts, results/nll/README.md); here each step measures the set as it will stream.

    Lazy greedy (Minoux 1978): a layer's last measured increase is kept as a lower bound on its next one, and only
    the best candidate is measured again; when its fresh increase is still the lowest it is taken. Exact when
    adding layers only makes each other layer costlier to stream (the interaction above); a heuristic otherwise.
    Starts from the single-layer scores (`singles`, e.g. an nll calibration of the same rows; measured when None).

    Scores ([L, 1], the calibration's head_scores) are ranks: the k-th layer chosen scores k, the layers left full
    count + their rank by single score, so `Calibration.lowest(n)` is the first n chosen (n <= count)."""
    L = model.config.num_layers
    if not 1 <= count < L:
        raise LtJaxError(f"nll-greedy chooses 1..{L - 1} lazy layers of {L}; got {count}.")
    if singles is not None and len(singles) != L:
        raise LtJaxError(f"nll-greedy: {len(singles)} single-layer scores for a model of {L} layers.")
    forwards = 0
    if singles is None:
        nll = answer_nll(model, rows, single_layer_plans(L, sink, window), progress)
        singles, current = (nll[:, 1:] - nll[:, :1]).mean(axis=0), nll[:, 0]
        forwards += len(rows) * (L + 1)
    else:
        current = answer_nll(model, rows, [Plan.full(L)], progress)[:, 0]
        forwards += len(rows)
    full = current.mean()
    bound = {i: float(singles[i]) for i in range(L)}  # a lower bound on each layer's next increase
    chosen, steps = [], []
    with progress_bar(count, "calibrate nll-greedy", "layer", disable=not progress) as bar:
        while len(chosen) < count:
            fresh = {}
            while True:
                best = min(bound, key=lambda i: (bound[i], i))
                if best in fresh:
                    break
                plan = Plan(L, tuple(sorted(chosen + [best])), sink, window, source=f"greedy step {len(chosen)}")
                fresh[best] = answer_nll(model, rows, [plan], progress=False)[:, 0]
                forwards += len(rows)
                bound[best] = float((fresh[best] - current).mean())
            chosen.append(best)
            current = fresh[best]
            steps.append({"layer": best, "increase": round(bound.pop(best), 6),
                          "set_increase": round(float(current.mean() - full), 6), "measured": len(fresh)})
            bar.update()
    left = sorted(bound, key=lambda i: (singles[i], i))
    ranks = np.empty(L)
    ranks[chosen] = np.arange(count)
    ranks[left] = count + np.arange(len(left))
    return {"head_scores": ranks[:, None], "samples_used": len(rows), "forwards": forwards,
            "full_answer_nll": round(float(full), 6), "order": chosen, "steps": steps,
            "single_scores": [round(float(s), 6) for s in singles]}
