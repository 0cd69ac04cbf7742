"""RULER's synthetic tasks (Hsieh et al. 2024, arXiv 2404.06654), generated offline from what lt-jax ships.

Follows github.com/NVIDIA/RULER at c3f5e3b (paths below are in that repository): the templates and answer prefixes
of `scripts/data/synthetic/constants.py`, each task's default parameters in `scripts/synthetic.yaml`, the
generators `scripts/data/synthetic/{niah,variable_tracking,common_words_extraction,freq_words_extraction}.py`, and
the scoring `string_match_all` of `scripts/eval/synthetic/constants.py` after `postprocess_pred` of
`scripts/eval/evaluate.py`. Eleven tasks: niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue,
niah_multiquery, vt, cwe, fwe. RULER's two QA tasks (qa_1: SQuAD, qa_2: HotpotQA) need those datasets, which are
not reachable offline: they are left out.

What differs from RULER, and why:
- Haystack and words: the essays lt-jax ships (`lt_jax.assets.essays`, Paul Graham's, as RULER's) instead of
  RULER's PaulGrahamEssays.json; word keys are pairs `word-word` and cwe's words are drawn from the essays'
  vocabulary instead of the `wonderwords` lists (not a dependency). Keys within one prompt are distinct (RULER
  draws from a list large enough that a clash is rare; ours is smaller, so a clash would make a prompt ambiguous).
- Sentences are split by a regular expression (after . ! ? and whitespace) instead of nltk's `sent_tokenize`
  (its punkt data needs the network).
- Randomness comes from one numpy generator per (seed, task, length, sample), so examples are reproducible and a
  subset of tasks gets the same examples as the whole suite. RULER reseeds a few shuffles with the
  run's fixed seed (`random.Random(args.random_seed).shuffle`); we draw those from the example's generator too.
- Fitting the length: the largest haystack (sentences, words) whose prompt, rendered as the model sees it (chat
  template where the model has one, then the answer prefix, as RULER's `prepare.py` appends it after the model
  template), plus the answer budget fits the length, searched per example from the previous example's size
  (RULER bisects once per task, then shrinks per example). With a chat template the few-shot examples of vt and
  cwe sit inside the user turn, before the task (RULER pastes them, template and all, into the prompt text).
- cwe draws its distinct words from the essays' vocabulary (~4,200 words with the shipped essays, enough for 32K
  tokens with Qwen2.5's tokenizer); a length they cannot fill is refused with a clear error.
"""
from __future__ import annotations

import collections
import dataclasses
import re
import string
import uuid
from typing import Callable

import numpy as np

# scripts/data/synthetic/constants.py, TASKS[...]['template' / 'answer_prefix' / 'tokens_to_generate']
NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                 "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                 "magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
                "above list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                "ignore the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

# scripts/data/synthetic/niah.py:83-89 (and variable_tracking.py:86)
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)  # niah.py:105, percent of the sentences


@dataclasses.dataclass(frozen=True)
class Niah:
    """niah.py's arguments (synthetic.yaml): haystack essay | noise | needle; key and value kinds words | numbers |
    uuids; keys, values per key, keys asked."""
    haystack: str
    key: str
    value: str
    keys: int = 1
    values: int = 1
    queries: int = 1
    tokens_to_generate: int = 128


@dataclasses.dataclass(frozen=True)
class VariableTracking:
    chains: int = 1
    hops: int = 4
    tokens_to_generate: int = 30


@dataclasses.dataclass(frozen=True)
class CommonWords:
    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10
    tokens_to_generate: int = 120


@dataclasses.dataclass(frozen=True)
class FrequentWords:
    alpha: float = 2.0
    coded_wordlen: int = 6
    tokens_to_generate: int = 50


# scripts/synthetic.yaml, in its order (the order also seeds each task's examples: keep it append-only)
TASKS = {
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("essay", "words", "numbers"),
    "niah_single_3": Niah("essay", "words", "uuids"),
    "niah_multikey_1": Niah("essay", "words", "numbers", keys=4),
    "niah_multikey_2": Niah("needle", "words", "numbers"),
    "niah_multikey_3": Niah("needle", "uuids", "uuids"),
    "niah_multivalue": Niah("essay", "words", "numbers", values=4),
    "niah_multiquery": Niah("essay", "words", "numbers", queries=4),
    "vt": VariableTracking(),
    "cwe": CommonWords(),
    "fwe": FrequentWords(),
}


