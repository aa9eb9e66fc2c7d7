"""The hash chain over the lineage events: each event names its predecessor's digest.

An event file written by kedit carries two fields beside its record:

- ``prev``: the digest of the event before it (by number), ``GENESIS`` for the first event of a store;
- ``digest``: sha256 of the event's own JSON (every field but ``digest``, ``prev`` included, in
  canonical form: sorted keys, no whitespace).

So an event edited after it was written no longer matches its ``digest``; an event inserted, removed
or renumbered breaks the ``prev`` of the one after it; a hand-written file without the two fields, or
with made-up ones, is named. Events written before the chain existed (no ``digest``) get the same
digest computed on reading, over their content and the previous digest; the first chained event's
``prev`` is therefore a digest of every event before it, and seals them from then on.

What the chain does not do: it has no secret. Anyone who can write ``lineage/events/`` and run this
code can recompute the chain after a forgery (docs/lineage.md, "Who did it, and the trust model").
Tamper evidence against such a writer needs a key the writer lacks: the git commit each promotion
makes names the chain head (``[kedit chain ...]``), and a signed commit binds it to the signer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kedit.atomic import sha256_json

GENESIS = "0" * 64


def event_digest(raw: dict[str, Any], prev: str | None = None) -> str:
    """The digest of an event's JSON (``digest`` left out); ``prev`` given: as if it held that ``prev``."""
    body = {k: v for k, v in raw.items() if k != "digest"}
    if prev is not None:
        body["prev"] = prev
    return sha256_json(body)


def seal(raw: dict[str, Any], prev: str) -> dict[str, Any]:
    """``raw`` with ``prev`` and its ``digest`` set: what is written to the event file."""
    body = json.loads(json.dumps({**{k: v for k, v in raw.items() if k != "digest"}, "prev": prev},
                                 sort_keys=True))
    return {**body, "digest": event_digest(body)}


@dataclass
class ChainReport:
    """What checking the chain found. ``bad``: event file name -> why it fails (each such event is
    ignored by the promotion rules and by the champion); ``problems``: everything to report,
    including numbers missing or written twice; ``legacy``: events written before the chain;
    ``first_chained``: the number of the first chained event (None: none yet); ``head``: the digest
    the next event must name as ``prev``."""

    bad: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    legacy: int = 0
    first_chained: int | None = None
    head: str = GENESIS
    last_seq: int = 0

    def note(self, sealed_by: str | None = None) -> str | None:
        """One line on events written before the chain (None: there are none); ``sealed_by``: the seal
        event that vouched for them, as text."""
        if not self.legacy:
            return None
        vouch = (f"{sealed_by} vouched for them" if sealed_by else "their gate verdicts and approvals count for a "
                 "promotion once `kedit lineage seal` has vouched for them")
        if self.first_chained is None:
            return (f"{self.legacy} events were written before the event chain; the next event kedit writes chains "
                    f"over them (its prev is a digest of all of them); {vouch}")
        return (f"{self.legacy} events before event {self.first_chained} were written before the event chain; "
                f"event {self.first_chained} chains over them (a change to any of them breaks it); {vouch}")


def check_chain(records: list[tuple[Path, dict[str, Any]]]) -> ChainReport:
    """Walk the events in number order, recomputing each digest and each link (see module doc)."""
    rep = ChainReport()
    prev = GENESIS
    last_seq = 0
    by_seq: dict[int, list[tuple[Path, dict[str, Any]]]] = {}
    for path, raw in sorted(records, key=lambda r: (_seq(r[1]), r[0].name)):
        by_seq.setdefault(_seq(raw), []).append((path, raw))
    for seq, group in sorted(by_seq.items()):
        if len(group) > 1:  # one number written twice: the one that continues the chain stands, if any
            keep = next((g for g in group if g[1].get("prev") == prev and g[1].get("digest") == event_digest(g[1])),
                        group[0])
            for path, _ in group:
                if path != keep[0]:
                    why = f"event number {seq} written twice ({', '.join(p.name for p, _ in group)})"
                    rep.bad[path.name] = why
                    rep.problems.append(f"{path}: {why}")
            group = [keep]
        ((path, raw),) = group
        if seq != last_seq + 1:
            rep.problems.append(f"{path.parent}: event numbers {last_seq + 1}..{seq - 1} are missing "
                                f"(removed after they were written)")
        own = event_digest(raw)
        if "digest" in raw:
            if rep.first_chained is None:
                rep.first_chained = seq
            why = None
            if raw.get("digest") != own:
                why = (f"its content does not match its digest (edited after it was written; digest "
                       f"{str(raw.get('digest'))[:12]}, content hashes to {own[:12]})")
            elif raw.get("prev") != prev:
                why = (f"it does not follow event {last_seq}: its prev is {str(raw.get('prev'))[:12]}, the "
                       f"chain before it hashes to {prev[:12]} (an event before it was edited, removed or "
                       f"inserted, or this one was made outside kedit)")
            if why:
                rep.bad[path.name] = why
                rep.problems.append(f"event {seq} ({raw.get('type')}, {path.name}): {why}")
            prev = raw["digest"] if isinstance(raw.get("digest"), str) else own
        else:
            if rep.first_chained is not None:
                why = (f"it has no chain fields (prev, digest) although the chain began at event "
                       f"{rep.first_chained}: written by hand or by a kedit older than the chain")
                rep.bad[path.name] = why
                rep.problems.append(f"event {seq} ({raw.get('type')}, {path.name}): {why}")
            else:
                rep.legacy += 1
            prev = event_digest(raw, prev)
        last_seq = seq
    rep.head, rep.last_seq = prev, last_seq
    return rep


def _seq(raw: dict[str, Any]) -> int:
    try:
        return int(raw.get("seq"))
    except (TypeError, ValueError):
        return 0
