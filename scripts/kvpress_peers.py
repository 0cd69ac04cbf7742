"""kvpress's head- and layer-level peers on the RULER prompts lt-jax evaluates, at lt-jax's KV budget.

Runs in its own venv (kvpress pins transformers<5.3; lt-jax's venv has 5.x): reads the prompts
`scripts/export_ruler.py` wrote (token ids after the chat template and answer prefix, the answer budget, RULER's
answers). Each prompt is prefilled once, whole, every layer full (float32, sdpa), and each method's press is applied
to a copy of that cache as its hook would apply it after the prefill (a press never changes the prefill's attention,
only the cache it leaves; `pressed`), then greedy decoding with explicit positions as kvpress's pipeline does
(`KVPressTextGenerationPipeline.generate_answer`) until the model's EOS or the prompt's answer budget (lt-jax's RULER
budget). Scored by lt-jax's own
`ruler.string_match_all(ruler.postprocess(answer), answers)`, loaded from lt_jax/eval/ruler.py by path (lt_jax's
package imports jax, which this venv lacks; that module needs numpy only).

Methods, at lt-jax's budget "a fraction F of the layers stream, each keeping S sink + W recent tokens" (default
F = 0.5, S = 4, W = 1020, lt-jax's plan defaults):
- `full`: no press.
- `duo`: `DuoAttentionPress(head_compression_ratio=F, on_the_fly_scoring=True)`: the F share of (layer, KV head)
  pairs with the lowest on-the-fly scores stream, keeping S + W tokens (its own 128 + 256 replaced by lt-jax's), so
  its prompt KV equals lt-jax's exactly. kvpress scores heads on 50 BookSum chapters (`load_dataset`), which is not
  reachable here: the essays, cut into 100-word chapters, stand in for them (same function, same sampling).
- `duo-native`: the same heads and scores with DuoAttention's own S = 128, W = 256; the streaming share chosen per
  prompt so its prompt KV is the nearest to lt-jax's (more heads stream, each keeping fewer tokens).
- `simlayerkv`: `SimLayerKVPress` (n_last = 1, n_initial = S, recent = W), its lazy rule (the last query's attention
  mass on the first S and last W positions, mean over heads) turned from a threshold into a rank: the F share of
  layers with the highest mass are lazy, per prompt (the threshold at that prompt's quantile), so its prompt KV
  equals lt-jax's.
Decoded tokens are appended to every cache (kvpress compresses only the prefill), where lt-jax's streaming layers
keep a ring of W: at most max_new_tokens more KV per streaming layer or head in decode.

Rows (JSONL, one per (example, method), the fields of `lt-jax eval`'s rows plus `kv_fraction`, the share of the
prompt's KV entries kept) are appended and flushed one at a time; a rerun skips the rows already written and drops a
half-written last line; OUT.meta.json holds the settings, and a rerun with other settings is refused.

    /work/kvpress-venv/bin/python scripts/kvpress_peers.py PROMPTS.jsonl HF_MODEL_DIR --out ROWS.jsonl \\
        [--methods full,duo,simlayerkv] [--compare LT_JAX_ROWS.jsonl] [--json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("full", "duo", "duo-native", "simlayerkv")
DUO_NATIVE = (128, 256)  # DuoAttentionPress.post_init_from_model's on-the-fly sink and recent sizes
CHAPTER_WORDS = 100


class BadInput(Exception):
    """One sentence for the user, exit code 2."""


def ruler_scoring():
    """lt_jax/eval/ruler.py as a module, without the lt_jax package (whose __init__ imports jax)."""
    spec = importlib.util.spec_from_file_location("lt_jax_ruler", REPO / "lt_jax" / "eval" / "ruler.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


# ---- inputs and the results file -------------------------------------------------------------------------

def read_jsonl(path: Path, what: str) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise BadInput(f"cannot read {what} {path}: {e.strerror}.") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise BadInput(f"{path} line {n} is not valid JSON.") from None
    return out


def read_prompts(path: Path) -> tuple[dict, list[dict]]:
    """(settings, prompts) of an export_ruler.py file; its sidecar must exist (it is written last)."""
    meta = path.with_name(path.name + ".meta.json")
    if not meta.exists():
        raise BadInput(f"{path} has no {meta.name}: it is not a whole file written by scripts/export_ruler.py.")
    prompts = read_jsonl(path, "the prompts file")
    need = {"example", "cell", "ids", "max_new_tokens", "target"}
    for n, p in enumerate(prompts, 1):
        if not isinstance(p, dict) or not need <= p.keys():
            raise BadInput(f"{path} line {n} lacks {', '.join(sorted(need - set(p)))}: not an export_ruler.py line.")
    if not prompts:
        raise BadInput(f"{path} holds no prompt.")
    return json.loads(meta.read_text())["settings"], prompts


def more_samples(had: dict, settings: dict) -> bool:
    """Whether `settings` only ask for more prompts of the same draw than `had` (an export with a larger --samples:
    lt-jax's sample s has its own seed, so the earlier prompts are the same and their rows stay valid)."""
    def without(s):
        return {**s, "prompt_settings": {k: v for k, v in s["prompt_settings"].items() if k != "samples"}}
    try:
        return without(had) == without(settings) and \
            had["prompt_settings"]["samples"] < settings["prompt_settings"]["samples"]
    except (KeyError, TypeError, AttributeError):
        return False


class Rows:
    """The results file: complete rows kept, a half-written last line dropped, more samples of the same prompts
    grown into, other settings refused."""

    def __init__(self, path: Path, settings: dict):
        self.path, self.meta = path, path.with_name(path.name + ".meta.json")
        if self.meta.exists():
            had = json.loads(self.meta.read_text())["settings"]
            if had != settings and more_samples(had, settings):
                print(f"[kvpress_peers] {path}: growing from {had['prompt_settings']['samples']} to "
                      f"{settings['prompt_settings']['samples']} samples per task; the rows written are kept",
                      file=sys.stderr)
                self._write_meta(settings)
            elif had != settings:
                differ = sorted(k for k in {*had, *settings} if had.get(k) != settings.get(k))
                raise BadInput(f"{path} was made with other settings ({', '.join(differ)} differ); pass another "
                               f"--out.")
        elif path.exists() and path.stat().st_size:
            raise BadInput(f"{path} exists without {self.meta.name}: not a results file of this script.")
        else:
            self._write_meta(settings)
        text = path.read_text() if path.exists() else ""
        if text and not text.endswith("\n"):  # a kill mid-row: keep the complete rows
            text = text[:text.rfind("\n") + 1]
            path.write_text(text)
        self.rows = [json.loads(line) for line in text.splitlines()]
        self.done = {(r["example"], r["method"]) for r in self.rows}

    def _write_meta(self, settings: dict):
        tmp = self.meta.with_name("." + self.meta.name + ".tmp")
        tmp.write_text(json.dumps({"written_by": "scripts/kvpress_peers.py", "settings": settings}, indent=1))
        os.replace(tmp, self.meta)

    def add(self, row: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        self.done.add((row["example"], row["method"]))


# ---- presses ---------------------------------------------------------------------------------------------

def offline_booksum(texts: list[str]):
    """What `load_dataset("kmfoda/booksum", split="train")` gives DuoAttention's on-the-fly scoring, from `texts`:
    a table with a `chapter` column, here 100-word pieces of the texts (short: each costs a forward on this CPU)."""
    import pandas as pd
    words = " ".join(texts).split()
    chapters = [" ".join(words[i:i + CHAPTER_WORDS]) for i in range(0, len(words), CHAPTER_WORDS)]

    class Table:
        def to_pandas(self):
            return pd.DataFrame({"chapter": chapters})
    return lambda *args, **kwargs: Table()


def make_presses(texts: list[str]):
    """The press classes, built once kvpress (and torch) are imported."""
    import kvpress.presses.duo_attention_press as duo
    from kvpress import BasePress, DuoAttentionPress, SimLayerKVPress
    from kvpress.presses.snapkv_press import SnapKVPress
    duo.load_dataset = offline_booksum(texts)  # the on-the-fly scoring's only network access

    class SizedDuoAttention(DuoAttentionPress):
        """DuoAttentionPress with its on-the-fly head scores and a chosen sink and recent size."""
        def __init__(self, head_compression_ratio: float, sink: int, recent: int):
            super().__init__(head_compression_ratio=head_compression_ratio, on_the_fly_scoring=True)
            self.sink, self.recent = sink, recent

        def post_init_from_model(self, model):
            super().post_init_from_model(model)  # scores cached per model by kvpress
            self.sink_size, self.recent_size = self.sink, self.recent

    class RankedSimLayerKV(SimLayerKVPress):
        """SimLayerKVPress whose lazy layers are given (`lazy`), or, with `lazy=None`, that records each layer's
        lazy score (SimLayerKVPress.is_lazy's) and compresses nothing."""
        def __init__(self, sink: int, window: int, lazy: frozenset | None):
            # keys[-n_recent + n_last:] keeps n_recent - n_last recent tokens: W of them
            super().__init__(lazy_threshold=0.0, n_last=1, n_recent=window + 1, n_initial=sink)
            self.lazy, self.scores = lazy, {}

        def is_lazy(self, module, hidden_states, keys, position_embeddings) -> bool:
            if self.lazy is not None:
                return module.layer_idx in self.lazy
            attn = SnapKVPress.compute_window_attention(module, hidden_states, keys, self.n_last,
                                                        position_embeddings).mean((0, 1, 2))
            self.scores[module.layer_idx] = float(attn[:self.n_initial].sum() + attn[-self.n_recent:].sum())
            return False

    class Capture(BasePress):
        """Compresses nothing; keeps what each layer's `compress` is given besides the cache (`pressed`)."""
        def __init__(self):
            self.seen = {}

        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            self.seen[module.layer_idx] = (hidden_states, {"position_embeddings": kwargs["position_embeddings"]})
            return keys, values

    return Capture, SizedDuoAttention, RankedSimLayerKV, duo


def duo_native_ratio(heads: int, prompt: int, sink: int, window: int, fraction: float) -> float:
    """The head share for DuoAttention's own 128 + 256 whose prompt KV is the nearest to lt-jax's: `fraction` of the
    units keeping S + W of the `prompt` tokens."""
    s, w = DUO_NATIVE
    want = fraction * (1 - min(sink + window, prompt) / prompt)  # share of the prompt's KV dropped by lt-jax
    per = 1 - min(s + w, prompt) / prompt                         # dropped per streaming head
    return round(min(1.0, want / per) * heads) / heads


# ---- running ---------------------------------------------------------------------------------------------

def prefill(model, ids: list[int], capture) -> tuple[int, object]:
    """The prompt's one exact prefill (every layer full; a press never changes the prefill's attention, only the
    cache it leaves): (first new token, the full cache); `capture` (a `Capture` press) keeps what each layer's
    press would be given."""
    import torch
    from transformers import DynamicCache
    cache = DynamicCache()
    with torch.no_grad(), capture(model):
        out = model(input_ids=torch.tensor([ids]), past_key_values=cache, logits_to_keep=1)
    return int(out.logits[0, -1].argmax()), cache


def pressed(model, cache, capture, press):
    """A copy of the full `cache` as `press` leaves it after the prefill: `BasePress.__call__`'s
    `post_init_from_model`, then per layer its `forward_hook`'s compress-and-store, on the captured inputs."""
    import copy
    cache = copy.deepcopy(cache)
    if press is None:
        return cache
    press.post_init_from_model(model)
    for layer in model.model.layers:
        module, i = layer.self_attn, layer.self_attn.layer_idx
        hidden, kwargs = capture.seen[i]
        keys, values = press.compress(module, hidden, cache.layers[i].keys, cache.layers[i].values, None, kwargs)
        cache.layers[i].keys, cache.layers[i].values = keys, values
    return cache


def decode(model, first: int, cache, position: int, max_new_tokens: int) -> list[int]:
    """Greedy from the prefill's token, explicit positions (the compressed cache is shorter than the prompt), until
    the model's EOS or `max_new_tokens` (kvpress's `generate_answer`)."""
    import torch
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    new = [first]
    with torch.no_grad():
        while len(new) < max_new_tokens and new[-1] not in stop:
            out = model(input_ids=torch.tensor([[new[-1]]]), past_key_values=cache,
                        position_ids=torch.tensor([[position]]))
            new.append(int(out.logits[0, -1].argmax()))
            position += 1
    return new


def kv_fraction(model, cache, prompt: int) -> float:
    """Share of the prompt's (layer, KV head, token) entries the cache holds after the prefill: layers dropped
    (SimLayerKV) from the cache lengths, heads masked (DuoAttention, whose cache keeps every token) from each
    attention module's `masked_key_indices`."""
    layers = model.model.layers
    heads = model.config.num_key_value_heads
    total = len(layers) * heads * prompt
    masked = sum(len(m[0]) for m in (getattr(layer.self_attn, "masked_key_indices", None) for layer in layers)
                 if m is not None)
    kept = sum(int(layer.keys.shape[2]) for layer in cache.layers)
    return round((kept * heads - masked) / total, 5)


def run(args) -> dict:
    settings_in, prompts = read_prompts(args.prompts)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(set(methods)) != len(methods):
        raise BadInput(f"--methods must be distinct names among {', '.join(METHODS)}; got {args.methods}.")
    if not 0 <= args.lazy_fraction <= 1 or args.sink < 0 or args.window < 1:
        raise BadInput(f"need 0 <= --lazy-fraction <= 1, --sink >= 0, --window >= 1; got {args.lazy_fraction}, "
                       f"{args.sink}, {args.window}.")
    if not (args.model / "config.json").exists():
        raise BadInput(f"{args.model} is not a Hugging Face model directory (no config.json).")
    compare = read_jsonl(args.compare, "the lt-jax rows") if args.compare else []
    if args.report:
        meta = args.out.with_name(args.out.name + ".meta.json")
        if not meta.exists():
            raise BadInput(f"{args.out} has no {meta.name}: nothing to report.")
        return report(args.out, json.loads(meta.read_text())["settings"], read_jsonl(args.out, "the rows file"),
                      prompts, methods, compare)
    texts = [p.read_text(encoding="utf-8") for p in sorted(args.essays.glob("*.txt"))]
    if not texts and ("duo" in methods or "duo-native" in methods):
        raise BadInput(f"{args.essays} holds no .txt file for DuoAttention's head scores.")
    scoring = ruler_scoring()

    import torch
    import kvpress  # noqa: F401  (patches the attention functions DuoAttention masks through)
    import transformers
    from tqdm import tqdm
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                              attn_implementation="sdpa").eval()
    Capture, SizedDuo, RankedSimLayerKV, duo = make_presses(texts)
    settings = {"prompts": str(args.prompts), "prompt_settings": settings_in, "model": str(args.model),
                "lazy_fraction": args.lazy_fraction, "sink": args.sink, "window": args.window,
                "dtype": "float32", "versions": {"kvpress": _version("kvpress"), "torch": torch.__version__,
                                                 "transformers": transformers.__version__}}
    results = Rows(args.out, settings)
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    lazy_count = round(args.lazy_fraction * layers)
    heads_file = duo_heads(args, model, duo)
    # every task's first sample, then every task's second, ...: a stopped run has covered every task
    order = sorted(prompts, key=lambda p: int(p["example"].rsplit("/", 1)[1]))
    todo = [(p, [m for m in methods if (p["example"], m) not in results.done]) for p in order]
    todo = [(p, ms) for p, ms in todo if ms]

    with tqdm(total=sum(len(ms) for _, ms in todo), desc="kvpress peers", unit="row", file=sys.stderr,
              disable=args.json or not todo) as bar:
        for p, names in todo:
            t0 = time.perf_counter()
            n = len(p["ids"])
            capture = Capture()
            first, full_cache = prefill(model, p["ids"], capture)  # counted in the first method's seconds
            for m in names:
                extra = {}
                if m == "full":
                    press = None
                elif m == "duo":
                    press = SizedDuo(args.lazy_fraction, args.sink, args.window)
                elif m == "duo-native":
                    ratio = duo_native_ratio(layers * heads, n, args.sink, args.window, args.lazy_fraction)
                    press, extra = SizedDuo(ratio, *DUO_NATIVE), {"head_compression_ratio": ratio}
                else:
                    scorer = RankedSimLayerKV(args.sink, args.window, None)
                    pressed(model, full_cache, capture, scorer)
                    ranked = [scorer.scores[i] for i in range(layers)]
                    lazy = sorted(sorted(range(layers), key=lambda i: -ranked[i])[:lazy_count])
                    press = RankedSimLayerKV(args.sink, args.window, frozenset(lazy))
                    extra = {"lazy_layers": lazy, "ratios": [round(x, 5) for x in ranked]}
                cache = pressed(model, full_cache, capture, press)
                if m.startswith("duo") and not heads_file.exists():
                    write_duo_heads(heads_file, args, model, duo)
                fraction = kv_fraction(model, cache, n)
                answer = model_answer(args.model, decode(model, first, cache, n, p["max_new_tokens"]))
                for layer in model.model.layers:  # the next method must not decode through this one's masks
                    layer.self_attn.masked_key_indices = None
                results.add({"example": p["example"], "cell": p["cell"], "method": m, "answer": answer,
                             "target": p["target"],
                             "score": scoring.string_match_all(scoring.postprocess(answer), p["target"]),
                             "seconds": round(time.perf_counter() - t0, 3), "kv_fraction": fraction, **extra})
                bar.update()
                t0 = time.perf_counter()
    return report(args.out, settings, results.rows, prompts, methods, compare)


def report(out: Path, settings: dict, rows: list[dict], prompts: list[dict], methods: list[str],
           compare: list[dict]) -> dict:
    """The summary over the prompts every method has a row for (all of them once the run is complete), lt-jax's
    rows (`compare`) summarized on the same prompts, and full's agreement with lt-jax's."""
    have = {}
    for r in rows:
        have.setdefault(r["example"], set()).add(r["method"])
    ids = {p["example"] for p in prompts if set(methods) <= have.get(p["example"], set())}
    rows = [r for r in rows if r["example"] in ids and r["method"] in methods]
    got = {"out": str(out), "settings": settings, "prompts": len(ids), "of": len(prompts),
           "summary": summarize(rows, methods)}
    if compare:
        got["lt_jax"] = summarize([r for r in compare if r["example"] in ids],
                                  sorted({r["method"] for r in compare}))
        got["agreement"] = agreement(rows, compare)
    got["table"] = table(got)
    return got


def duo_heads(args, model, duo) -> Path:
    """OUT.duo_heads.json: DuoAttention's on-the-fly head scores for this model, computed once (50 forwards) and
    handed to kvpress's cache of them on later runs."""
    path = args.out.with_name(args.out.name + ".duo_heads.json")
    if path.exists():
        saved = json.loads(path.read_text())
        if (saved["model"], saved["texts"], saved["chapter_words"]) != (str(args.model), str(args.essays),
                                                                         CHAPTER_WORDS):
            raise BadInput(f"{path} holds head scores of another model or texts; delete it or pass another --out.")
        import numpy as np
        duo.cache[duo_key(model)] = np.asarray(saved["scores"], dtype=np.float32)
    return path


def duo_key(model) -> tuple:
    return model.config.name_or_path, 50, 500  # duo_attention_on_the_fly's cache key with its defaults


def write_duo_heads(path: Path, args, model, duo):
    scores = duo.cache[duo_key(model)]
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps({"written_by": "scripts/kvpress_peers.py", "model": str(args.model),
                               "texts": str(args.essays), "chapter_words": CHAPTER_WORDS,
                               "what": "kvpress duo_attention_on_the_fly(model): 50 chapters, q_len 500; [layer][kv head]",
                               "scores": [[float(x) for x in row] for row in scores]}))
    os.replace(tmp, path)


