"""Result files (`lt_jax.records`): rows only in OUT, the settings in OUT.meta.json. Every generic JSONL reader loads
a result; `merge_parts` on files written directly (not through `open_part`, which never writes a key twice): a result
and parts sharing keys become one row per key, the first seen kept, in order, with the parts deleted and no part's
rows dropped (issue 27: a merge keeping duplicates passed the suite). Then resume and refusal, a killed run's
half-written row, files of earlier versions (a first line {"meta": ...}), and a kill between the two writes."""
import json
from pathlib import Path

import pytest

from lt_jax import records
from lt_jax.errors import LtJaxError
from lt_jax.records import Records, merge_parts, open_part, part_path, read_rows

META = {"model": "tiny", "plan": "full"}
WHAT = "lt-jax eval"
REPO = Path(__file__).resolve().parents[2]


def key(row):
    return row["id"]


def write(path, rows, meta=META):
    """A result as this version writes it, spelled out: rows, and the sidecar."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    Path(f"{path}.meta.json").write_text(json.dumps({"written_by": WHAT, "settings": meta}))


def write_old(path, rows, meta=META):
    """A result as earlier versions wrote it: the settings as the first line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"meta": meta}, *rows]))


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def settings(path):
    return json.loads(Path(f"{path}.meta.json").read_text())


def test_a_result_loads_in_pandas_and_datasets_one_row_per_result(tmp_path, monkeypatch):
    pd = pytest.importorskip("pandas")
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "out.jsonl"
    result = Records(out, META, key)
    # as rows are: a field only some methods have (ratios), a null (a prompt given as ids has no text)
    rows = [{"id": f"e{i}", "method": m, "score": i / 4, "text": None if i == 1 else "12345", "lazy_layers": [1, 3],
             **({"ratios": [0.5, 0.25]} if m == "lighttransfer" else {})}
            for i in range(3) for m in ("full", "lighttransfer")]
    for row in rows:
        result.add(row)
    columns = ["id", "method", "score", "text", "lazy_layers", "ratios"]
    frame = pd.read_json(out, lines=True)
    assert len(frame) == 6 and list(frame.columns) == columns
    assert frame["score"].tolist() == [r["score"] for r in rows]
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ds = datasets.load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 6 and ds.column_names == columns
    assert [ds[i] for i in range(6)] == [{"ratios": None, **r} for r in rows]
    assert settings(out) == {"written_by": WHAT, "settings": META}


def test_every_committed_jsonl_is_rows_only_and_every_result_has_its_settings():
    pd = pytest.importorskip("pandas")
    committed = sorted((REPO / "results").rglob("*.jsonl"))
    results = [p for p in committed if Path(f"{p}.meta.json").exists()]
    assert len(results) >= 3  # niah, passkey, ppl at least
    for path in committed:
        assert len(pd.read_json(path, lines=True)) == len(path.read_text().splitlines()), path
        assert set(json.loads(path.read_text().splitlines()[0])) != {"meta"}, f"{path} starts with a settings line"
    # lt-jax eval's results, and what the peers' scripts write in the same rows + sidecar form (their prompts,
    # one row per example; their rows, one per example and method)
    writers = {WHAT, "scripts/export_ruler.py", "scripts/kvpress_peers.py"}
    for path in results:
        held = settings(path)
        assert held["written_by"] in writers, path
        assert len(read_rows(path, held["settings"], lambda r: (r["example"], r.get("method")),
                             held["written_by"])) == len(path.read_text().splitlines()), path


