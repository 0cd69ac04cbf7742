"""LongBench (v1): the 21 datasets' prompts, generation lengths and metrics, for its published JSONL files.

The templates and generation lengths are LongBench v1's config/dataset2prompt.json and config/dataset2maxlen.json;
the metrics, the dataset -> metric map and the scoring rules come from its metrics.py, eval.py and pred.py. The
metrics are reproduced here without LongBench's dependencies (the `rouge` and `fuzzywuzzy` packages), so that a
score equals what the official eval.py computes for the same prediction (eval.py prints it x100). Only the two
Chinese metrics that segment words (qa_f1_zh, rouge_zh) need jieba, imported when they are used.
"""
from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lt_jax.errors import LtJaxError
from lt_jax.files import read_jsonl, read_text


@dataclass(frozen=True)
class Dataset:
    name: str            # e.g. "hotpotqa"
    prompt: str          # the official template with {context} and {input}
    max_new_tokens: int  # dataset2maxlen
    metric: str          # a key of METRICS
    chat: bool           # whether pred.py applies the chat template
    first_line: bool     # eval.py keeps only the prediction's first line


# name: (metric, max_new_tokens, template). narrativeqa's "asconcisely" is in the official template (and in every
# published LongBench number): kept as it is.
_TABLE = {
    "narrativeqa": ("qa_f1", 128, "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"),
    "qasper": ("qa_f1", 128, "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"),
    "multifieldqa_en": ("qa_f1", 64, "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"),
    "multifieldqa_zh": ("qa_f1_zh", 64, "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答："),
    "hotpotqa": ("qa_f1", 32, "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"),
    "2wikimqa": ("qa_f1", 32, "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"),
    "musique": ("qa_f1", 32, "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"),
    "dureader": ("rouge_zh", 128, "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答："),
    "gov_report": ("rouge", 512, "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"),
    "qmsum": ("rouge", 512, "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"),
    "multi_news": ("rouge", 512, "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"),
    "vcsum": ("rouge_zh", 512, "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结："),
    "trec": ("classification", 64, "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}"),
    "triviaqa": ("qa_f1", 32, "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}"),
    "samsum": ("rouge", 128, "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}"),
    "lsht": ("classification", 64, "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}"),
    "passage_count": ("count", 32, "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: "),
    "passage_retrieval_en": ("retrieval", 32, "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: "),
    "passage_retrieval_zh": ("retrieval_zh", 32, "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是："),
    "lcc": ("code_sim", 64, "Please complete the code given below. \n{context}Next line of code:\n"),
    "repobench-p": ("code_sim", 64, "Please complete the code given below. \n{context}{input}Next line of code:\n"),
}
# pred.py: "chat models are better off without build prompts on these tasks" (few-shot and code completion).
_NO_CHAT = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
# eval.py: on the few-shot tasks a model tends to continue with the next example; only the first line counts.
_FIRST_LINE = {"trec", "triviaqa", "samsum", "lsht"}

DATASETS: dict[str, Dataset] = {
    name: Dataset(name, prompt, max_new, metric, name not in _NO_CHAT, name in _FIRST_LINE)
    for name, (metric, max_new, prompt) in _TABLE.items()
}


def dataset_for(path_or_name) -> Dataset:
    """The dataset of a name ("hotpotqa"), a LongBench-E name ("hotpotqa_e") or a file (.../hotpotqa_e.jsonl)."""
    name = Path(str(path_or_name)).name
    name = name.removesuffix(".jsonl")
    base = name.removesuffix("_e")  # LongBench-E: same prompts and metrics, other samples
    if base not in DATASETS:
        raise LtJaxError(f"{path_or_name} is not a LongBench dataset; the known ones are {', '.join(DATASETS)} "
                         f"(and their LongBench-E names with '_e').")
    return DATASETS[base]


# ----------------------------------------------------------------------------------------------------- data files

def load(path) -> tuple[Dataset, list[dict]]:
    """The dataset a LongBench JSONL file belongs to (from its name) and its records, each checked."""
    path = Path(path)
    if not path.is_file():
        raise LtJaxError(f"LongBench file {path} does not exist.")
    ds = dataset_for(path)
    records = read_jsonl(path)  # names file and line of a malformed line
    if not records:
        raise LtJaxError(f"LongBench file {path} has no records.")
    for index, record in enumerate(records):
        problem = _record_problem(record, ds)
        if problem:
            # read_jsonl skips blank lines: find the line number only when it is needed
            lines = [n for n, line in enumerate(read_text(path).splitlines(), 1) if line.strip()]
            raise LtJaxError(f"{path} line {lines[index]}: {problem}.")
    return ds, records


