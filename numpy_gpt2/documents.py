"""Documents in, rows out: JSON Lines records read with their file and line number, and rows
written as JSON Lines or Parquet, atomically.

A JSON Lines file holds one JSON value per line; lines of only whitespace are no record. A
line that is not UTF-8 or not JSON is a record with an error instead of a value, so one bad
line costs only itself. Line numbers are 1-based, as editors and compilers count them.
"""

import dataclasses
import json
import math
import os

from .errors import GPT2Error
from .fileio import atomic_path, atomic_write_bytes

FORMATS = ("jsonl", "parquet")


@dataclasses.dataclass
class Record:
    """One line of a JSON Lines file: its place, and its value or what is wrong with it.

    where: "FILE:LINE"; value: the parsed JSON (None when error is set); error: "FILE:LINE:
    what is wrong", or None.
    """

    where: str
    value: object = None
    error: str | None = None


def line_offsets(path, every: int) -> tuple[int, list[int]]:
    """The lines of `path` -> (their number, the byte offsets of lines 1, 1 + every, 1 + 2 *
    every, ...): where each run of `every` lines starts. A last line without a newline counts."""
    offsets, lines, position = [], 0, 0
    with open(path, "rb") as f:
        for line in f:
            if lines % every == 0:
                offsets.append(position)
            lines += 1
            position += len(line)
    return lines, offsets


def read_records(path, start_line: int = 1, stop_line: int | None = None, offset: int = 0):
    """Yield a `Record` for each line start_line..stop_line - 1 of `path` (to the end when
    stop_line is None) that is not blank. offset: the byte offset of start_line, when known
    (`line_offsets`), so the lines before it are not read again."""
    with open(path, "rb") as f:
        if offset:
            f.seek(offset)
        else:
            for _ in range(start_line - 1):
                f.readline()
        number = start_line
        while stop_line is None or number < stop_line:
            line = f.readline()
            if not line:
                return
            if line.strip():
                yield _record(line, f"{path}:{number}")
            number += 1


def _record(line: bytes, where: str) -> Record:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Record(where, error=f"{where}: not UTF-8: byte 0x{line[exc.start]:02x} at column {exc.start + 1}")
    try:
        return Record(where, json.loads(text))
    except json.JSONDecodeError as exc:
        return Record(where, error=f"{where}: not JSON: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return Record(where, error=f"{where}: not JSON: nested too deeply")


def _finite(value):
    """A float that is not finite (nan, inf) -> None: JSON has no such number."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_rows(rows: list[dict], columns: dict, path, out_format: str = "jsonl") -> None:
    """rows -> `path`, atomically, as JSON Lines or Parquet.

    columns: each key of the rows -> its type, int, float or str, in the order to write them;
    a value may also be None. JSON Lines: one object a line, ASCII (other characters escaped),
    nan and inf as null. Parquet: int columns int64, float columns float64 (nan and inf null),
    str columns strings, where a value that is not a string (or cannot be UTF-8) is its JSON.
    """
    if out_format == "jsonl":
        text = "".join(json.dumps({key: _finite(row[key]) for key in columns}) + "\n" for row in rows)
        atomic_write_bytes(path, text.encode("ascii"))
    elif out_format == "parquet":
        pa, pq = _pyarrow()
        arrow_types = {int: pa.int64(), float: pa.float64(), str: pa.string()}
        table = pa.table({key: pa.array([_cell(row[key], kind) for row in rows], arrow_types[kind])
                          for key, kind in columns.items()})
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
    else:
        raise GPT2Error(f"out_format must be one of {', '.join(FORMATS)}, found {out_format!r}")


def _cell(value, kind):
    """A row's value as a Parquet column of `kind` holds it (see `write_rows`)."""
    if value is None or kind is int:
        return value
    if kind is float:
        return _finite(float(value))
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            pass
    return json.dumps(value)


def _pyarrow():
    """pyarrow and pyarrow.parquet, imported on first use: only Parquet output needs them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise GPT2Error("Parquet output needs pyarrow: pip install pyarrow (or write JSON Lines)") from None
    return pyarrow, pyarrow.parquet