def test_merge_keeps_each_keys_first_row_and_every_parts_rows(tmp_path):
    out = tmp_path / "out.jsonl"
    write(out, [{"id": "a", "v": 0}, {"id": "b", "v": 0}])
    write(part_path(out, 0, 2), [{"id": "b", "v": 1}, {"id": "c", "v": 1}, {"id": "a", "v": 1}])
    write(part_path(out, 1, 2), [{"id": "c", "v": 2}, {"id": "e", "v": 2}, {"id": "d", "v": 2}])
    # a part from an earlier run with another process count, written by an earlier version: its rows count too
    write_old(part_path(out, 2, 3), [{"id": "d", "v": 3}, {"id": "f", "v": 3}])
    want = [{"id": "a", "v": 0}, {"id": "b", "v": 0}, {"id": "c", "v": 1}, {"id": "e", "v": 2}, {"id": "d", "v": 2},
            {"id": "f", "v": 3}]
    assert merge_parts(out, META, key) == want
    assert lines(out) == want and settings(out) == {"written_by": WHAT, "settings": META}
    # parts and their sidecars deleted, no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.meta.json"]


def test_merge_orders_rows_and_keeps_a_lone_parts_rows(tmp_path):
    out = tmp_path / "out.jsonl"  # no result yet: the rows are all in the parts, the last one included
    write(part_path(out, 0, 2), [{"id": "z", "v": 0}, {"id": "m", "v": 0}])
    write(part_path(out, 1, 2), [{"id": "m", "v": 1}, {"id": "b", "v": 1}])
    want = [{"id": "b", "v": 1}, {"id": "m", "v": 0}, {"id": "z", "v": 0}]
    assert merge_parts(out, META, key, order=key) == want
    assert lines(out) == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.meta.json"]
    assert merge_parts(out, META, key, order=key) == want  # merging again (nothing left in parts) changes nothing


