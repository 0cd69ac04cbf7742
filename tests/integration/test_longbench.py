"""LongBench v1 support: metrics against hand-computed values, prompts and lengths against the official config,
loading the published JSONL format with clear errors. Pure Python, no model."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from lt_jax.eval import longbench as lb
from lt_jax.errors import LtJaxError

DATA = Path(__file__).parents[1] / "data" / "longbench"


# ------------------------------------------------------------------------------------------------------- qa_f1

def test_qa_f1_by_hand():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]; common 2
    # precision 2/2 = 1, recall 2/3, F1 = 2 * 1 * 2/3 / (1 + 2/3) = (4/3) / (5/3) = 0.8
    assert lb.qa_f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert lb.qa_f1_score("Paris", "London") == 0.0  # no common token
    # lower case, punctuation and articles removed: both become [eiffel, tower]
    assert lb.qa_f1_score("The Eiffel Tower!", "eiffel tower") == 1.0
    # multiplicity: [cat, cat] vs [cat] share 1; precision 1/2, recall 1, F1 = 2 * 1/2 / (3/2) = 2/3
    assert lb.qa_f1_score("cat cat", "cat") == pytest.approx(2 / 3)
    assert lb.qa_f1_score("", "cat") == 0.0


def test_normalize_answer():
    assert lb.normalize_answer("  An apple, THE pear and a U.S. plum. ") == "apple pear and us plum"
    assert lb.normalize_zh_answer("北京， 天安门！") == "北京天安门"


# ------------------------------------------------------------------------------------------------------ rouge

def test_rouge_l_by_hand():
    # One sentence each. LCS of [the cat sat on the mat] and [the cat lay on the mat] is [the cat on the mat], but
    # the `rouge` package counts distinct words: the LCS has {the, cat, on, mat} = 4, the reference
    # {the, cat, lay, on, mat} = 5, the prediction {the, cat, sat, on, mat} = 5. R = P = 4/5,
    # F = 2 * (0.8 * 0.8) / (0.8 + 0.8 + 1e-8) = 0.8 - 5e-9 (a sentence-level ROUGE-L would give 5/6).
    assert lb.rouge_score("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(0.8, abs=1e-8)
    # Summary level: sentences split at '.'. Reference "a c" against the prediction's "a b" and "c d" unions
    # to {a, c}; reference "b d" adds {b, d}: overlap 4 of 4 distinct words each side, so F = 2/(2 + 1e-8).
    assert lb.rouge_score("a b. c d", "a c. b d") == pytest.approx(1.0, abs=1e-8)
    assert lb.rouge_score("x y", "z") == 0.0


def test_rouge_l_failures_score_zero():
    # The package raises on a text without any sentence; LongBench's bare except scores 0.
    assert lb.rouge_score("", "a summary") == 0.0
    assert lb.rouge_score("...", "a summary") == 0.0
    # Its recursive LCS traceback: "x a a a" vs "x" + M * "b" takes M + 4 steps, i.e. M + 5 calls, 9 frames deep
    # under eval.py: more than 1000 frames is a RecursionError, scored 0.
    ok, deep = "x " + "b " * 986, "x " + "b " * 987   # 991 and 992 calls
    assert lb.rouge_score(ok, "x a a a") == pytest.approx(0.5, abs=1e-8)  # overlap {x}: P = 1/2, R = 1/2
    assert lb.rouge_score(deep, "x a a a") == 0.0


def test_rouge_matches_the_rouge_package():
    rouge = pytest.importorskip("rouge")
    pairs = [("the cat sat on the mat", "the cat lay on the mat"), ("a b. c d", "a c. b d"),
             ("The report. It says  funds were spent. Spent twice", "Funds were spent. The report says so."),
             ("one two three two one", "three two one two"), (" . x", "x . . y")]
    for prediction, answer in pairs:
        expected = rouge.Rouge().get_scores([prediction], [answer], avg=True)["rouge-l"]["f"]
        assert lb.rouge_score(prediction, answer) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------- classification

def test_classification_by_hand():
    classes = ["Sports", "Sports news", "Finance"]
    # found: Sports, Sports news; "Sports" is part of the answer "Sports news" and dropped -> 1 of 1
    assert lb.classification_score("Type: Sports news", "Sports news", all_classes=classes) == 1.0
    # found: Sports only, dropped as part of the answer -> the answer is not found
    assert lb.classification_score("Sports", "Sports news", all_classes=classes) == 0.0
    # found: Sports (dropped), Sports news, Finance -> 1 of 2
    assert lb.classification_score("Sports news and Finance", "Sports news", all_classes=classes) == 0.5
    assert lb.classification_score("Finance", "Sports news", all_classes=classes) == 0.0


def test_classification_keeps_metrics_py_removal_while_iterating():
    # found [news, Sports, Sports news]; removing "news" shifts "Sports" under the loop's index, so it is never
    # checked and stays: 1 of 2 (0.5), where the intended rule gives 1.0. Kept to match LongBench's numbers.
    classes = ["news", "Sports", "Sports news"]
    assert lb.classification_score("Sports news", "Sports news", all_classes=classes) == 0.5


# ------------------------------------------------------------------------------------- retrieval, count, code

def test_retrieval_and_count_by_hand():
    assert lb.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    # numbers 3 and 12, one right -> 1/2
    assert lb.retrieval_score("The answer is Paragraph 3, not Paragraph 12", "Paragraph 3") == 0.5
    assert lb.retrieval_score("Paragraph 30", "Paragraph 3") == 0.0  # whole numbers compared
    assert lb.retrieval_score("I do not know", "Paragraph 3") == 0.0  # no number at all
    assert lb.retrieval_zh_score("答案是段落2", "段落2") == 1.0
    with pytest.raises(LtJaxError, match="names no paragraph"):
        lb.retrieval_score("Paragraph 3", "the third one")
    assert lb.count_score("There are 7 unique paragraphs", "7") == 1.0
    assert lb.count_score("7 or 8", "7") == 0.5
    assert lb.count_score("seven", "7") == 0.0


def test_code_sim_first_line_rule():
    # The first line containing none of '`', '#', '//' (anywhere) is compared: here "z = 2".
    # difflib: longest match " = " (3 chars), nothing left or right of it matches: 2 * 3 / (5 + 5) = 0.6
    assert lb.code_sim_score("y = 1  # set y\nz = 2", "y = 1") == pytest.approx(0.6)
    assert lb.code_sim_score("\n```python\nx = foo(1)\n```", "x = foo(1)") == 1.0  # fences skipped
    assert lb.code_sim_score("// note\nint y = 3;", "int y = 3;") == 1.0
    assert lb.code_sim_score("# only a comment", "x = 1") == 0.0  # no line left: "" vs the answer


def test_fuzz_ratio_by_hand():
    # difflib: longest block "ab", then "d" right of it: 3 matched chars, 2 * 3 / 8 = 0.75
    assert lb.fuzz_ratio("abcd", "abed") == 75
    # fuzzywuzzy's pure-Python path (what LongBench installs) differs from the edit-distance ratio: difflib takes
    # the longest block "aa" (a[0:2] = b[2:4]) and nothing is left beside it, 2 * 2 / 8 = 50, although the LCS
    # "aaa" would give 75.
    assert lb.fuzz_ratio("aaaa", "abaa") == 50
    assert lb.fuzz_ratio("", "") == 100 and lb.fuzz_ratio("", "x") == 0


def test_fuzz_ratio_matches_fuzzywuzzy():
    fuzz = pytest.importorskip("fuzzywuzzy.fuzz")
    if fuzz.SequenceMatcher.__module__ != "difflib":
        pytest.skip("fuzzywuzzy uses python-Levenshtein here, not LongBench's difflib path")
    for a, b in [("abcd", "abed"), ("aaaa", "abaa"), ("return a + b", "    return a+b"), ("", ""), ("x", "")]:
        assert lb.fuzz_ratio(a, b) == fuzz.ratio(a, b)


def test_fuzz_ratio_matches_rapidfuzz_where_difflib_finds_the_lcs():
    fuzz = pytest.importorskip("rapidfuzz.fuzz")
    for a, b in [("abcd", "abed"), ("z = 2", "y = 1"), ("return a + b", "return a - b"), ("kitten", "sitting")]:
        assert lb.fuzz_ratio(a, b) == round(fuzz.ratio(a, b))


# ----------------------------------------------------------------------------------------------------- Chinese

def test_zh_metrics_without_jieba_say_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)  # makes `import jieba` fail
    sample = {"answers": ["北京"], "all_classes": None}
    for name in ("multifieldqa_zh", "dureader", "vcsum"):
        with pytest.raises(LtJaxError, match=f"dataset {name} is scored with jieba.*pip install jieba"):
            lb.score(lb.DATASETS[name], "北京", sample)
    with pytest.raises(LtJaxError, match="pip install jieba"):
        lb.qa_f1_zh_score("北京", "北京")
    # the other Chinese datasets need no jieba
    assert lb.score(lb.DATASETS["passage_retrieval_zh"], "段落2", {"answers": ["段落2"]}) == 1.0
    assert lb.score(lb.DATASETS["lsht"], "体育", {"answers": ["体育"], "all_classes": ["体育", "财经"]}) == 1.0


def test_zh_metrics_by_hand():
    pytest.importorskip("jieba")
    # jieba: 我/爱/北京 and 我/爱/北京/天安门; common 3, precision 3/3, recall 3/4, F1 = 1.5 / 1.75 = 6/7
    assert lb.qa_f1_zh_score("我爱北京", "我爱北京天安门") == pytest.approx(6 / 7)
    # the same words for rouge: distinct LCS words 3, R = 3/4, P = 1, F = 1.5 / (1.75 + 1e-8)
    assert lb.rouge_zh_score("我爱北京", "我爱北京天安门") == pytest.approx(6 / 7, abs=1e-8)


# ------------------------------------------------------------------------------- datasets, prompts, truncation

def test_official_config_values():
    assert len(lb.DATASETS) == 21
    lengths = {"narrativeqa": 128, "hotpotqa": 32, "gov_report": 512, "trec": 64, "lcc": 64,
               "passage_retrieval_en": 32, "samsum": 128, "dureader": 128, "multifieldqa_en": 64}
    for name, n in lengths.items():
        assert lb.DATASETS[name].max_new_tokens == n
    no_chat = {name for name, ds in lb.DATASETS.items() if not ds.chat}
    assert no_chat == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    first_line = {name for name, ds in lb.DATASETS.items() if ds.first_line}
    assert first_line == {"trec", "triviaqa", "samsum", "lsht"}
    metrics = {"hotpotqa": "qa_f1", "multifieldqa_zh": "qa_f1_zh", "gov_report": "rouge", "vcsum": "rouge_zh",
               "trec": "classification", "lsht": "classification", "triviaqa": "qa_f1", "samsum": "rouge",
               "passage_count": "count", "passage_retrieval_en": "retrieval", "passage_retrieval_zh": "retrieval_zh",
               "lcc": "code_sim", "repobench-p": "code_sim"}
    for name, metric in metrics.items():
        assert lb.DATASETS[name].metric == metric
    for ds in lb.DATASETS.values():
        assert ds.metric in lb.METRICS and "{context}" in ds.prompt


def test_prompt_text():
    sample = {"context": "C {braces} stay", "input": "Q?"}
    assert lb.prompt_text(lb.DATASETS["trec"], sample) == (
        "Please determine the type of the question below. Here are some examples of questions.\n\nC {braces} stay\nQ?")
    assert lb.prompt_text(lb.DATASETS["lcc"], {"context": "def f():\n", "input": ""}) == (
        "Please complete the code given below. \ndef f():\nNext line of code:\n")
    hotpot = lb.prompt_text(lb.DATASETS["hotpotqa"], sample)
    assert hotpot.startswith("Answer the question based on the given passages.") and hotpot.endswith(
        "Question: Q?\nAnswer:")


def test_dataset_for_names_and_paths():
    assert lb.dataset_for("hotpotqa") is lb.DATASETS["hotpotqa"]
    assert lb.dataset_for("hotpotqa_e") is lb.DATASETS["hotpotqa"]
    assert lb.dataset_for("/data/LongBench/repobench-p_e.jsonl") is lb.DATASETS["repobench-p"]
    assert lb.dataset_for(DATA / "passage_retrieval_en.jsonl") is lb.DATASETS["passage_retrieval_en"]
    with pytest.raises(LtJaxError, match="squad.jsonl is not a LongBench dataset.*narrativeqa.*repobench-p"):
        lb.dataset_for("/data/squad.jsonl")


def test_truncate_middle():
    ids = list(range(10))
    assert lb.truncate_middle(ids, 6) == [0, 1, 2, 7, 8, 9]
    assert lb.truncate_middle(ids, 7) == [0, 1, 2, 7, 8, 9]  # half = int(7 / 2) = 3 on each side
    assert lb.truncate_middle(ids, 10) == ids and lb.truncate_middle(ids, 50) == ids
    with pytest.raises(LtJaxError, match="keep at least 2"):
        lb.truncate_middle(ids, 1)


# --------------------------------------------------------------------------------------------------- scoring

def test_score_first_line_and_best_answer():
    trec = lb.DATASETS["trec"]
    sample = {"answers": ["City"], "all_classes": ["City", "Country", "Individual"]}
    # only the first line after leading newlines counts: the next example's "Country" is cut off
    assert lb.score(trec, "\n\nCity\nQuestion: Where is Peru?\nType: Country", sample) == 1.0
    hotpot = lb.DATASETS["hotpotqa"]
    two = {"answers": ["Michelangelo", "Michelangelo Buonarroti"]}
    # not first-line: "Michelangelo\nBuonarroti" vs the second answer scores 1.0, the best of both
    assert lb.score(hotpot, "Michelangelo\nBuonarroti", two) == 1.0
    assert lb.score(hotpot, "Raphael", two) == 0.0


# ------------------------------------------------------------------------------------------------- load()

def test_load_fixtures():
    ds, records = lb.load(DATA / "hotpotqa.jsonl")
    assert ds.name == "hotpotqa" and len(records) == 3
    assert records[1]["answers"] == ["Michelangelo", "Michelangelo Buonarroti"]
    assert lb.score(ds, "Paris", records[0]) == 1.0
    ds, records = lb.load(DATA / "trec.jsonl")
    assert ds.name == "trec" and len(records) == 2 and "City" in records[0]["all_classes"]
    assert lb.score(ds, "City", records[0]) == 1.0
    assert lb.score(ds, "Number of something\nQuestion: x", records[1]) == 1.0
    ds, records = lb.load(DATA / "passage_retrieval_en.jsonl")
    assert [lb.score(ds, "Paragraph 2", r) for r in records] == [1.0, 0.0]
    ds, records = lb.load(DATA / "lcc.jsonl")
    assert not ds.chat and lb.score(ds, "    return a + b\n", records[0]) == 1.0
    assert lb.prompt_text(ds, records[0]).endswith('"""Sum of two numbers."""\nNext line of code:\n')


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"input": "q", "context": "c", "answers": ["a"], "all_classes": None, "length": 1, "_id": "x"})


def test_load_missing_file(tmp_path):
    with pytest.raises(LtJaxError, match=re.escape(f"{tmp_path / 'hotpotqa.jsonl'} does not exist")):
        lb.load(tmp_path / "hotpotqa.jsonl")


def test_load_malformed_line_names_file_and_line(tmp_path):
    path = _write(tmp_path, "hotpotqa.jsonl", [GOOD, "", '{"input": "q", "context": '])
    with pytest.raises(LtJaxError, match=re.escape(f"{path} line 3 is not valid JSON")):
        lb.load(path)


def test_load_missing_field_names_file_line_and_field(tmp_path):
    record = json.loads(GOOD)
    del record["answers"]
    path = _write(tmp_path, "hotpotqa.jsonl", [GOOD, "", json.dumps(record)])  # line 3: blank lines count
    with pytest.raises(LtJaxError, match=re.escape(f"{path} line 3: the record has no field 'answers'")):
        lb.load(path)
    path = _write(tmp_path, "trec.jsonl", [GOOD])  # trec needs its class names
    with pytest.raises(LtJaxError, match=re.escape(f"{path} line 1: the record has no field 'all_classes'")):
        lb.load(path)
    record = dict(json.loads(GOOD), answers="a")
    path = _write(tmp_path, "qasper.jsonl", [json.dumps(record)])
    with pytest.raises(LtJaxError, match="line 1: field 'answers' is not a non-empty list of strings"):
        lb.load(path)


def test_load_unknown_dataset_and_empty_file(tmp_path):
    path = _write(tmp_path, "squad.jsonl", [GOOD])
    with pytest.raises(LtJaxError, match="squad.jsonl is not a LongBench dataset; the known ones are narrativeqa"):
        lb.load(path)
    path = _write(tmp_path, "musique_e.jsonl", [""])
    with pytest.raises(LtJaxError, match="has no records"):
        lb.load(path)
