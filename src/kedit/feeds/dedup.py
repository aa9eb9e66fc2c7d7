"""Deduplication and contradiction checks over normalised rows (pure functions, no I/O).

* ids: the first row with an ``id`` keeps it; a later identical row is dropped, a later different
  row is quarantined (naming the first row's line).
* in-feed: rows with the same (subject, prompt) and the same target are duplicates (keep the first);
  with different targets they contradict each other (quarantine them all).
* lineage: a (subject, prompt, target_new) already applied is dropped.
* history: a fact whose target changes back to an earlier value within the window (A -> B -> A)
  is quarantined as a flip-flop.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from kedit.feeds.expectations import parse_time
from kedit.feeds.normalize import normalize_text


def fact_key(row: dict[str, Any]) -> tuple[str, str]:
    return row["subject"], row["prompt"]


def _id_key(value: Any) -> str | None:
    if value is None:
        return None
    return normalize_text(value) if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def duplicate_ids(rows: list[dict[str, Any]], lines: list[int]) -> tuple[dict[int, str], dict[int, str]]:
    """Return (quarantine, drop): position -> reason, for rows reusing an earlier row's ``id``.

    The first row with an id keeps it. A later row that is field-identical to it (the same fields with
    the same values, as read) is a harmless re-send and is dropped (counted as ``duplicate``); a later
    row that differs is quarantined, naming the line of the row that holds the id. Rows are compared as
    read, before validation, so a later row cannot claim an id because the first one was invalid.
    """
    quarantine: dict[int, str] = {}
    drop: dict[int, str] = {}
    first: dict[str, int] = {}
    for i, r in enumerate(rows):
        key = _id_key(r.get("id"))
        if key is None:
            continue
        j = first.setdefault(key, i)
        if j == i:
            continue
        if r == rows[j]:
            drop[i] = f"duplicate: identical to line {lines[j]} (id {r['id']!r})"
        else:
            quarantine[i] = (f"duplicate_id: id {r['id']!r} was first used on line {lines[j]} (kept); "
                             "this row differs from it")
    return quarantine, drop


def in_feed_conflicts(rows: list[dict[str, Any]], lines: list[int] | None = None
                      ) -> tuple[dict[int, str], dict[int, str]]:
    """Return (quarantine, drop): position -> reason, for contradictions and duplicates of one fact
    within a feed (``lines``: each row's line, for the reasons; default 1-based positions)."""
    lines = lines or list(range(1, len(rows) + 1))
    quarantine: dict[int, str] = {}
    drop: dict[int, str] = {}
    by_fact: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_fact[fact_key(r)].append(i)
    for (subject, prompt), idx in by_fact.items():
        if len(idx) < 2:
            continue
        targets = sorted({rows[i]["target_new"] for i in idx})
        if len(targets) > 1:
            for i in idx:
                quarantine[i] = (f"contradictory: {len(idx)} rows change ({subject!r}, {prompt!r}) to different "
                                 f"targets {targets}")
        else:
            for i in idx[1:]:
                drop[i] = (f"duplicate: same fact and target as line {lines[idx[0]]} "
                           f"(id {rows[idx[0]]['id']!r})")
    return quarantine, drop


def normalize_fact(fact: Iterable[str]) -> tuple[str, ...]:
    return tuple(normalize_text(x) for x in fact)


def already_applied(rows: list[dict[str, Any]], applied: Iterable[tuple[str, str, str]]) -> dict[int, str]:
    """Positions of rows whose (subject, prompt, target_new) is already applied in the lineage."""
    done = {normalize_fact(f) for f in applied}
    return {i: "already_applied: this fact with this target is already applied in the current lineage"
            for i, r in enumerate(rows) if (r["subject"], r["prompt"], r["target_new"]) in done}


def _get(rec: Any, key: str) -> Any:
    return rec.get(key) if isinstance(rec, dict) else getattr(rec, key, None)


def flip_flops(rows: list[dict[str, Any]], history: Iterable[Any], window_days: int) -> dict[int, str]:
    """Positions of rows that change a fact back to a value it had within ``window_days`` before.

    ``history`` holds earlier fact records (dicts or objects) with subject, prompt, target_new,
    optional target_true and a time (``observed_at``, ``applied_at`` or ``date``, ISO 8601).
    """
    past: dict[tuple[str, str], list[tuple[Any, str, str | None]]] = defaultdict(list)
    for rec in history:
        when = next((t for k in ("observed_at", "applied_at", "date") if (t := parse_time(_get(rec, k)))), None)
        if when is None or not _get(rec, "subject") or not _get(rec, "prompt") or not _get(rec, "target_new"):
            raise ValueError(f"history record needs subject, prompt, target_new and an ISO time: {rec!r}")
        tt = _get(rec, "target_true")
        past[(normalize_text(_get(rec, "subject")), normalize_text(_get(rec, "prompt")))].append(
            (when, normalize_text(_get(rec, "target_new")), normalize_text(tt) if tt else None))
    window = timedelta(days=window_days)
    out: dict[int, str] = {}
    for i, r in enumerate(rows):
        now = parse_time(r["observed_at"])
        try:
            start = now - window
        except OverflowError:  # a valid observed_at within the window of year 1
            start = datetime.min.replace(tzinfo=UTC)
        recent = sorted(e for e in past.get(fact_key(r), []) if start <= e[0] <= now)
        if not recent:
            continue
        last_when, last_target, _ = recent[-1]
        earlier = {e[1] for e in recent[:-1]} | {e[2] for e in recent if e[2]}
        if last_target != r["target_new"] and r["target_new"] in earlier:
            out[i] = (f"flip_flop: fact changed back and forth within {window_days} days: was set to "
                      f"{last_target!r} on {last_when.date()}, now back to {r['target_new']!r}")
    return out