def test_a_kill_in_the_merge_leaves_a_pair_the_next_merge_completes(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    write(part_path(out, 0, 2), [{"id": "a"}])
    write(part_path(out, 1, 2), [{"id": "b"}])
    real = records.write_atomic

    def killed_at_the_rows(path, text):
        if Path(path) == out:
            raise KeyboardInterrupt  # the sidecar is written, the rows are not
        return real(path, text)
    monkeypatch.setattr(records, "write_atomic", killed_at_the_rows)
    with pytest.raises(KeyboardInterrupt):
        merge_parts(out, META, key)
    assert not out.exists() and settings(out)["settings"] == META and len(records.part_paths(out)) == 2
    assert read_rows(out, META, key, WHAT) == []  # a sidecar without rows: a result with no row yet
    monkeypatch.undo()
    # then a kill while deleting the parts: a part's rows gone, its sidecar left; the rows are in the result
    assert merge_parts(out, META, key) == [{"id": "a"}, {"id": "b"}]
    write(part_path(out, 0, 2), [])
    part_path(out, 0, 2).unlink()
    assert records.part_paths(out) == [part_path(out, 0, 2)]
    assert merge_parts(out, META, key) == [{"id": "a"}, {"id": "b"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.meta.json"]
    with pytest.raises(LtJaxError, match="other settings"):  # the kept sidecar still refuses other settings
        merge_parts(out, {"model": "tiny", "plan": "streaming"}, key)


def test_a_rerun_continues_with_the_same_settings_and_refuses_others_naming_what_differs(tmp_path):
    out = tmp_path / "out.jsonl"
    Records(out, META, key).add({"id": "a", "v": 0})
    again = Records(out, META, key)
    assert again.rows == [{"id": "a", "v": 0}] and again.done == {"a"}
    again.add({"id": "b", "v": 1})
    assert lines(out) == [{"id": "a", "v": 0}, {"id": "b", "v": 1}]
    before = out.read_bytes(), Path(f"{out}.meta.json").read_bytes()
    with pytest.raises(LtJaxError, match=r"other settings \(plan: the file has 'full', this run 'lighttransfer'\); "
                                         r"give another output file or delete it and out.jsonl.meta.json\.$"):
        Records(out, {"model": "tiny", "plan": "lighttransfer"}, key)
    assert (out.read_bytes(), Path(f"{out}.meta.json").read_bytes()) == before


def test_a_killed_runs_half_written_row_is_dropped_and_the_rest_kept(tmp_path):
    out = tmp_path / "out.jsonl"
    write(out, [{"id": "a", "v": 0}])
    with open(out, "a") as f:
        f.write('{"id": "b", "v"')  # what a SIGKILL mid-write leaves
    assert read_rows(out, META, key, WHAT) == [{"id": "a", "v": 0}] and "v" in out.read_text()[-3:]  # a reader: as is
    result = Records(out, META, key)
    assert result.rows == [{"id": "a", "v": 0}] and result.done == {"a"}
    assert out.read_text() == json.dumps({"id": "a", "v": 0}) + "\n"
    result.add({"id": "b", "v": 1})
    assert lines(out) == [{"id": "a", "v": 0}, {"id": "b", "v": 1}]


def test_settings_without_rows_are_a_result_with_no_row_yet(tmp_path):
    out = tmp_path / "out.jsonl"  # a run killed after its sidecar, before its first row
    write(out, [])
    out.unlink()
    with pytest.raises(LtJaxError, match="other settings"):
        Records(out, {"model": "other", "plan": "full"}, key)
    assert Records(out, META, key).rows == [] and out.read_text() == ""


def test_an_earlier_versions_file_is_read_as_it_is_and_converted_when_resumed(tmp_path):
    out = tmp_path / "out.jsonl"
    write_old(out, [{"id": "a"}, {"id": "b"}])
    with open(out, "a") as f:
        f.write('{"id": "c"')
    before = out.read_bytes()
    assert read_rows(out, META, key, WHAT) == [{"id": "a"}, {"id": "b"}] and out.read_bytes() == before
    with pytest.raises(LtJaxError, match=r"other settings \(model: the file has 'tiny', this run 'big'\)"):
        Records(out, {"model": "big", "plan": "full"}, key)
    assert out.read_bytes() == before and not Path(f"{out}.meta.json").exists()
    result = Records(out, META, key)
    assert result.done == {"a", "b"} and lines(out) == [{"id": "a"}, {"id": "b"}]
    assert settings(out) == {"written_by": WHAT, "settings": META}
    result.add({"id": "c"})
    assert lines(out) == [{"id": "a"}, {"id": "b"}, {"id": "c"}]


def test_a_kill_inside_the_conversion_leaves_a_file_the_next_run_converts(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    write_old(out, [{"id": "a"}])
    real = records.write_atomic

    def killed_at_the_rows(path, text):
        if Path(path) == out:
            raise KeyboardInterrupt
        return real(path, text)
    monkeypatch.setattr(records, "write_atomic", killed_at_the_rows)
    with pytest.raises(KeyboardInterrupt):
        Records(out, META, key)
    monkeypatch.undo()
    assert settings(out)["settings"] == META and lines(out)[0] == {"meta": META}  # the sidecar and the old line
    assert read_rows(out, META, key, WHAT) == [{"id": "a"}]
    with pytest.raises(LtJaxError, match="other settings"):
        Records(out, {"model": "tiny", "plan": "streaming"}, key)
    assert Records(out, META, key).rows == [{"id": "a"}] and lines(out) == [{"id": "a"}]
    # a settings line that disagrees with the sidecar is no state of ours: refused
    write_old(out, [{"id": "a"}], meta={"model": "tiny", "plan": "streaming"})
    with pytest.raises(LtJaxError, match="begins with a settings line other than .*out.jsonl.meta.json"):
        Records(out, META, key)


def test_rows_without_settings_and_a_foreign_sidecar_are_refused_naming_the_file(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\n')
    message = (f"{out} is not a results file of lt-jax eval: it has no settings file out.jsonl.meta.json next to "
               f"it and no settings line; give another output file.")
    with pytest.raises(LtJaxError) as e:
        Records(out, META, key)
    assert str(e.value) == message and out.read_text() == '{"id": "a"}\n'
    out.write_text('{"id": "a"')  # not even one whole line
    with pytest.raises(LtJaxError, match="it has no settings file"):
        Records(out, META, key)
    assert out.read_text() == '{"id": "a"' and not Path(f"{out}.meta.json").exists()
    out.write_text('{"id": "a"}\n')
    with pytest.raises(LtJaxError, match=f"--out {out} exists and is not a results file of lt-jax eval"):
        records.output(out, "--out", WHAT, key)  # the guard, before any work
    out.unlink()
    Path(f"{out}.meta.json").write_text(json.dumps({"written_by": "lt-jax generate", "settings": META}))
    with pytest.raises(LtJaxError, match=r"--out .*out.jsonl.meta.json exists and is not the settings of a results "
                                         r"file of lt-jax eval"):
        records.output(out, "--out", WHAT, key)
    with pytest.raises(LtJaxError, match=r"out.jsonl.meta.json is not the settings of a results file of lt-jax eval"):
        read_rows(out, META, key, WHAT)
    Path(f"{out}.meta.json").unlink()
    Path(f"{out}.meta.json").mkdir()  # a folder where the sidecar goes
    with pytest.raises(LtJaxError, match=r"cannot write --out .*out.jsonl.meta.json: it is a folder"):
        records.output(out, "--out", WHAT, key)
    assert records.output(tmp_path / "new.jsonl", "--out", WHAT, key) == tmp_path / "new.jsonl"


def test_a_part_skips_keys_in_the_result_and_in_every_other_part(tmp_path):
    out = tmp_path / "out.jsonl"
    write(out, [{"id": "a"}])
    write(part_path(out, 1, 2), [{"id": "b"}])
    write(part_path(out, 0, 3), [{"id": "c"}])  # an earlier run with another process count
    mine = open_part(out, META, key, 0, 2)
    assert mine.path == part_path(out, 0, 2) and mine.done == {"a", "b", "c"}
    assert settings(mine.path) == {"written_by": WHAT, "settings": META}  # each part has its own sidecar
    assert records.part_paths(out) == [part_path(out, 0, 2), part_path(out, 0, 3), part_path(out, 1, 2)]


def test_grow_gives_a_result_the_settings_that_extend_its_own_and_nothing_else(tmp_path, capsys):
    """`grow`: a result made with fewer samples takes the settings of a run with more (its rows kept, the sidecar
    rewritten); settings that do not extend it, a result still in parts, or no result are left as they are."""
    from lt_jax.eval.evaluate import more_samples
    out = tmp_path / "r.jsonl"
    small = {"task": "ruler", "settings": {"samples": 2, "seed": 0}}
    rows = [{"id": 1}, {"id": 2}]
    write(out, rows, small)
    for other in ({"task": "ruler", "settings": {"samples": 3, "seed": 1}},  # another draw
                  {"task": "ruler", "settings": {"samples": 1, "seed": 0}},  # fewer
                  {"task": "niah", "settings": {"samples": 3, "seed": 0}}):  # another task
        assert not records.grow(out, other, WHAT, more_samples)
        assert settings(out)["settings"] == small
        with pytest.raises(LtJaxError, match="other settings"):
            read_rows(out, other, key, WHAT)
    assert not records.grow(tmp_path / "none.jsonl", small, WHAT, more_samples)
    big = {"task": "ruler", "settings": {"samples": 5, "seed": 0}}
    part = part_path(out, 0, 2)
    write(part, [{"id": 3}], small)
    assert not records.grow(out, big, WHAT, more_samples)  # parts are merged under their own settings first
    part.unlink(), Path(f"{part}.meta.json").unlink()
    capsys.readouterr()
    assert records.grow(out, big, WHAT, more_samples)
    assert "growing its 2 rows" in capsys.readouterr().err
    assert settings(out) == {"written_by": WHAT, "settings": big} and lines(out) == rows
    assert read_rows(out, big, key, WHAT) == rows and not records.grow(out, big, WHAT, more_samples)
