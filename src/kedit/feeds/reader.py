"""Read a feed file (JSONL, CSV or Parquet) into plain row dicts, failing with an error that names
the file, the line and the problem for anything structurally malformed (bad JSON, wrong encoding,
missing columns, empty, too big). Row *content* is judged later by the expectation suite."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedit.atomic import sha256_bytes
from kedit.feeds.schema import LIST_FIELDS, REQUIRED_FIELDS, FeedPolicy

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


MAX_LISTED_PROBLEMS = 100  # bad lines named in the message; ``FeedFormatError.problems`` holds all


class FeedFormatError(ValueError):
    """A feed file that cannot be read as a feed at all. ``str()`` reads ``file:line: problem``, one
    line per bad line of the file when there are several (``problems`` lists them all)."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None,
                 problems: list[tuple[int, str]] | None = None) -> None:
        self.path, self.line, self.problem = str(path), line, problem
        self.problems = problems or ([(line, problem)] if line is not None else [])
        if len(self.problems) > 1:
            shown = [f"{path}:{n}: {p}" for n, p in self.problems[:MAX_LISTED_PROBLEMS]]
            more = len(self.problems) - len(shown)
            text = f"{path}: {problem}\n" + "\n".join(shown) + (f"\n... and {more} more bad lines" if more else "")
        else:
            text = f"{path}:{line}: {problem}" if line is not None else f"{path}: {problem}"
        super().__init__(text)

    @classmethod
    def from_lines(cls, path: str | Path, problems: list[tuple[int, str]], what: str) -> FeedFormatError:
        """One error for every bad line of a file (the first one's line is ``line``)."""
        if len(problems) == 1:
            return cls(path, problems[0][1], problems[0][0])
        return cls(path, f"{len(problems)} bad lines ({what}); nothing is read from this file",
                   problems[0][0], problems)


@dataclass
class RawFeed:
    """Rows as read (values untouched), the 1-based line each came from, and the file's identity."""

    path: Path
    format: str
    sha256: str
    size_bytes: int
    rows: list[dict[str, Any]]
    lines: list[int]
    columns: list[str]


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise FeedFormatError(path, f"not valid UTF-8: byte 0x{data[exc.start]:02x} at column {col} "
                                    f"({exc.reason}); feeds must be UTF-8 encoded", line) from None
    return text.removeprefix("\ufeff")


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def jsonl_lines(text: str) -> list[str]:
    """Lines of a JSONL text. Split on ``\\n`` only (a trailing ``\\r`` is dropped): JSON strings may hold
    raw U+2028, U+2029, U+0085 and other characters that ``str.splitlines`` would also break at."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln.removesuffix("\r") for ln in lines]


def _read_jsonl(path: Path, text: str) -> tuple[list[dict], list[int]]:
    """Every line parsed; all bad lines are reported together, so a producer can fix them in one go."""
    rows, lines, bad = [], [], []
    for n, raw in enumerate(jsonl_lines(text), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            bad.append((n, f"invalid JSON: {exc.msg} (column {exc.colno})"))
            continue
        if not isinstance(obj, dict):
            bad.append((n, f"expected a JSON object per line, got {_JSON_TYPES.get(type(obj), type(obj).__name__)}"))
            continue
        rows.append(obj)
        lines.append(n)
    if bad:
        raise FeedFormatError.from_lines(path, bad, "a JSONL feed holds one JSON object per line")
    return rows, lines


def _list_cell(value: str) -> Any:
    """CSV list cells hold a JSON array, or items separated by ' | '."""
    value = value.strip()
    if value.startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # left as a string: the suite reports it as not a list
    return [v.strip() for v in value.split("|") if v.strip()]


def _read_csv(path: Path, text: str) -> tuple[list[dict], list[int], list[str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise FeedFormatError(path, "file is empty", 1) from None
    except csv.Error as exc:
        raise FeedFormatError(path, f"bad CSV header: {exc}", 1) from None
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise FeedFormatError(path, f"duplicate column(s) in header: {dup}", 1)
    rows, lines, bad = [], [], []
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            bad.append((start, f"bad CSV: {exc}"))
            continue
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            bad.append((start, f"expected {len(header)} fields, got {len(cells)}"))
            continue
        row: dict[str, Any] = {}
        for key, cell in zip(header, cells):
            row[key] = None if cell == "" else (_list_cell(cell) if key in LIST_FIELDS else cell)
        rows.append(row)
        lines.append(start)
    if bad:
        raise FeedFormatError.from_lines(path, bad, f"a CSV feed row has the header's {len(header)} fields")
    return rows, lines, header


def _plain(value: Any) -> Any:
    """Parquet/pandas values to JSON-like Python values (arrays -> lists, NaN -> None, times -> ISO)."""
    if value is None:
        return None
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "isoformat") and not isinstance(value, str):
        return value.isoformat()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _read_parquet(path: Path) -> tuple[list[dict], list[int], list[str]]:
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        raise FeedFormatError(path, f"not a readable Parquet file: {exc}") from None
    cols = [str(c) for c in df.columns]
    rows = [{c: _plain(v) for c, v in zip(cols, rec)} for rec in df.itertuples(index=False, name=None)]
    return rows, list(range(1, len(rows) + 1)), cols  # "line" = 1-based row number


def read_feed(path: str | Path, policy: FeedPolicy | None = None) -> RawFeed:
    """Read one feed file; raise :class:`FeedFormatError` (a ValueError) if it is not a readable feed."""
    policy = policy or FeedPolicy()
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise FeedFormatError(path, f"unknown feed format {path.suffix!r}; use one of {sorted(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"feed file not found: {path}")
    size = path.stat().st_size
    if size > policy.max_file_bytes:
        raise FeedFormatError(path, f"file is {size:,} bytes, over the limit of {policy.max_file_bytes:,} "
                                    "(feeds.max_file_bytes)")
    data = path.read_bytes()
    if not data.strip():
        raise FeedFormatError(path, "file is empty")
    if fmt == "jsonl":
        rows, lines = _read_jsonl(path, _decode(path, data))
        columns: list[str] = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
    elif fmt == "csv":
        rows, lines, columns = _read_csv(path, _decode(path, data))
    else:
        rows, lines, columns = _read_parquet(path)
    if not rows:
        raise FeedFormatError(path, "file holds no rows")
    missing = [c for c in REQUIRED_FIELDS if c not in columns]
    if missing:
        raise FeedFormatError(path, f"missing required column(s) {missing}; a feed row needs {list(REQUIRED_FIELDS)}",
                              1 if fmt == "csv" else None)
    return RawFeed(path, fmt, sha256_bytes(data), size, rows, lines, columns)