_TOKENIZERS = {}


def model_answer(path: Path, ids: list[int]) -> str:
    """The answer text as lt-jax decodes it (`Model.decode`: special tokens skipped)."""
    from transformers import AutoTokenizer
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[path].decode(ids, skip_special_tokens=True)


def _version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


# ---- summary ---------------------------------------------------------------------------------------------

def summarize(rows: list[dict], methods: list[str]) -> dict:
    """As `lt-jax eval`'s RULER summary: mean score x 100 per task, the average over tasks, examples; plus the mean
    prompt-KV share kept where the rows hold it."""
    tasks = sorted({r["cell"]["task"] for r in rows})
    out = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        cells = {t: 100 * sum(r["score"] for r in c) / len(c) for t in tasks
                 if (c := [r for r in mine if r["cell"]["task"] == t])}
        if cells:
            out[m] = {**cells, "average": sum(cells.values()) / len(cells), "examples": len(mine)}
            if all("kv_fraction" in r for r in mine):
                out[m]["kv_fraction"] = round(sum(r["kv_fraction"] for r in mine) / len(mine), 4)
    return {"columns": tasks, "methods": out}


def agreement(rows: list[dict], compare: list[dict]) -> dict:
    """torch's `full` against lt-jax's `full`, prompt by prompt: same answer text, same score."""
    ours = {r["example"]: r for r in rows if r["method"] == "full"}
    theirs = {r["example"]: r for r in compare if r["method"] == "full" and r["example"] in ours}
    same_answer = sorted(e for e in theirs if ours[e]["answer"] == theirs[e]["answer"])
    same_score = sorted(e for e in theirs if ours[e]["score"] == theirs[e]["score"])
    return {"prompts": len(theirs), "same_answer": len(same_answer), "same_score": len(same_score),
            "different_answer": sorted(set(theirs) - set(same_answer)),
            "different_score": sorted(set(theirs) - set(same_score))}


