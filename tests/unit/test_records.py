"""Result files (`lt_jax.records`). `merge_parts` on files written directly (not through `open_part`, which never
writes a key twice): a result and parts sharing keys become one row per key, the first seen kept, in order, with the
parts deleted and no part's rows dropped (issue 27: a merge keeping duplicates passed the suite). Then a killed
run's half-written row, another run's settings, and the keys a part skips."""
import json

import pytest

from lt_jax.errors import LtJaxError
from lt_jax.records import Records, merge_parts, open_part, part_path

META = {"model": "tiny", "plan": "full"}


def key(row):
    return row["id"]


def write(path, rows, meta=META):
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"meta": meta}, *rows]))


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_merge_keeps_each_keys_first_row_and_every_parts_rows(tmp_path):
    out = tmp_path / "out.jsonl"
    write(out, [{"id": "a", "v": 0}, {"id": "b", "v": 0}])
    write(part_path(out, 0, 2), [{"id": "b", "v": 1}, {"id": "c", "v": 1}, {"id": "a", "v": 1}])
    write(part_path(out, 1, 2), [{"id": "c", "v": 2}, {"id": "e", "v": 2}, {"id": "d", "v": 2}])
    # a part from an earlier run with another process count: its rows count too
    write(part_path(out, 2, 3), [{"id": "d", "v": 3}, {"id": "f", "v": 3}])
    want = [{"id": "a", "v": 0}, {"id": "b", "v": 0}, {"id": "c", "v": 1}, {"id": "e", "v": 2}, {"id": "d", "v": 2},
            {"id": "f", "v": 3}]
    assert merge_parts(out, META, key) == want
    assert lines(out) == [{"meta": META}, *want]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # parts deleted, no temporary left


def test_merge_orders_rows_and_keeps_a_lone_parts_rows(tmp_path):
    out = tmp_path / "out.jsonl"  # no result yet: the rows are all in the parts, the last one included
    write(part_path(out, 0, 2), [{"id": "z", "v": 0}, {"id": "m", "v": 0}])
    write(part_path(out, 1, 2), [{"id": "m", "v": 1}, {"id": "b", "v": 1}])
    want = [{"id": "b", "v": 1}, {"id": "m", "v": 0}, {"id": "z", "v": 0}]
    assert merge_parts(out, META, key, order=key) == want
    assert lines(out) == [{"meta": META}, *want]
    assert not list(tmp_path.glob("out.jsonl.part-*"))
    assert merge_parts(out, META, key, order=key) == want  # merging again (nothing left in parts) changes nothing


def test_a_killed_runs_half_written_row_is_dropped_and_the_rest_kept(tmp_path):
    out = tmp_path / "out.jsonl"
    write(out, [{"id": "a", "v": 0}])
    with open(out, "a") as f:
        f.write('{"id": "b", "v"')  # what a SIGKILL mid-write leaves
    records = Records(out, META, key)
    assert records.rows == [{"id": "a", "v": 0}] and records.done == {"a"}
    assert out.read_text() == json.dumps({"meta": META}) + "\n" + json.dumps({"id": "a", "v": 0}) + "\n"
    records.add({"id": "b", "v": 1})
    assert lines(out)[1:] == [{"id": "a", "v": 0}, {"id": "b", "v": 1}]


def test_a_file_made_with_other_settings_is_refused_naming_what_differs(tmp_path):
    out = tmp_path / "out.jsonl"
    write(out, [{"id": "a"}], meta={"model": "tiny", "plan": "lighttransfer"})
    before = out.read_bytes()
    with pytest.raises(LtJaxError, match=r"other settings \(plan: the file has 'lighttransfer', this run 'full'\)"):
        Records(out, META, key)
    assert out.read_bytes() == before


def test_a_part_skips_keys_in_the_result_and_in_every_other_part(tmp_path):
    out = tmp_path / "out.jsonl"
    write(out, [{"id": "a"}])
    write(part_path(out, 1, 2), [{"id": "b"}])
    write(part_path(out, 0, 3), [{"id": "c"}])  # an earlier run with another process count
    mine = open_part(out, META, key, 0, 2)
    assert mine.path == part_path(out, 0, 2) and mine.done == {"a", "b", "c"}
