"""Ingest a feed against the workspace's champion: the one code path behind ``kedit feed ingest`` and
the nightly ingest step, so both drop facts already applied on the champion's path, quarantine
flip-flops against its history, and write the quarantine file, report and ledger into the
workspace's ``feeds/`` folder. Only the no-op check (does the champion already answer
``target_new``?) needs the model, so the caller passes it in as a predictor.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from kedit.feeds.ingest import LEDGER_NAME, IngestResult, ingest_feed
from kedit.feeds.schema import FeedPolicy
from kedit.lineage.access import load_state_model, open_store
from kedit.workspace import Workspace

# (champion state id or None for the base model, candidate rows) -> does the champion already predict
# each row's target_new?
ChampionPredictor = Callable[[str | None, list[dict[str, Any]]], list[bool]]


def applied_facts(store, state_id: str | None) -> set[tuple[str, str, str]]:
    """(subject, prompt, target_new) of every fact applied on the path to ``state_id`` (a retracted
    fact is no longer applied: a feed may bring it again)."""
    return {(f["subject"], f["prompt"], f["target_new"]) for f in store.fact_records(state_id)}


def fact_history(store, state_id: str | None) -> list[dict[str, Any]]:
    """Earlier fact changes on the champion's path, with the date they were applied."""
    out = []
    for s in store.path(state_id) if state_id else []:
        for f in s.feed.get("facts", []) or []:
            out.append({**f, "applied_at": s.created_at})
    return out


def ingest_for_champion(ws: Workspace, path: str | Path, policy: FeedPolicy | None = None, *,
                        predictor: ChampionPredictor | None = None, now: datetime | None = None) -> IngestResult:
    """:func:`~kedit.feeds.ingest.ingest_feed` with the lineage checks of the workspace's current
    champion; quarantine, report and ledger go under ``ws.feeds_dir``. ``result.champion`` names the
    state checked against (None: the base model)."""
    from kedit.safepath import check_target

    quarantine, reports, ledger = ws.feeds_dir / "quarantine", ws.feeds_dir / "reports", ws.feeds_dir / LEDGER_NAME
    for target in (quarantine, reports, ledger):  # written (quarantine: also deleted) inside the workspace only
        check_target(target, ws, "feed ingest", within=ws.root, stores=False)
    store = open_store(ws)
    champion = store.champion()
    predicts = (lambda rows: predictor(champion, rows)) if predictor is not None else None
    res = ingest_feed(path, policy, applied_facts=frozenset(applied_facts(store, champion)),
                      history=fact_history(store, champion), predicts_target=predicts,
                      quarantine_dir=quarantine, report_dir=reports, ledger_path=ledger, now=now)
    res.champion = champion
    return res


def champion_predictor(ws: Workspace, model: str, device: str = "cpu") -> ChampionPredictor:
    """The no-op check of an ingest: (state id, rows) -> does that state's model (the base ``model``
    with the state restored, on ``device``) already answer each row's ``target_new``? The model is
    loaded on the first call only (a feed with nothing left to check loads nothing)."""
    from kedit.models.scoring import predicts_targets

    loaded: dict[str | None, Any] = {}

    def predicts(state_id: str | None, rows: list[dict[str, Any]]) -> list[bool]:
        if state_id not in loaded:
            loaded[state_id], _ = load_state_model(ws, model, state_id, device)
        return predicts_targets(loaded[state_id], rows)

    return predicts
