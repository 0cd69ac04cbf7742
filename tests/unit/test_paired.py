"""The summary's paired comparison (`evaluate.paired`): a method's average minus full's on the same examples, with
a 95 % bootstrap interval resampled within each column; checked against hand counts."""
import numpy as np
import pytest

from lt_jax.eval import evaluate


class Task:  # what `paired` reads of a task: a row's column
    percent = True

    @staticmethod
    def column(row):
        return row["cell"]


def rows(method, scores):
    return [{"method": method, "example": f"{cell}/{i}", "cell": cell, "score": s}
            for cell, values in scores.items() for i, s in enumerate(values)]


def test_the_interval_is_the_exact_bootstrap_quantiles_of_a_hand_case():
    """One column, differences (0, 0, 0, 1): a resampled mean is k/4 with k ~ Binomial(4, 1/4), so
    P(mean = 0) = 0.316 and P(mean <= 1/2) = 0.949 < 0.975 < P(mean <= 3/4) = 0.996: the interval is [0, 75]."""
    got = evaluate.paired(Task, rows("full", {"a": [1, 1, 0, 0]}) + rows("m", {"a": [1, 1, 0, 1]}), "m", "full")
    assert got == {"delta": 25.0, "ci95": [0.0, 75.0], "examples": 4}


def test_columns_keep_their_weights_and_only_shared_examples_count():
    """Two columns of unequal size: the delta is the mean of the per-column mean differences (the average's
    weights), not the mean over examples; an example only one method has is left out; equal differences in a
    column give a point interval."""
    full = rows("full", {"a": [0, 0], "b": [1, 1, 1, 1]})
    method = rows("m", {"a": [1, 1, 1], "b": [0, 0, 0, 0]})  # a/2: full has no row for it
    got = evaluate.paired(Task, full + method, "m", "full")
    assert got["delta"] == pytest.approx((100 + -100) / 2) and got["examples"] == 6
    assert got["ci95"] == pytest.approx([0.0, 0.0])
    assert evaluate.paired(Task, full, "m", "full") is None


def test_the_bootstrap_keeps_each_column_weight():
    """`bootstrap` (the interval of the average over columns, used by `paired` and scripts/ruler_tables.py): a
    column of one example and a column of nine constant examples average 50 on every draw; the hand case above as
    raw scores gives the same [0, 75]."""
    assert evaluate.bootstrap([[1.0], [0.0] * 9]) == pytest.approx([50.0, 50.0])
    assert evaluate.bootstrap([[0, 0, 0, 1]]) == [0.0, 75.0]


def test_the_summary_sets_every_method_beside_full_and_the_table_prints_it():
    full = rows("full", {"a": [1, 0, 1, 0, 1]})
    method = rows("m", {"a": [1, 1, 1, 0, 0]})
    task = type("T", (Task,), {"name": "ruler"})
    summary = evaluate.summarize(task, full + method, ["full", "m"])
    vs = summary["methods"]["m"]["vs_full"]
    assert vs["delta"] == pytest.approx(0.0) and vs["ci95"][0] < 0 < vs["ci95"][1]
    draws = np.random.default_rng(0).integers(0, 5, (10_000, 5))  # the same draws, spelled out
    want = 100 * np.percentile(np.asarray([0, 1, 0, 0, -1])[draws].mean(axis=1), [2.5, 97.5])
    assert vs["ci95"] == pytest.approx(want)
    assert "vs_full" not in summary["methods"]["full"]
    table = evaluate.markdown(task, summary).splitlines()
    assert table[0].endswith("| average | vs full (95 % CI) | examples |")
    assert table[3] == f"| m | 60.0 | 60.0 | +0.0 ({want[0]:+.1f} to {want[1]:+.1f}) | 5 |"


def test_the_ruler_tables_in_the_readmes_are_those_of_the_committed_rows():
    """README.md's, results/README.md's and results/sweep/README.md's RULER tables are what
    scripts/ruler_tables.py makes of the rows in results/: a rerun that grows a result and a table left as it was
    cannot both be committed."""
    import importlib.util
    from pathlib import Path
    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("ruler_tables", repo / "scripts" / "ruler_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    smol, qwen, sweep = tables.cells(tables.SMOLLM2), tables.cells(tables.QWEN), tables.cells(tables.SWEEP)
    readme, results = (repo / "README.md").read_text(), (repo / "results" / "README.md").read_text()
    swept = (repo / "results" / "sweep" / "README.md").read_text()
    for table, text in ((tables.readme_table(smol, qwen), readme), (tables.smollm2_table(smol), results),
                        *((tables.qwen_table(qwen, length), results) for length in ("4K", "8K", "16K")),
                        *((tables.sweep_table(sweep, column), swept) for column in tables.SWEEP)):
        assert table in text, table
