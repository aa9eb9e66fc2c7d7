"""Read a feed file (JSONL, CSV or Parquet) into plain row dicts, failing with an error that names
the file, the line and the problem for anything structurally malformed (bad JSON, wrong encoding,
missing columns, empty, too big). Row *content* is judged later by the expectation suite."""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import re
from collections.abc import Iterable, Iterator
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


_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
              (codecs.BOM_UTF16_BE, "UTF-16"))


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text of the file (one leading BOM dropped), or an error naming the encoding problem."""
    for bom, name in _WIDE_BOMS:
        if data.startswith(bom):
            raise FeedFormatError(path, f"file is {name} encoded (byte-order mark {bom.hex(' ').upper()}); "
                                        "feeds must be UTF-8 encoded", 1)
    nul = data.find(b"\x00")
    if nul >= 0:  # never valid in a JSONL or CSV feed; the usual cause is UTF-16 without a byte-order mark
        line = data.count(b"\n", 0, nul) + 1
        col = nul - (data.rfind(b"\n", 0, nul) + 1) + 1
        raise FeedFormatError(path, f"NUL byte at column {col} (UTF-16 without a byte-order mark?); feeds must "
                                    "be UTF-8 encoded text", line)
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
    raw U+2028, U+2029, U+0085 and other characters that ``str.splitlines`` would also break at. A BOM
    starting a line (files concatenated with their BOMs) is outside any value and is dropped."""
    return list(iter_jsonl_lines(text))


def iter_jsonl_lines(text: str) -> Iterator[str]:
    """:func:`jsonl_lines` one at a time, so a reader that stops early splits no further."""
    start, end = 0, len(text)
    while start < end:
        nl = text.find("\n", start)
        stop = end if nl < 0 else nl
        yield text[start:stop].removesuffix("\r").removeprefix("\ufeff")
        start = stop + 1


class _BadLine(Exception):
    """Raised from the JSON parser's hooks: a line that parses but must not be read as a row."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for k, _ in pairs:
        if k in seen:
            raise _BadLine(f"key {k!r} appears twice in one object (which value is meant?)")
        seen.add(k)
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise _BadLine(f"{name} is not JSON (write null, or the value as a string)")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate (``\\ud800``) in any string or key of a parsed value: not valid Unicode,
    it cannot be written back as UTF-8."""
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        return f"\\u{ord(m.group()):04x}" if m else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _lone_surrogate(k) if isinstance(k, str) else None
        if found or (found := _lone_surrogate(v)):
            return found
    return None


def parse_line(raw: str) -> Any:
    """One JSONL line as strict JSON: no NaN/Infinity, no repeated key, no lone surrogate, bounded
    nesting and number length. Raises ``ValueError`` with the reason."""
    try:
        obj = json.loads(raw, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except _BadLine as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # int() refuses a number of more than 4300 digits
        raise ValueError(f"invalid JSON: number too long ({exc})") from None
    found = _lone_surrogate(obj)
    if found:
        raise ValueError(f"invalid JSON: a string holds the lone surrogate {found} (not valid Unicode)")
    return obj


def _over_limit(path: Path, max_rows: int, line: int) -> FeedFormatError:
    return FeedFormatError(path, f"file holds more than {max_rows:,} rows, over the limit of {max_rows:,} "
                                 f"(feeds.max_rows); stopped reading at row {max_rows + 1:,}", line)


def read_jsonl_rows(path: str | Path, lines: Iterable[str], max_rows: int | None = None
                    ) -> tuple[list[dict], list[int]]:
    """Every line parsed; all bad lines are reported together, so a producer can fix them in one go.
    Reading stops at the first row past ``max_rows`` (a blank line is no row): an oversized feed is
    refused before the rest of it is parsed."""
    path = Path(path)
    rows, lines_read, bad = [], [], []
    n_rows = 0
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        n_rows += 1
        if max_rows is not None and n_rows > max_rows:
            raise _over_limit(path, max_rows, n)
        try:
            obj = parse_line(raw)
        except ValueError as exc:
            bad.append((n, str(exc)))
            continue
        if not isinstance(obj, dict):
            bad.append((n, f"expected a JSON object per line, got {_JSON_TYPES.get(type(obj), type(obj).__name__)}"))
            continue
        rows.append(obj)
        lines_read.append(n)
    if bad:
        raise FeedFormatError.from_lines(path, bad, "a JSONL feed holds one JSON object per line")
    return rows, lines_read


def _list_cell(value: str) -> Any:
    """CSV list cells hold a JSON array, or items separated by ' | '."""
    value = value.strip()
    if value.startswith("["):
        try:
            return parse_line(value)
        except ValueError:
            return value  # left as a string: the suite reports it as not a list
    return [v.strip() for v in value.split("|") if v.strip()]


def read_csv_rows(path: str | Path, lines: Iterable[str], max_rows: int | None = None
                  ) -> tuple[list[dict], list[int], list[str]]:
    """The header and every row of a CSV feed (``lines`` keep their line endings: a quoted cell may span
    lines). Like :func:`read_jsonl_rows`, reading stops at the first row past ``max_rows``."""
    path = Path(path)
    reader = csv.reader(lines)
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
        if max_rows is not None and len(rows) + len(bad) >= max_rows:
            raise _over_limit(path, max_rows, start)
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


def _read_parquet(path: Path, policy: FeedPolicy) -> tuple[list[dict], list[int], list[str]]:
    import pandas as pd
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        raise FeedFormatError(path, f"not a readable Parquet file: {exc}") from None
    # checked before decoding: a small compressed file can expand to far more than max_file_bytes
    decoded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if meta.num_rows > policy.max_rows:
        raise FeedFormatError(path, f"file holds {meta.num_rows:,} rows, over the limit of {policy.max_rows:,} "
                                    "(feeds.max_rows)")
    if decoded > policy.max_file_bytes:
        raise FeedFormatError(path, f"file decodes to {decoded:,} bytes, over the limit of "
                                    f"{policy.max_file_bytes:,} (feeds.max_file_bytes)")
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
        rows, lines = read_jsonl_rows(path, iter_jsonl_lines(_decode(path, data)), policy.max_rows)
        columns: list[str] = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
    elif fmt == "csv":
        rows, lines, columns = read_csv_rows(path, io.StringIO(_decode(path, data), newline=""), policy.max_rows)
    else:
        rows, lines, columns = _read_parquet(path, policy)
    if not rows:
        raise FeedFormatError(path, "file holds no rows")
    missing = [c for c in REQUIRED_FIELDS if c not in columns]
    if missing:
        raise FeedFormatError(path, f"missing required column(s) {missing}; a feed row needs {list(REQUIRED_FIELDS)}",
                              1 if fmt == "csv" else None)
    return RawFeed(path, fmt, sha256_bytes(data), size, rows, lines, columns)
