"""numpy_gpt2.documents: JSON Lines in with file and line, JSON Lines and Parquet out.

References trusted here: Python's json module and pyarrow reading back what was written, and
line numbers and byte offsets counted by hand in the test files.
"""

import json
import math
import sys

import pytest

from numpy_gpt2.documents import line_offsets, read_records, write_rows
from numpy_gpt2.errors import GPT2Error

LINES = [b'{"a": 1}\n', b"\n", b"not json\n", b'"caf\xc3\xa9"\n', b"\xff\xfe{}\n", b"   \n", b'[1, 2]']


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(LINES))
    return path


def test_read_records_numbers_lines_and_reports_bad_ones(jsonl):
    records = list(read_records(jsonl))
    assert [r.where for r in records] == [f"{jsonl}:{n}" for n in (1, 3, 4, 5, 7)]  # blank lines 2, 6: no record
    assert [r.value for r in records] == [{"a": 1}, None, "café", None, [1, 2]]
    assert records[1].error == f"{jsonl}:3: not JSON: Expecting value at column 1"
    assert records[2].error is None
    assert records[3].error == f"{jsonl}:5: not UTF-8: byte 0xff at column 1"


def test_line_offsets_start_each_run_and_read_records_from_them(jsonl):
    n_lines, offsets = line_offsets(jsonl, 3)
    assert n_lines == 7
    assert offsets == [0, sum(map(len, LINES[:3])), sum(map(len, LINES[:6]))]
    for start, offset in zip((1, 4, 7), offsets):
        from_offset = list(read_records(jsonl, start, start + 3, offset))
        from_start = list(read_records(jsonl, start, start + 3))
        assert from_offset == from_start
    assert [r.where for r in read_records(jsonl, 4, 7)] == [f"{jsonl}:4", f"{jsonl}:5"]


COLUMNS = {"id": str, "n": int, "x": float, "error": str}
ROWS = [{"id": "é", "n": 3, "x": 0.25, "error": None}, {"id": 7, "n": None, "x": math.nan, "error": "bad"},
        {"id": "\ud800", "n": 1, "x": math.inf, "error": None}]


def test_write_rows_jsonl_is_ascii_json_with_null_for_nan(tmp_path):
    path = tmp_path / "out.jsonl"
    write_rows(ROWS, COLUMNS, path)
    data = path.read_bytes()
    data.decode("ascii")
    assert [json.loads(line) for line in data.decode().splitlines()] == [
        {"id": "é", "n": 3, "x": 0.25, "error": None}, {"id": 7, "n": None, "x": None, "error": "bad"},
        {"id": "\ud800", "n": 1, "x": None, "error": None}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_write_rows_parquet_types_and_nulls(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "out.parquet"
    write_rows(ROWS, COLUMNS, path, "parquet")
    table = pq.read_table(path)
    assert [str(t) for t in table.schema.types] == ["string", "int64", "double", "string"]
    assert table.to_pylist() == [{"id": "é", "n": 3, "x": 0.25, "error": None},
                                 {"id": "7", "n": None, "x": None, "error": "bad"},
                                 {"id": '"\\ud800"', "n": 1, "x": None, "error": None}]
    write_rows([], COLUMNS, path, "parquet")  # an empty partition still has its columns
    assert pq.read_table(path).schema.names == list(COLUMNS)


def test_write_rows_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(GPT2Error, match="pip install pyarrow"):
        write_rows(ROWS, COLUMNS, tmp_path / "out.parquet", "parquet")
    assert not list(tmp_path.iterdir())


def test_write_rows_unknown_format(tmp_path):
    with pytest.raises(GPT2Error, match="out_format must be one of jsonl, parquet, found 'csv'"):
        write_rows(ROWS, COLUMNS, tmp_path / "out.csv", "csv")