def _is_strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _record_problem(record: dict, ds: Dataset) -> str | None:
    for field in ("context", "input"):
        if field not in record:
            return f"the record has no field {field!r}"
        if not isinstance(record[field], str):
            return f"field {field!r} is not a string"
    if "answers" not in record:
        return "the record has no field 'answers'"
    if not _is_strings(record["answers"]) or not record["answers"]:
        return "field 'answers' is not a non-empty list of strings"
    classes = record.get("all_classes")
    if ds.metric == "classification" and classes is None:
        return f"the record has no field 'all_classes', which {ds.name} is scored with"
    if classes is not None and not _is_strings(classes):
        return "field 'all_classes' is neither null nor a list of strings"
    if "length" in record and not isinstance(record["length"], int):
        return "field 'length' is not an integer"
    return None


def prompt_text(ds: Dataset, sample: dict) -> str:
    """The official prompt of a sample (before any chat template)."""
    return ds.prompt.format(context=sample["context"], input=sample["input"])


def truncate_middle(ids, max_tokens: int) -> list[int]:
    """pred.py's truncation of a prompt longer than the model's window: keep both ends (the instructions and the
    question), drop the middle. pred.py then decodes both halves and re-tokenizes the text; this keeps the ids."""
    ids = list(ids)
    if len(ids) <= max_tokens:
        return ids
    if max_tokens < 2:  # pred.py would keep everything here (ids[-0:] is the whole list)
        raise LtJaxError(f"cannot truncate a prompt of {len(ids)} tokens to {max_tokens}: keep at least 2.")
    half = int(max_tokens / 2)
    return ids[:half] + ids[-half:]


def score(ds: Dataset, prediction: str, sample: dict) -> float:
    """eval.py's score of one prediction, in [0, 1]: the best over the sample's answers."""
    if ds.first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    if ds.metric in _JIEBA_METRICS and _jieba() is None:
        raise LtJaxError(f"dataset {ds.name} is scored with jieba's Chinese word segmentation: pip install jieba.")
    metric = METRICS[ds.metric]
    best = 0.0
    for answer in sample["answers"]:
        best = max(best, metric(prediction, answer, all_classes=sample.get("all_classes")))
    return float(best)


# -------------------------------------------------------------------------------------- metrics (as metrics.py)

