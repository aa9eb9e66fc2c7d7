"""Reading record files (edit requests, facts, CounterFact): a JSON list or JSONL, with errors that
name the file and line."""

from __future__ import annotations

import json
from pathlib import Path


def read_records(path: str | Path, what: str = "records") -> list[dict]:
    """A JSON list (``.json``) or one JSON object per line (``.jsonl``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{i}: invalid JSON ({exc.msg})") from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {what}, got {type(data).__name__}")
    return data