@dataclasses.dataclass(frozen=True)
class Sources:
    """The essays as RULER uses them: `words`, the text split on whitespace (the haystack is its first n words,
    repeated if need be); `vocabulary`, its lowercase words of 4+ letters that occur twice or more (keys and cwe's
    words; once-only strings are mostly words glued by a missing space)."""
    words: tuple[str, ...]
    vocabulary: tuple[str, ...]

    @classmethod
    def from_texts(cls, texts: list[str]) -> "Sources":
        joined = " ".join(texts)
        seen = collections.Counter(re.findall(r"[a-z]+", joined.lower()))
        vocabulary = sorted(w for w, c in seen.items() if len(w) >= 4 and c >= 2)
        return cls(tuple(re.sub(r"\s+", " ", joined).strip().split(" ")), tuple(vocabulary))


@dataclasses.dataclass(frozen=True)
class Prompt:
    user: str                  # the task's text (the user turn under a chat template)
    prefix: str                # the answer's opening words, after the assistant's turn opens
    answers: list[str]         # every one must appear in the answer (string_match_all)
    needles: list[tuple[str, float]] = ()  # (inserted sentence, its depth in [0, 1]) of the niah/vt insertions


@dataclasses.dataclass(frozen=True)
class Sample:
    prompt: Prompt
    ids: list[int]
    max_new_tokens: int
    units: int                 # haystack size chosen: sentences (niah, vt) or words (cwe, fwe)


# `render(user, prefix) -> prompt ids` as the model sees them; `count(text) -> tokens` of plain text
Render = Callable[[str, str], list[int]]
Count = Callable[[str], int]


def model_renderer(model) -> tuple[Render, Count]:
    """How the prompt reaches `model`: its chat template around the task text, then the answer prefix (RULER's
    prepare.py:87, model template + answer prefix); a model without a chat template gets the plain text."""
    def tokens(text):
        return model.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count(text):
        return len(tokens(text))
    if getattr(model.tokenizer, "chat_template", None):
        return (lambda user, prefix: model.chat_ids(user) + tokens(prefix)), count
    return (lambda user, prefix: model.encode(user + prefix)), count


def generate(task: str, length: int, seed, render: Render, count: Count, sources: Sources,
             max_new_tokens: int | None = None, start: int | None = None) -> Sample:
    """One example of `task` whose prompt plus its answer budget (RULER's tokens_to_generate unless
    `max_new_tokens`) fits `length` tokens, with the largest haystack that does. `seed`: anything
    `np.random.default_rng` takes; the same seed (and `start`) gives the same example. `start`: where the search
    for the haystack's size begins (another sample's `units`: a few renders instead of ~25)."""
    spec = TASKS[task]
    new = spec.tokens_to_generate if max_new_tokens is None else max_new_tokens
    budget = length - new
    if isinstance(spec, Niah):
        def build(n, rng): return _niah(spec, n, rng, sources)
        lo, cap = 1, None
    elif isinstance(spec, VariableTracking):
        icl = _vt_example(spec, [*np.atleast_1d(seed), len(TASKS)], count)  # its own stream
        def build(n, rng): return _vt(spec, n, rng, icl)
        lo, cap = spec.chains * (spec.hops + 1), None
    elif isinstance(spec, CommonWords):
        def build(n, rng): return _cwe(spec, n, rng, sources.vocabulary, length)
        lo, cap = spec.num_cw + 1, len(sources.vocabulary)
    else:
        vocab = max(budget // 50, 5)  # freq_words_extraction.py:114 (at least the noise word and three answers)
        def build(n, rng): return _fwe(spec, n, rng, vocab)
        lo, cap = 32, None  # enough words that the fourth rank (the last answer) occurs

    def fits(n):
        prompt = build(n, np.random.default_rng(seed))
        ids = render(prompt.user, prompt.prefix)
        return (prompt, ids) if len(ids) <= budget else None

    n, found = _largest(fits, lo, cap, start)
    if found is None:
        raise ValueError(f"{task}: even the smallest haystack does not fit {length} tokens with {new} answer "
                         f"tokens; use a longer length.")
    if n == cap:
        raise ValueError(f"{task}: the essays' vocabulary ({cap} words) is too small to fill {length} tokens.")
    return Sample(*found, new, n)


def _largest(fits, lo: int, cap: int | None, start: int | None = None):
    """(largest n in [lo, cap] with fits(n) not None, that result), assuming fits is about monotone: gallop from
    `start` (default lo) up or down in doubling steps, then bisect; (lo, None) when lo does not fit. A good
    `start` (the previous sample's size) costs a few calls instead of ~2 log2(n)."""
    good = lo if start is None else max(lo, start if cap is None else min(start, cap))
    best, bad, step = fits(good), None, 1
    while best is None:  # down until something fits
        if good == lo:
            return lo, None
        bad, good = good, max(lo, good - step)
        best, step = fits(good), step * 2
    while bad is None and good != cap:  # up until something does not
        n = good + step if cap is None else min(good + step, cap)
        got = fits(n)
        if got is None:
            bad = n
        else:
            good, best, step = n, got, step * 2
    if bad is None:  # the cap fits
        return good, best
    while bad - good > 1:
        mid = (good + bad) // 2
        got = fits(mid)
        if got is None:
            bad = mid
        else:
            good, best = mid, got
    return good, best


# ---- the generators --------------------------------------------------------------------------------------

def _number(rng) -> str:
    return str(rng.integers(10**6, 10**7))  # niah.py:108, 7 digits


def _uuid(rng) -> str:
    return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))  # niah.py:118