def table(got: dict) -> str:
    cols = got["summary"]["columns"]
    lines = [f"| method | {' | '.join(cols)} | average | examples | prompt KV kept |", "|---" * (len(cols) + 4) + "|"]
    groups = [("torch + kvpress", got["summary"]["methods"])]
    if "lt_jax" in got:
        groups.append(("lt-jax", got["lt_jax"]["methods"]))
    for where, methods in groups:
        for m, cells in methods.items():
            values = [f"{cells[c]:.1f}" if c in cells else "-" for c in cols]
            kv = f"{cells['kv_fraction']:.3f}" if "kv_fraction" in cells else "-"
            lines.append(f"| {m} ({where}) | {' | '.join(values)} | {cells['average']:.1f} | {cells['examples']} | "
                         f"{kv} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("prompts", type=Path, help="a JSONL file written by scripts/export_ruler.py")
    p.add_argument("model", type=Path, help="the Hugging Face directory of the model the prompts were made for")
    p.add_argument("--out", type=Path, required=True, help="rows JSONL (resumable), with OUT.meta.json")
    p.add_argument("--methods", default="full,duo,simlayerkv", help=f"comma-separated among {', '.join(METHODS)}")
    p.add_argument("--lazy-fraction", type=float, default=0.5, help="share of layers (heads) that stream")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--essays", type=Path, default=Path(os.environ.get("LT_JAX_ASSETS", ".assets")) / "essays",
                   help="DuoAttention's head-scoring texts (*.txt; default $LT_JAX_ASSETS/essays)")
    p.add_argument("--compare", type=Path, default=None, help="lt-jax eval rows on the same prompts")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", action="store_true", help="summarize the rows OUT holds; run nothing")
    p.add_argument("--json", action="store_true", help="the summary as one JSON line on stdout")
    args = p.parse_args(argv)
    try:
        got = run(args)
    except BadInput as e:
        print(f"kvpress_peers: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(got))
    else:
        print(got["table"])
        if "agreement" in got:
            print(f"full, torch vs lt-jax: {got['agreement']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
