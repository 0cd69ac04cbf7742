"""RULER's synthetic tasks (`lt_jax.eval.ruler`) on a word-level stand-in tokenizer (one token per whitespace-split
word) and a made-up essay: each task's prompt has the structure and answer RULER specifies (counts of needles,
values, hops and words; every answer in the haystack; each insertion at its depth; the length bucket filled), and
the scorer agrees with RULER's definition on hand cases. No model, no assets."""
import collections
import itertools
import math
import re

import numpy as np
import pytest

from lt_jax.errors import LtJaxError
from lt_jax.eval import evaluate, ruler

LENGTH = 1500


def render(user, prefix):
    return (user + prefix).split()


def count(text):
    return len(text.split())


@pytest.fixture(scope="module")
def sources():
    """~1200 made-up words, each used in two sentences of 6-17 words: a vocabulary of its own, sentence ends."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ["".join(p) for p in itertools.islice(itertools.permutations(syllables, 2), 0, None, 4)][:1200]
    rng = np.random.default_rng(0)
    sentences, i = [], 0
    for _ in range(2):
        order = rng.permutation(len(words))
        while i < len(order):
            n = int(rng.integers(6, 18))
            sentences.append(" ".join(words[j] for j in order[i:i + n]).capitalize() + ".")
            i += n
        i = 0
    half = len(sentences) // 2
    return ruler.Sources.from_texts([" ".join(sentences[:half]), " ".join(sentences[half:])])


def generate(task, length=LENGTH, sample=0, sources=None, **kw):
    return ruler.generate(task, length, [0, list(ruler.TASKS).index(task), length, sample], render, count, sources,
                          **kw)


NIAH = [t for t, spec in ruler.TASKS.items() if isinstance(spec, ruler.Niah)]


def test_the_suite_is_rulers_synthetic_yaml():
    assert list(ruler.TASKS) == ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                                 "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt",
                                 "cwe", "fwe"]
    assert [(s.haystack, s.key, s.value, s.keys, s.values, s.queries) for s in map(ruler.TASKS.get, NIAH)] == [
        ("noise", "words", "numbers", 1, 1, 1), ("essay", "words", "numbers", 1, 1, 1),
        ("essay", "words", "uuids", 1, 1, 1), ("essay", "words", "numbers", 4, 1, 1),
        ("needle", "words", "numbers", 1, 1, 1), ("needle", "uuids", "uuids", 1, 1, 1),
        ("essay", "words", "numbers", 1, 4, 1), ("essay", "words", "numbers", 1, 1, 4)]


@pytest.mark.parametrize("task", list(ruler.TASKS))
@pytest.mark.parametrize("length", [LENGTH, 4096])
def test_every_prompt_fills_its_length_bucket(sources, task, length):
    sample = generate(task, length, sources=sources)
    total = len(sample.ids) + sample.max_new_tokens
    assert sample.max_new_tokens == ruler.TASKS[task].tokens_to_generate
    assert 0.97 * length <= total <= length, total
    assert sample.ids == render(sample.prompt.user, sample.prompt.prefix)


@pytest.mark.parametrize("task", NIAH)
def test_niah_needles_answers_and_depths(sources, task):
    spec = ruler.TASKS[task]
    p = generate(task, sources=sources).prompt
    kind = {"numbers": r"\d{7}", "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
            "words": r"[a-z]+-[a-z]+"}
    pattern = rf"One of the special magic {spec.value} for ({kind[spec.key]}) is: ({kind[spec.value]})\."
    needles = re.findall(pattern, p.user)
    keys = max(spec.keys, spec.queries)
    if spec.haystack == "needle":  # every haystack line is a distractor needle, keys all distinct
        assert len(needles) == p.user.count("\n") - 1 and len({k for k, _ in needles}) == len(needles)
    else:
        assert len(needles) == keys * spec.values and len({k for k, _ in needles}) == keys
    singular = spec.queries * spec.values == 1
    noun = spec.value[:-1] if singular else spec.value
    head = "A special magic {0} is hidden" if singular else "Some special magic {0} are hidden"
    assert p.user.startswith(head.format(noun))
    asked = re.search(rf"What (?:is|are all) the special magic {noun} for (.*) mentioned in the provided text\?$",
                      p.user).group(1)
    asked = asked.replace(", and ", ", ").split(", ") if spec.queries > 1 else [asked]
    assert len(set(asked)) == len(asked) == spec.queries and set(asked) <= {k for k, _ in needles}
    query = ", ".join(asked[:-1]) + ", and " + asked[-1] if len(asked) > 1 else asked[0]
    verb = "is" if singular else "are"
    assert p.prefix == f" The special magic {noun} for {query} mentioned in the provided text {verb}"
    want = [v for k in asked for kk, v in needles if kk == k]  # the asked keys' values
    assert sorted(p.answers) == sorted(want) and len(want) == spec.queries * spec.values
    assert all(p.user.count(a) == 1 for a in p.answers)
    # each inserted needle at its depth: lines before it (noise/needle) or haystack characters before it (essay)
    assert len(p.needles) == keys * spec.values
    context = p.user.split("\n", 1)[1].rsplit("\n", 1)[0]
    inserted = [s for s, _ in p.needles]
    for sentence, depth in p.needles:
        before = context[:context.index(sentence)]
        if spec.haystack == "essay":  # after int(sentences x percent / 100) haystack sentences, percent in DEPTHS
            bare = context
            for s in inserted:
                bare, before = bare.replace(s, ""), before.replace(s, "")
            percent = int(round(depth * 100))
            sentences = len(re.split(r"(?<=\.)\s+", bare.strip()))
            assert percent in ruler.DEPTHS and len(re.findall(r"\.\s", before)) == sentences * percent // 100
        else:
            lines = [line for line in before.split("\n")[:-1] if line not in inserted]
            total = [line for line in context.split("\n") if line not in inserted]
            assert len(lines) == round(depth * len(total))


def test_vt_chain_hops_and_one_shot_example(sources):
    p = generate("vt", sources=sources).prompt
    example, task = p.user.split("\nMemorize and track", 1)[0], p.user.rsplit("Memorize and track", 1)[1]
    value = re.search(r"assigned the value (\d{5}) in the text above\.$", task).group(1)
    names = p.answers
    assert len(names) == 5 and len(set(names)) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    chain = re.findall(r"^VAR ([A-Z]+) = (VAR [A-Z]+|\d+) ?$", task, re.M)
    assert chain == [(names[0], value)] + [(names[j + 1], f"VAR {names[j]}") for j in range(4)]  # in text order
    assert p.prefix == (f" Answer: According to the chain(s) of variable assignment in the text above, 5 variables "
                        f"are assigned the value {value}, they are: ")
    assert task.count(ruler.NOISE) > 10 and ". \n" not in task
    shot = re.findall(r"^VAR ([A-Z]+) = (VAR [A-Z]+|\d+) ?$", example, re.M)
    assert len(shot) == 5 and all(len(n) == 3 for n, _ in shot)  # RULER's example: 3-letter names
    assert example.endswith("they are:  " + " ".join(n for n, _ in shot) + "\n")  # RULER's double space
    assert count(example) <= 500
    assert [d for _, d in p.needles] == sorted(d for _, d in p.needles)


@pytest.mark.parametrize("length, repeats", [(LENGTH, (6, 1)), (4096, (30, 3))])
def test_cwe_word_counts(sources, length, repeats):
    p = generate("cwe", length, sources=sources).prompt
    shot, task = p.user.split("\n" + ruler.CWE_TEMPLATE[:30])
    listed = re.findall(r"\d+\. ([a-z]+)", task.split("\nQuestion")[0])
    counts = collections.Counter(listed)
    assert len(p.answers) == 10 and all(counts[w] == repeats[0] for w in p.answers)
    assert all(c == repeats[1] for w, c in counts.items() if w not in p.answers)
    assert [int(n) for n in re.findall(r"(\d+)\. ", task.split("\nQuestion")[0])] == list(range(1, len(listed) + 1))
    assert all(w in sources.vocabulary for w in counts)
    shot_answer = re.findall(r"\d+\. ([a-z]+)", shot.split(ruler.CWE_PREFIX)[1])  # the solved example
    shot_counts = collections.Counter(re.findall(r"\d+\. ([a-z]+)", shot.split("\nQuestion")[0]))
    assert len(shot_answer) == 10 and {shot_counts[w] for w in shot_answer} == {3 if length < 4096 else 10}
    assert set(shot_counts.values()) == {3 if length < 4096 else 10, 1 if length < 4096 else 3}
    assert p.prefix == ruler.CWE_PREFIX


def test_fwe_frequencies(sources):
    p = generate("fwe", sources=sources).prompt
    words = p.user.split("coded words. ", 1)[1].split("\nQuestion")[0].split()
    ranked = collections.Counter(words).most_common()
    assert ranked[0][0] == "..." and [w for w, _ in ranked[1:4]] == p.answers
    assert ranked[1][1] > ranked[2][1] > ranked[3][1] > ranked[4][1]  # a unique answer
    assert all(re.fullmatch(r"[a-z]{6}", w) for w, _ in ranked[1:])
    assert len(ranked) <= (LENGTH - 50) // 50


def test_examples_are_reproducible_and_differ_by_sample(sources):
    for task in ("niah_multikey_2", "vt", "cwe"):
        a, b, c = (generate(task, sources=sources, sample=s) for s in (0, 0, 1))
        assert a == b and a.prompt.answers != c.prompt.answers


def test_answer_budget_and_bad_lengths(sources):
    sample = generate("niah_single_2", sources=sources, max_new_tokens=4)
    assert sample.max_new_tokens == 4 and LENGTH - 30 <= len(sample.ids) + 4 <= LENGTH
    with pytest.raises(ValueError, match="vt: the one-shot example does not fit 500 tokens"):
        ruler.generate("vt", 600, 0, render, lambda text: 5 * count(text), sources)
    with pytest.raises(ValueError, match="niah_single_1: even the smallest haystack does not fit 100 tokens"):
        generate("niah_single_1", 100, sources=sources)
    with pytest.raises(ValueError, match=r"cwe: the essays' vocabulary \(\d+ words\) is too small"):
        generate("cwe", 20000, sources=sources)


def ruler_string_match_all(preds, refs):  # scripts/eval/synthetic/constants.py:28-30, verbatim
    score = sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref) for pred, ref in zip(preds, refs)]) / len(preds) * 100  # noqa: E501
    return round(score, 2)


def test_string_match_all_is_rulers():
    cases = [(" 1234567.", ["1234567"]), ("The numbers are 1, 2", ["1", "2", "3"]), ("none", ["x"]),
             ("ALPHA beta", ["alpha", "Beta", "gamma", "delta"]), ("\x00 answer\t7 \n", ["7"])]
    got = [ruler.string_match_all(ruler.postprocess(a), refs) for a, refs in cases]
    assert got == [1.0, 2 / 3, 0.0, 0.5, 1.0]
    assert round(100 * float(np.mean(got)), 2) == ruler_string_match_all([a for a, _ in cases],
                                                                          [r for _, r in cases])
    assert ruler.postprocess(" a\x01b\n") == "a\nb"


def test_zeta():
    assert math.isclose(ruler._zeta(2.0), math.pi ** 2 / 6, rel_tol=1e-9)


def test_ruler_task_refuses_bad_settings():
    with pytest.raises(LtJaxError, match="ruler tasks must be distinct names among niah_single_1, .*got qa_1"):
        evaluate.Ruler(["qa_1"], [4096], 1)
    with pytest.raises(LtJaxError, match="got vt,vt"):
        evaluate.Ruler(["vt", "vt"], [4096], 1)
    with pytest.raises(LtJaxError, match="--lengths >= 256"):
        evaluate.Ruler(["vt"], [128], 1)
    one, two = evaluate.Ruler(["vt"], [4096], 1), evaluate.Ruler(["vt"], [2048, 4096], 1)
    row = {"cell": {"task": "vt", "length": 4096}}
    assert one.column(row) == "vt" and two.column(row) == "vt@4096"


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_2", "vt", "cwe", "fwe"])
def test_a_search_started_elsewhere_finds_the_same_size(sources, task):
    """Where the token count grows with the haystack (as here), the gallop from another sample's size, above or
    below, lands on the same largest size as the search from the smallest; the renders it saves are counted."""
    calls = []
    def counting(user, prefix):
        calls.append(1)
        return render(user, prefix)
    seed = [0, list(ruler.TASKS).index(task), LENGTH, 1]
    cold = ruler.generate(task, LENGTH, seed, counting, count, sources)
    cold_calls, calls[:] = len(calls), []
    for start in (cold.units - 7, cold.units + 7, 3 * cold.units):
        warm = ruler.generate(task, LENGTH, seed, counting, count, sources, start=start)
        assert warm == cold, start
    assert len(calls) / 3 < cold_calls