def _drawer(kind: str, rng, vocabulary, taken: set):
    """niah.py:108-126; word keys are `word-word` pairs, distinct from every other key of the prompt."""
    def draw():
        while True:
            if kind == "numbers":
                x = _number(rng)
            elif kind == "uuids":
                x = _uuid(rng)
            else:
                a, b = rng.integers(0, len(vocabulary), 2)
                x = f"{vocabulary[a]}-{vocabulary[b]}"
            if x not in taken:
                taken.add(x)
                return x
    return draw


def _sentences(words) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(words).strip()) if s]


def _essay_words(sources: Sources, n: int):
    repeats = -(-n // len(sources.words))
    return (sources.words * repeats)[:n]


def _into_essay(sentences, inserts, rng) -> tuple[str, list[tuple[str, float]]]:
    """niah.py:150-167: each insert after int(len * depth / 100) sentences, depths drawn without replacement from
    DEPTHS, inserts in the order given by increasing depth."""
    depths = sorted(int(d) for d in rng.choice(DEPTHS, len(inserts), replace=False))
    cuts = [int(len(sentences) * d / 100) for d in depths]
    parts, start = [], 0
    for cut, sentence in zip(cuts, inserts):
        parts += [" ".join(sentences[start:cut]), sentence]
        start = cut
    parts.append(" ".join(sentences[start:]))
    return " ".join(parts), [(s, d / 100) for s, d in zip(inserts, depths)]


def _niah(spec: Niah, n: int, rng, sources: Sources) -> Prompt:
    keys = max(spec.keys, spec.queries)  # niah.py:77
    taken = set()
    key, value = _drawer(spec.key, rng, sources.vocabulary, taken), _drawer(spec.value, rng, sources.vocabulary,
                                                                           taken)
    names, values, needles = [], [], []
    for _ in range(keys):  # niah.py:130-143
        names.append(key())
        values.append([value() for _ in range(spec.values)])
        needles += [NEEDLE.format(type_needle_v=spec.value, key=names[-1], value=v) for v in values[-1]]
    needles = [needles[i] for i in rng.permutation(len(needles))]
    if spec.haystack == "essay":
        context, placed = _into_essay(_sentences(_essay_words(sources, n)), needles, rng)
    else:  # niah.py:169-184: one haystack line per sentence, needles at distinct line indices
        if spec.haystack == "noise":
            lines = [NOISE] * n
        else:
            lines = [NEEDLE.format(type_needle_v=spec.value, key=key(), value=value()) for _ in range(n)]
        at = sorted(rng.choice(n, len(needles), replace=False), reverse=True)
        for index, sentence in zip(at, needles):
            lines.insert(int(index), sentence)
        placed = [(s, int(i) / n) for i, s in zip(at, needles)]
        context = "\n".join(lines)
    asked = [int(i) for i in rng.choice(keys, spec.queries, replace=False)]  # niah.py:187-190
    answers = [v for i in asked for v in values[i]]
    query = ", ".join(names[i] for i in asked[:-1]) + ", and " + names[asked[-1]] if len(asked) > 1 \
        else names[asked[0]]
    template, prefix, kind = NIAH_TEMPLATE, NIAH_PREFIX, spec.value
    if spec.queries * spec.values == 1:  # niah.py:194-199: the singular
        template, prefix = (_singular(t) for t in (template, prefix))
        kind = kind[:-1]
    return Prompt(template.format(type_needle_v=kind, context=context, query=query),
                  prefix.format(type_needle_v=kind, query=query), answers, placed)


def _singular(text: str) -> str:
    for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(a, b)
    return text


def _chains(spec: VariableTracking, rng, letters: int, value: str | None = None):
    """variable_tracking.py:93-113: distinct upper-case names; `VAR A = 12345`, then `VAR B = VAR A ` per hop."""
    names = []
    while len(names) < spec.chains * (spec.hops + 1):
        name = "".join(rng.choice(list(string.ascii_uppercase), letters))
        if name not in names:
            names.append(name)
    out = []
    for c in range(spec.chains):
        these = names[c * (spec.hops + 1):(c + 1) * (spec.hops + 1)]
        v = value or str(rng.integers(10000, 99999))
        out.append((these, [f"VAR {these[0]} = {v}"] + [f"VAR {these[j + 1]} = VAR {these[j]} "
                                                        for j in range(spec.hops)]))
    return out


def _vt_text(spec: VariableTracking, n: int, rng, letters: int) -> Prompt:
    """variable_tracking.py:130-176, noise haystack: each chain's lines at sorted random line indices."""
    chains = _chains(spec, rng, letters)
    lines, placed = [NOISE] * n, []
    for _, chain in chains:
        at = sorted(int(i) for i in rng.choice(len(lines), len(chain), replace=False))
        for j, (index, line) in enumerate(zip(at, chain)):
            lines.insert(index + j, line)
        placed += [(line, (index + j) / len(lines)) for j, (index, line) in enumerate(zip(at, chain))]
    value = chains[0][1][0].split("=")[-1].strip()
    context = "\n".join(lines).replace(". \n", ".\n")
    return Prompt(VT_TEMPLATE.format(context=context, query=value),
                  VT_PREFIX.format(num_v=spec.hops + 1, query=value), chains[0][0], placed)


def _vt_example(spec: VariableTracking, seed, count: Count, tokens: int = 500) -> str:
    """The one-shot example (variable_tracking.py:303-307, randomize_icl at 179): 3-letter names, a random value,
    as many noise lines as fit 500 tokens of template + answer prefix + answer."""
    def fits(n):
        p = _vt_text(spec, n, np.random.default_rng(seed), 3)
        text = p.user + p.prefix + " " + " ".join(p.answers) + "\n"
        return text if count(text) <= tokens else None
    _, text = _largest(fits, spec.chains * (spec.hops + 1), None)
    if text is None:
        raise ValueError(f"vt: the one-shot example does not fit {tokens} tokens.")
    return text


def _vt(spec: VariableTracking, n: int, rng, icl: str) -> Prompt:
    p = _vt_text(spec, n, rng, 5)
    return dataclasses.replace(p, user=icl + "\n" + p.user)  # variable_tracking.py:262-265: example, then task


def _cwe_list(vocabulary, rng, words: int, common: int, uncommon: int, num_cw: int):
    """common_words_extraction.py:85-98: `words` distinct words, the first num_cw repeated `common` times, the
    others `uncommon` times, shuffled, numbered."""
    drawn = [vocabulary[i] for i in rng.choice(len(vocabulary), words, replace=False)]
    listed = drawn[:num_cw] * common + drawn[num_cw:] * uncommon
    listed = [listed[i] for i in rng.permutation(len(listed))]
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), drawn[:num_cw]


