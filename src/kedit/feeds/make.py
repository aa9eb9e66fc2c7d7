"""``kedit feed make``: turn a CounterFact flat-format file into daily feed files (demos, benchmarks).

Flat CounterFact records hold the prompt with the subject filled in; the subject's first occurrence
becomes ``{}``. ``rephrase_prompt`` becomes a paraphrase and ``locality_prompt`` a neighbor.
Records whose prompt does not contain the subject, or holds braces, are skipped (and counted).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from kedit.atomic import write_text_atomic
from kedit.feeds.normalize import normalize_text


@dataclass
class MakeSummary:
    files: list[Path]
    rows: int
    skipped: int


def counterfact_row(rec: dict[str, Any], observed_at: str, source: str = "counterfact") -> dict[str, Any] | None:
    """One flat CounterFact record -> one feed row (None if its prompt cannot become a template)."""
    try:
        subject, prompt = rec["subject"], rec["prompt"]
        target_new = rec["target_new"]
    except KeyError as exc:
        raise ValueError(f"CounterFact record {rec.get('case_id', '?')}: missing field {exc.args[0]!r}") from None
    if subject not in prompt or "{" in prompt or "}" in prompt:
        return None
    row = {"id": f"cf-{rec.get('case_id')}", "subject": subject, "prompt": prompt.replace(subject, "{}", 1),
           "target_new": target_new, "target_true": rec.get("ground_truth"),
           # some CounterFact paraphrases carry a newline-separated prefix; feeds forbid control characters
           "paraphrases": [normalize_text(p) for p in [rec.get("rephrase_prompt")] if p and p.strip()],
           "neighbors": [normalize_text(p) for p in [rec.get("locality_prompt")] if p and p.strip()],
           "source": source, "observed_at": observed_at}
    return row


def make_feeds(counterfact: str | Path, out_dir: str | Path, *, days: int = 3, per_day: int = 50,
               start: date | None = None, seed: int | None = None, overwrite: bool = False) -> MakeSummary:
    """Write ``days`` files ``out_dir/YYYY-MM-DD.jsonl`` of ``per_day`` rows each, taken in file order
    (or shuffled with ``seed``). ``start`` defaults to ``days`` days before today, so no row is in the future."""
    if days < 1 or per_day < 1:
        raise ValueError("--days and --per-day must be >= 1")
    path = Path(counterfact)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of CounterFact records")
    if seed is not None:
        records = list(records)
        random.Random(seed).shuffle(records)
    start = start or (datetime.now(UTC).date() - timedelta(days=days))
    out_dir = Path(out_dir)
    targets = [out_dir / f"{start + timedelta(days=d)}.jsonl" for d in range(days)]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"feed file(s) already exist: {existing} (use --force to overwrite)")
    it = iter(records)
    skipped, written, files = 0, 0, []
    for d, target in enumerate(targets):
        day = start + timedelta(days=d)
        rows: list[dict[str, Any]] = []
        for rec in it:
            t = datetime(day.year, day.month, day.day, 6, tzinfo=UTC) + timedelta(seconds=len(rows))
            row = counterfact_row(rec, t.isoformat().replace("+00:00", "Z"))
            if row is None:
                skipped += 1
                continue
            rows.append(row)
            if len(rows) == per_day:
                break
        if not rows:
            break
        write_text_atomic(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        files.append(target)
        written += len(rows)
    return MakeSummary(files, written, skipped)