def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (SQuAD's normalization)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_PUNCTUATION = set(string.punctuation)
_ZH_PUNCTUATION = _PUNCTUATION | set("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》"
                                      "「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")


def normalize_zh_answer(s: str) -> str:
    """Lower text and remove (Chinese and ASCII) punctuation and all whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _ZH_PUNCTUATION)
    return "".join(s.split())


def f1_score(prediction: list[str], ground_truth: list[str], **kwargs) -> float:
    """Token F1 with multiplicity (a token counts as often as it occurs in both)."""
    num_same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction)
    recall = num_same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    def tokens(text):
        return [t for t in (normalize_zh_answer(w) for w in _cut(text)) if t]
    return f1_score(tokens(prediction), tokens(ground_truth))


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """ROUGE-L F of the `rouge` package (1.0.1) as LongBench calls it: Rouge().get_scores([prediction],
    [ground_truth], avg=True)["rouge-l"]["f"], with any exception scored 0.

    What that package computes: texts are split into sentences at every '.', pieces of length 0 dropped, the
    whitespace of each collapsed to single spaces, and words are the pieces of split(" "). ROUGE-L is
    summary-level with *distinct* words (its default exclusive=True): for every (reference sentence, prediction
    sentence) pair one LCS is reconstructed by its traceback, and the overlap is the number of distinct words in
    the union of those LCSs; recall divides by the reference's distinct words, precision by the prediction's,
    F = 2PR / (P + R + 1e-8). It raises (so LongBench scores 0) when a text has no sentence ("" or only dots),
    and when the recursive traceback of one sentence pair goes deeper than Python's recursion limit.
    """
    return _rouge_l(prediction, ground_truth, frames_above=9)


def _rouge_l(prediction: str, ground_truth: str, frames_above: int) -> float:
    hyp, ref = _rouge_sentences(prediction), _rouge_sentences(ground_truth)
    if not hyp or not ref:
        return 0.0
    hyp_words = [s.split(" ") for s in hyp]
    ref_words = [s.split(" ") for s in ref]
    union = set()
    for r in ref_words:
        for h in hyp_words:
            words, calls = _rouge_lcs(r, h)
            if frames_above + calls > _RECURSION_LIMIT:
                return 0.0
            union.update(words)
    recall = len(union) / len({w for s in ref_words for w in s})
    precision = len(union) / len({w for s in hyp_words for w in s})
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def _rouge_sentences(text: str) -> list[str]:
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


# rouge's LCS traceback (_recon) calls itself once per step. Under `python eval.py` the first call is made 9
# frames deep (<module>, scorer, rouge_score, Rouge.get_scores, _get_avg_scores, the metric's lambda,
# rouge_l_summary_level, _union_lcs, _recon_lcs; rouge_zh_score adds one), so past Python's default limit of 1000
# frames it raises RecursionError, which LongBench's bare `except` scores 0. That happens to vcsum and dureader,
# whose Chinese texts have no '.' and so are one long sentence, and to long English predictions without a '.'.
_RECURSION_LIMIT = 1000


def _rouge_lcs(ref: list[str], hyp: list[str]) -> tuple[list[str], int]:
    """The LCS words that rouge's _recon_lcs picks (which one matters: words are counted distinct) and the number
    of recursive calls its traceback makes."""
    n, m = len(ref), len(hyp)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev, word = table[i], table[i - 1], ref[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if word == hyp[j - 1] else max(prev[j], row[j - 1])
    words, calls, i, j = [], 1, n, m
    while i > 0 and j > 0:
        calls += 1
        if ref[i - 1] == hyp[j - 1]:
            words.append(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words, calls


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _rouge_l(" ".join(_cut(prediction)), " ".join(_cut(ground_truth)), frames_above=10)


def classification_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """1/k if the answer's class is among the k class names found in the prediction, else 0. Found names that are
    part of the answer's name (e.g. "Sports" inside "Sports news") are dropped first."""
    em_match_list = [name for name in kwargs["all_classes"] if name in prediction]
    # Kept as in metrics.py, removing while iterating: the element after each removed one is not checked.
    for match_term in em_match_list:
        if match_term in ground_truth and match_term != ground_truth:
            em_match_list.remove(match_term)
    if ground_truth in em_match_list:
        return 1.0 / len(em_match_list)
    return 0.0


def _number_score(prediction: str, answer_id: str) -> float:
    """The fraction of the numbers in the prediction that equal the answer's."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(number == answer_id for number in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _number_score(prediction, str(ground_truth))


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _number_score(prediction, _paragraph_id("Paragraph ", ground_truth))


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _number_score(prediction, _paragraph_id("段落", ground_truth))


def _paragraph_id(prefix: str, ground_truth: str) -> str:
    """The N of the first "Paragraph N" ("段落N") in an answer."""
    match = re.search(re.escape(prefix) + r"(\d+)", ground_truth)
    if match is None:  # metrics.py would fail with an IndexError
        raise LtJaxError(f"the passage retrieval answer {ground_truth!r} names no paragraph ('{prefix}N').")
    return match.group(1)


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """fuzz.ratio/100 of the answer and the prediction's first line that contains no '`', '#' or '//' (anywhere in
    the line: markdown fences and comments are skipped), or "" if there is none."""
    lines = prediction.lstrip("\n").split("\n")
    first = next((line for line in lines if "`" not in line and "#" not in line and "//" not in line), "")
    return fuzz_ratio(first, ground_truth) / 100


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's fuzz.ratio as LongBench's requirements install it: fuzzywuzzy without python-Levenshtein, so
    its pure-Python path, round(100 * difflib.SequenceMatcher(None, a, b).ratio()). (With python-Levenshtein or
    rapidfuzz the ratio comes from the indel distance instead: equal on most short strings, not on all.)"""
    if a == b:  # fuzzywuzzy's decorators: equal strings (even two empty ones) first, then an empty one
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def _jieba():
    """The jieba module, or None where it is not installed."""
    try:
        import jieba
    except ImportError:
        return None
    return jieba


def _cut(text: str) -> list[str]:
    """jieba's word segmentation (accurate mode), as metrics.py uses it."""
    jieba = _jieba()
    if jieba is None:
        raise LtJaxError("the Chinese LongBench metrics (qa_f1_zh, rouge_zh) segment words with jieba: "
                         "pip install jieba.")
    return list(jieba.cut(text, cut_all=False))


_JIEBA_METRICS = {"qa_f1_zh", "rouge_zh"}
METRICS = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge": rouge_score,
    "rouge_zh": rouge_zh_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
}
