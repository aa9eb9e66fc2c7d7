"""Ingest one feed file: read -> GX validate -> row-level quarantine -> normalise -> dedup -> accepted rows.

The outcome is a pure function of the file's bytes, the policy, the lineage's applied facts, the
history and the champion's predictions (and ``now``), so re-ingesting the same file gives the same
result; facts already applied are dropped, so nothing is ever edited twice. Quarantined rows go to
``quarantine/<stem>.jsonl`` with their reasons, and a Markdown report to ``reports/<stem>.md``.
A feed that fails as a whole (too many invalid rows, row count out of range) accepts nothing.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kedit.atomic import write_json_atomic, write_text_atomic
from kedit.feeds.dedup import already_applied, duplicate_ids, flip_flops, in_feed_conflicts
from kedit.feeds.expectations import run_suite
from kedit.feeds.normalize import normalize_row
from kedit.feeds.reader import read_feed
from kedit.feeds.schema import CONTROL_CHARS, FEED_FIELDS, INVISIBLE_CHARS, FeedPolicy

LEDGER_NAME = ".ingested.json"


@dataclass
class QuarantinedRow:
    line: int
    row: dict[str, Any]  # as read from the file
    reasons: list[str]  # "check: message"


@dataclass
class DroppedRow:
    line: int
    row: dict[str, Any]  # normalised (as read, for an identical copy of an earlier row)
    reason: str


@dataclass
class IngestResult:
    """Everything the nightly flow and the report need about one feed."""

    path: str
    sha256: str
    format: str
    passed: bool  # the feed as a whole is accepted
    message: str
    accepted: list[dict[str, Any]]  # normalised rows to edit (empty when the feed failed)
    accepted_lines: list[int]
    quarantined: list[QuarantinedRow]
    dropped: list[DroppedRow]
    counts: dict[str, Any]
    checks: list[dict[str, Any]]  # every GX expectation with its outcome
    policy: dict[str, Any]
    checked_at: str
    quarantine_path: str | None = None
    report_path: str | None = None
    previously_ingested: bool = False
    notes: list[str] = field(default_factory=list)
    champion: str | None = None  # lineage state whose applied facts and history were checked (None: base)

    @property
    def accepted_ids(self) -> list[str]:
        return [r["id"] for r in self.accepted]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _default_dir(path: Path, name: str, given: str | Path | None) -> Path:
    return Path(given) if given is not None else path.parent / name


def ingest_feed(path: str | Path, policy: FeedPolicy | None = None, *,
                applied_facts: Iterable[tuple[str, str, str]] = frozenset(),
                history: Iterable[Any] = (),
                predicts_target: Callable[[list[dict[str, Any]]], list[bool]] | None = None,
                quarantine_dir: str | Path | None = None, report_dir: str | Path | None = None,
                ledger_path: str | Path | None = None, record: bool = True,
                now: datetime | None = None) -> IngestResult:
    """Validate and clean one feed file. Raises :class:`~kedit.feeds.reader.FeedFormatError` for a
    file that is not a readable feed; otherwise returns an :class:`IngestResult` (``passed`` False
    when the feed fails as a whole). ``record`` adds the file hash to the ledger
    (default ``<feed dir>/.ingested.json``)."""
    policy = policy or FeedPolicy()
    path = Path(path)
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    raw = read_feed(path, policy)
    n = len(raw.rows)
    suite = run_suite(raw.rows, policy, now)
    reasons = suite.row_reasons(n)
    dropped: dict[int, str] = {}
    id_quarantine, id_copies = duplicate_ids(raw.rows, raw.lines)
    for i, why in id_quarantine.items():
        reasons[i].append(why)
    for i, why in id_copies.items():
        reasons[i] = []  # an identical copy is judged as the row it copies (kept or quarantined there)
        dropped[i] = why

    norm: dict[int, dict[str, Any]] = {}
    for i in range(n):
        if not reasons[i] and i not in dropped:
            row, problems = normalize_row(raw.rows[i])
            reasons[i].extend(problems)
            if not problems:
                norm[i] = row
    pos = sorted(norm)
    rows = [norm[i] for i in pos]
    conflict_q, dup_drop = in_feed_conflicts(rows, [raw.lines[i] for i in pos])
    for j, why in conflict_q.items():
        reasons[pos[j]].append(why)
    for j, why in flip_flops(rows, history, policy.window_days).items():
        if j not in conflict_q and j not in dup_drop:
            reasons[pos[j]].append(why)
    for j, why in dup_drop.items():
        dropped[pos[j]] = why
    for j, why in already_applied(rows, applied_facts).items():
        if not reasons[pos[j]]:
            dropped.setdefault(pos[j], why)

    n_quarantined = sum(1 for r in reasons if r)
    invalid_fraction = n_quarantined / n
    table_failures = suite.table_failures()
    notes: list[str] = []
    unknown = [c for c in raw.columns if c not in FEED_FIELDS]
    if unknown:
        notes.append(f"unknown column(s) {unknown} ignored (a feed row has {list(FEED_FIELDS)})")
    if table_failures:
        passed, message = False, "feed failed as a whole: " + "; ".join(table_failures)
    elif invalid_fraction > policy.max_invalid_fraction:
        passed, message = False, (f"feed failed as a whole: {n_quarantined} of {n} rows invalid "
                                  f"({invalid_fraction:.1%}), over the limit of {policy.max_invalid_fraction:.1%} "
                                  "(feeds.max_invalid_fraction); nothing from it is applied")
    else:
        passed, message = True, f"feed accepted: {n - n_quarantined} of {n} rows valid"

    candidates = [i for i in range(n) if not reasons[i] and i not in dropped]
    if passed and predicts_target is not None and candidates:
        known = list(predicts_target([norm[i] for i in candidates]))
        if len(known) != len(candidates):
            raise ValueError(f"predicts_target returned {len(known)} answers for {len(candidates)} rows")
        for i, k in zip(candidates, known):
            if k:
                dropped[i] = "no_op: the champion already predicts target_new"
        candidates = [i for i in candidates if i not in dropped]
    elif predicts_target is None and passed:
        notes.append("no-op check skipped (no champion predictor given)")

    quarantined = [QuarantinedRow(raw.lines[i], raw.rows[i], reasons[i]) for i in range(n) if reasons[i]]
    dropped_rows = [DroppedRow(raw.lines[i], norm.get(i, raw.rows[i]), dropped[i]) for i in sorted(dropped)]
    accepted_idx = candidates if passed else []
    reason_counts = Counter(r.split(":", 1)[0] for q in quarantined for r in q.reasons)
    drop_counts = Counter(d.reason.split(":", 1)[0] for d in dropped_rows)
    counts = {"rows": n, "valid": n - n_quarantined, "quarantined": n_quarantined, "dropped": len(dropped_rows),
              "accepted": len(accepted_idx), "held_back": 0 if passed else len(candidates),
              "invalid_fraction": round(invalid_fraction, 6),
              "quarantine_reasons": dict(sorted(reason_counts.items())),
              "drop_reasons": dict(sorted(drop_counts.items()))}

    result = IngestResult(
        path=str(path), sha256=raw.sha256, format=raw.format, passed=passed, message=message,
        accepted=[norm[i] for i in accepted_idx], accepted_lines=[raw.lines[i] for i in accepted_idx],
        quarantined=quarantined, dropped=dropped_rows, counts=counts,
        checks=[asdict(c) for c in suite.results], policy=policy.to_dict(), checked_at=now.isoformat(),
        notes=notes)

    stem = path.stem
    qpath = _default_dir(path, "quarantine", quarantine_dir) / f"{stem}.jsonl"
    if quarantined:
        lines = [escape_hidden(json.dumps({"line": q.line, "id": q.row.get("id"), "reasons": q.reasons,
                                           "row": q.row}, ensure_ascii=False, default=str)) for q in quarantined]
        write_text_atomic(qpath, "\n".join(lines) + "\n")
        result.quarantine_path = str(qpath)
    elif qpath.exists():
        qpath.unlink()  # a stale quarantine from an earlier version of this file

    if record:
        _record(result, Path(ledger_path) if ledger_path else path.parent / LEDGER_NAME)
    rpath = _default_dir(path, "reports", report_dir) / f"{stem}.md"
    result.report_path = str(rpath)
    write_report(result, rpath)
    return result


def _record(result: IngestResult, ledger: Path) -> None:
    """Note the file hash in the ledger; flag a re-ingest and a file that changed under the same name."""
    entries = json.loads(ledger.read_text(encoding="utf-8")) if ledger.exists() else {}
    name = Path(result.path).name
    if result.sha256 in entries:
        result.previously_ingested = True
        first = entries[result.sha256]
        result.notes.append(f"same file hash already ingested at {first['checked_at']} as {first['file']}")
        return
    for sha, e in entries.items():
        if e["file"] == name:
            result.notes.append(f"{name} was ingested before with different content (sha256 {sha[:12]})")
    entries[result.sha256] = {"file": name, "checked_at": result.checked_at, "passed": result.passed,
                              "accepted_ids": result.accepted_ids, "counts": result.counts}
    write_json_atomic(ledger, entries)


def to_edit_requests(rows: Iterable[dict[str, Any]]):
    """Accepted feed rows -> :class:`kedit.editors.base.EditRequest` (id = row id)."""
    from kedit.editors.base import EditRequest

    return [EditRequest(prompt=r["prompt"], subject=r["subject"], target_new=r["target_new"],
                        target_true=r.get("target_true"), paraphrases=list(r.get("paraphrases") or []),
                        neighbors=list(r.get("neighbors") or []), id=r["id"]) for r in rows]


_HIDDEN = re.compile(f"{CONTROL_CHARS}|{INVISIBLE_CHARS}")


def escape_hidden(text: str) -> str:
    """Control and invisible characters as JSON ``\\u`` escapes (a surrogate pair above U+FFFF), so a
    bidi override in a quarantined row cannot reorder what a reviewer reads. Inside a JSON string the
    result is the same JSON value."""
    def esc(m: re.Match[str]) -> str:
        cp = ord(m.group())
        if cp <= 0xFFFF:
            return f"\\u{cp:04x}"
        cp -= 0x10000
        return f"\\u{0xD800 + (cp >> 10):04x}\\u{0xDC00 + (cp & 0x3FF):04x}"

    return _HIDDEN.sub(esc, text)


def _cell(value: Any, limit: int = 80) -> str:
    s = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    s = escape_hidden(s.replace("|", "\\|").replace("\n", " "))
    return s if len(s) <= limit else s[: limit - 1] + "…"


def report_markdown(result: IngestResult) -> str:
    """Human-readable validation report of one feed."""
    c = result.counts
    out = [f"# Feed report: {Path(result.path).name}", "",
           f"**{'ACCEPTED' if result.passed else 'REJECTED'}**: {result.message}", "",
           f"- file: `{Path(result.path).name}` ({result.format})", f"- sha256: `{result.sha256}`",
           f"- checked at: {result.checked_at}",
           f"- invalid fraction: {c['invalid_fraction']:.1%} (limit {result.policy['max_invalid_fraction']:.1%})"]
    out += [f"- note: {n}" for n in result.notes]
    out += ["", "| rows | valid | quarantined | dropped | accepted | held back |", "|---|---|---|---|---|---|",
            f"| {c['rows']} | {c['valid']} | {c['quarantined']} | {c['dropped']} | {c['accepted']} | "
            f"{c['held_back']} |", "", "## Expectations (Great Expectations suite `fact_change_feed`)", "",
            "| check | expectation | result | failing rows |", "|---|---|---|---|"]
    for ch in result.checks:
        status = "error" if ch["error"] else ("pass" if ch["success"] else "FAIL")
        detail = len(ch["unexpected_rows"]) if ch["unexpected_rows"] else (
            _cell(ch["observed"]) if not ch["success"] and ch["observed"] is not None else "")
        out.append(f"| {ch['check']} | {ch['expectation']} | {status} | {detail} |")
    if result.quarantined:
        out += ["", f"## Quarantined rows ({len(result.quarantined)})", "", "| line | id | reasons |",
                "|---|---|---|"]
        out += [f"| {q.line} | {_cell(q.row.get('id'))} | {_cell('; '.join(q.reasons), 400)} |"
                for q in result.quarantined]
    if result.dropped:
        out += ["", f"## Dropped rows ({len(result.dropped)})", "", "| line | id | reason |", "|---|---|---|"]
        out += [f"| {d.line} | {_cell(d.row['id'])} | {_cell(d.reason, 200)} |" for d in result.dropped]
    if result.accepted:
        out += ["", f"## Accepted rows ({len(result.accepted)})", "", "| line | id | fact |", "|---|---|---|"]
        out += [f"| {ln} | {_cell(r['id'])} | {_cell(r['prompt'].format(r['subject']))} → "
                f"{_cell(r['target_new'])} |" for ln, r in zip(result.accepted_lines, result.accepted)]
    return "\n".join(out) + "\n"


def write_report(result: IngestResult, path: str | Path) -> Path:
    path = Path(path)
    write_text_atomic(path, report_markdown(result))
    return path