def _cwe(spec: CommonWords, n: int, rng, vocabulary, length: int) -> Prompt:
    """common_words_extraction.py:100-126: one solved example, then the task; below 4096 tokens smaller
    repeats."""
    short = length < 4096
    shot, shot_answer = _cwe_list(vocabulary, rng, *((20, 3, 1) if short else (40, 10, 3)), spec.num_cw)
    context, answer = _cwe_list(vocabulary, rng, n, *((6, 1) if short else (spec.freq_cw, spec.freq_ucw)),
                                spec.num_cw)
    example = (CWE_TEMPLATE.format(context=shot) + CWE_PREFIX + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot_answer)))
    return Prompt(example + "\n" + CWE_TEMPLATE.format(context=context), CWE_PREFIX, answer)


def _fwe(spec: FrequentWords, n: int, rng, vocab_size: int) -> Prompt:
    """freq_words_extraction.py:74-92: coded words with zeta(alpha) counts, the most frequent one '...' (noise),
    the next three the answer."""
    vocab = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choice(list(string.ascii_lowercase), spec.coded_wordlen)))
    vocab = sorted(vocab)
    vocab = [vocab[i] for i in rng.permutation(len(vocab))]
    vocab[0] = "..."
    ranks = np.arange(1, len(vocab) + 1)
    counts = (n * ranks ** -spec.alpha / _zeta(spec.alpha)).astype(int)
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    words = [words[i] for i in rng.permutation(len(words))]
    return Prompt(FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX, vocab[1:4])


def _zeta(alpha: float, terms: int = 100_000) -> float:
    """Riemann zeta (scipy.special.zeta in RULER): the partial sum plus its integral tail."""
    k = np.arange(1, terms + 1, dtype=np.float64)
    return float(np.sum(k ** -alpha) + terms ** (1 - alpha) / (alpha - 1))


# ---- scoring ---------------------------------------------------------------------------------------------

def postprocess(answer: str) -> str:
    """scripts/eval/evaluate.py:50-58: strip, control characters to newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", answer.strip()).strip()


def string_match_all(answer: str, references: list[str]) -> float:
    """One example's share of references found in the answer, case-insensitive (scripts/eval/synthetic/
    constants.py:28-30: RULER's score is the mean of this over examples, x 100)."""
    return sum(r.lower() in answer.lower() for r in references) / len(references)

