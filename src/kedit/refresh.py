"""The nightly knowledge refresh as plain, resumable steps (no Prefect here).

Each step takes JSON-able inputs, returns a JSON-able dict, and is idempotent on its content key, so
an orchestrator can cache it, retry it, or run it on another machine:

    ingest  -> trace  -> edit (candidate state)  -> gate  -> register  -> [approval]  -> decide

The Prefect tasks in ``tasks/`` are thin wrappers around these functions; ``kedit`` commands call
the same functions directly. Each step composes core functions and holds no logic of its own beyond
the step's bookkeeping: the config is :mod:`kedit.config`, state loading :mod:`kedit.lineage.access`,
the MLflow runs :mod:`kedit.lineage.runlog`, the gate :mod:`kedit.evaluation.candidate`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from kedit import __version__
from kedit.atomic import sha256_json, write_json_atomic
from kedit.config import RefreshConfig
from kedit.evaluation.candidate import gate_candidate
from kedit.feeds.champion import champion_predictor
from kedit.lineage.access import load_state_model, open_store
from kedit.lineage.runlog import RunLog
from kedit.models.scoring import greedy_continuations_text
from kedit.progress import reported
from kedit.workspace import Workspace

log = logging.getLogger(__name__)


# --- shared helpers -------------------------------------------------------------------------------
def resolve_feed(ws: Workspace, feed: str | Path) -> Path:
    """A date (``2026-11-22``: ``feeds/2026-11-22.jsonl|csv|parquet``) or a path."""
    p = Path(feed)
    if p.exists():
        return p.resolve()
    for ext in (".jsonl", ".csv", ".parquet"):
        cand = ws.feeds_dir / f"{feed}{ext}"
        if cand.exists():
            return cand
    raise FileNotFoundError(f"feed {str(feed)!r}: no such file, and no feeds/{feed}.jsonl|csv|parquet in {ws.root}")


def refresh_key(feed_sha256: str, parent: str | None, cfg: RefreshConfig, ws: Workspace | None = None) -> str:
    """Content key of one refresh: the same feed on the same parent with the same editor is one refresh
    (the editor's settings: those of the workspace model's calibrated file where there is one)."""
    from kedit.editors.hparams import MODEL_HPARAMS, hparams_digest

    own = ws.model_dir(cfg.model) / MODEL_HPARAMS if ws is not None else None
    # the resolved settings (file, overrides, defaults), not the file's bytes: a changed note is the same refresh
    hp = hparams_digest(cfg.method, cfg.model, path=own if own is not None and own.is_file() else None,
                        overrides=cfg.hparams_overrides or None)
    return sha256_json({"feed": feed_sha256, "parent": parent, "model": cfg.model, "method": cfg.method,
                        "hparams": hp,
                        "batch": cfg.edit_batch_size, "kedit": __version__})[:16]


def reports_dir(ws: Workspace, key: str) -> Path:
    from kedit.safepath import check_target

    d = ws.reports_dir / key
    check_target(d, ws, "reports", within=ws.root, stores=False)  # no link may lead the reports elsewhere
    d.mkdir(parents=True, exist_ok=True)
    return d


# --- steps ---------------------------------------------------------------------------------------
@reported("ingest")
def ingest_step(ws: Workspace, feed: str, cfg: RefreshConfig) -> dict[str, Any]:
    """Read, validate (Great Expectations), quarantine and deduplicate one feed against the champion
    (the same function as ``kedit feed ingest``), with the champion model's no-op check."""
    from kedit.feeds.champion import ingest_for_champion
    from kedit.feeds.schema import FeedPolicy
    from kedit.lineage.registry import log_refresh_inputs
    from kedit.params import load_params

    path = resolve_feed(ws, feed)
    params = load_params(workspace=ws)
    policy = FeedPolicy.from_params({"feeds": params.block("feeds")})
    res = ingest_for_champion(ws, path, policy, predictor=champion_predictor(ws, cfg.model, cfg.device))
    champion = res.champion
    # paths relative to the workspace: they end up in the lineage (the state's feed) and in reports
    out = {"feed": ws.rel(path), "feed_sha256": res.sha256, "passed": bool(res.passed), "message": res.message,
           "champion": champion, "accepted": res.accepted, "counts": res.counts,
           "report_path": ws.rel(res.report_path) if res.report_path else None,
           "quarantine_path": ws.rel(res.quarantine_path) if res.quarantine_path else None}
    out["refresh_key"] = refresh_key(res.sha256, champion, cfg, ws)
    runlog = RunLog(ws, out["refresh_key"])
    feed_uri = out["feed"] if Path(out["feed"]).is_absolute() else f"kedit-workspace:/{out['feed']}"
    log_refresh_inputs(runlog.tracking, runlog.parent_id, rows=res.accepted, name=path.name, source=feed_uri,
                       digest=res.sha256, params={"feed": path.name, "feed_sha256": res.sha256,
                                                  "champion": champion or "base", **cfg.to_dict()})
    runlog.log("validation", params={"feed": path.name, "feed_sha256": res.sha256, "champion": champion},
               metrics={"rows_accepted": len(res.accepted), "rows_quarantined": len(res.quarantined),
                        "rows_dropped": len(res.dropped), "passed": float(res.passed)},
               artifacts=[p for p in (res.report_path, res.quarantine_path) if p])
    return out


@reported("trace")
def trace_step(ws: Workspace, cfg: RefreshConfig, rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Causal-trace a sample of the feed's facts on the champion: where does the current fact live?"""
    from kedit.tracing import trace_fact

    store = open_store(ws)
    lm, _ = load_state_model(ws, cfg.model, store.champion(), cfg.device)
    out_dir = reports_dir(ws, key) / "tracing"
    done = []
    for r in rows[: cfg.trace_sample]:
        res = trace_fact(lm, r["prompt"], r["subject"], target=r.get("target_true") or None,
                         kinds=cfg.trace_kinds, samples=cfg.trace_noise_samples)
        d = res.save(out_dir / str(r["id"]))
        last_subject = res.subject_range[1] - 1
        mlp = res.effects.get("mlp")
        peak = int(torch.tensor(mlp[last_subject]).argmax()) if mlp else None
        done.append({"id": r["id"], "dir": ws.rel(d), "target": res.target, "clean_prob": res.clean_prob,
                     "peak_mlp_layer": peak, "seconds": res.seconds})
    RunLog(ws, key).log("tracing", params={"n_traced": len(done)},
                        metrics={f"peak_mlp_layer_{i}": d["peak_mlp_layer"] for i, d in enumerate(done)},
                        artifacts=[out_dir] if done else [])
    return {"traced": done, "dir": ws.rel(out_dir)}


@reported("edit")
def edit_step(ws: Workspace, cfg: RefreshConfig, ingest: dict[str, Any]) -> dict[str, Any]:
    """Apply the accepted rows on top of the champion and commit the result as a candidate state.

    Content-addressed: the same feed on the same parent with the same editor yields the same state id,
    so a retry never applies the same edits twice.
    """
    from kedit.editors.base import apply_deltas
    from kedit.editors.setup import prepare_edit
    from kedit.feeds.ingest import to_edit_requests

    rows = ingest["accepted"]
    if not rows:
        return {"state_id": None, "n_edits": 0, "reason": "no rows to apply"}
    parent = ingest["champion"]
    store = open_store(ws)
    lm, editor_state = load_state_model(ws, cfg.model, parent, cfg.device)
    # settings, key statistics where the method's spec reads them, the editor
    setup = prepare_edit(lm, cfg.method, ws, overrides=cfg.hparams_overrides or None, stats_corpus=cfg.stats_corpus,
                         stats_tokens=cfg.stats_max_tokens, stats_seq_len=cfg.stats_seq_len,
                         stats_batch_size=cfg.stats_batch_size)
    hp, layers, stats = setup.hp, setup.layers, setup.stats
    requests = to_edit_requests(rows)
    names = [lm.adapter.weight_name(i) for i in layers]
    params = dict(lm.model.named_parameters())
    at_parent = {n: params[n].detach().clone() for n in names}
    t0 = time.perf_counter()
    # the lifelong protocol: sequential batches, each preserving the keys of the ones before it
    result = setup.session(lm, editor_state).apply(requests, cfg.edit_batch_size)
    seconds = time.perf_counter() - t0
    # the state records the summed delta on top of the parent: put the model exactly there
    with torch.no_grad():
        for n, t in at_parent.items():
            params[n].copy_(t)
    apply_deltas(lm.model, result.deltas)
    predictions = greedy_continuations_text(lm, [r["prompt"].format(r["subject"]) for r in rows])
    took = [bool(d.constraint_met) for d in result.diagnostics]
    evaluation = {"seconds": seconds, "seconds_per_edit": seconds / len(rows),
                  "vstar_converged": sum(took), "layer_info": result.layer_info,
                  "diagnostics": [asdict(d) for d in result.diagnostics]}
    facts = [{k: r.get(k) for k in ("id", "subject", "prompt", "target_new", "target_true", "paraphrases",
                                     "neighbors")} for r in rows]
    feed = {"path": ingest["feed"], "file_sha256": ingest["feed_sha256"], "row_ids": [r["id"] for r in rows],
            "facts": facts}
    state = store.commit(lm, result, parent=parent, feed=feed, hparams=hp.to_dict(), evaluation=evaluation,
                         predictions=predictions, applied=True)
    RunLog(ws, ingest["refresh_key"]).log(
        "editing", params={"method": cfg.method, "parent": parent, "layers": layers, "n_edits": len(rows),
                           "stats_key": stats.key if stats else None, "hparams_sha256": hp.source_sha256},
        metrics={"seconds_per_edit": seconds / len(rows), "vstar_converged": sum(took)},
        artifacts=[store.state_dir(state.id) / "state.json"], tags={"kedit.state": state.id})
    return {"state_id": state.id, "parent": parent, "n_edits": len(rows), "seconds": seconds,
            "layers": layers}


@reported("gate")
def gate_step(ws: Workspace, cfg: RefreshConfig, ingest: dict[str, Any], edit: dict[str, Any]) -> dict[str, Any]:
    """Compare the candidate with the champion on the gate policy; write gate.json / gate.md / gate.png."""
    store = open_store(ws)
    res = gate_candidate(ws, store, edit["state_id"], cfg, reports_dir(ws, ingest["refresh_key"]) / "gate",
                         runlog=RunLog(ws, ingest["refresh_key"]))
    gate = res.verdict
    return {"passed": bool(gate["passed"]), "report_dir": ws.rel(res.report_dir),
            "checks": [{k: c[k] for k in ("name", "value", "threshold", "passed")} for c in gate["checks"]],
            "failed_ids": gate["failed_ids"], "lost_ids": gate["lost_ids"]}


@reported("register")
def register_step(ws: Workspace, key: str, state_id: str) -> dict[str, Any]:
    """Register the candidate's logged MLflow model as a model version with the ``candidate`` alias."""
    from kedit.lineage.access import lineage_params
    from kedit.lineage.ops import register_candidate
    from kedit.lineage.shared import lock_wait, section

    params = lineage_params(ws)
    # the state was published by the edit step (maybe on another machine): pull it, then register
    with section(ws, f"register {state_id[:12]}", params, wait_s=lock_wait(params)):
        store = open_store(ws)
        runlog = RunLog(ws, key)
        mv = register_candidate(ws, store, state_id, run_id=runlog.parent_id)
    return {"registered_model": mv.name, "version": str(mv.version), "state_id": state_id,
            "model_uri": f"models:/{mv.name}/{mv.version}", "source": mv.source}


@reported("decide")
def decide_step(ws: Workspace, key: str, state_id: str, approved: bool, by: str, comment: str) -> dict[str, Any]:
    """Record the reviewer's verdict; on approval promote through ``kedit.lineage.ops.promote`` (the
    promotion rules, one lock over the lineage event, git + DVC and the MLflow alias). A rejection
    leaves the champion where it is."""
    from kedit.lineage.access import lineage_params
    from kedit.lineage.ops import promote, reject
    from kedit.lineage.shared import lock_wait, section

    params = lineage_params(ws)
    # one shared-lineage section (cross-host lock, pull, publish) over the verdict and the promotion
    with section(ws, f"decide {state_id[:12]} by {by}", params, wait_s=lock_wait(params)):
        store = open_store(ws)
        runlog = RunLog(ws, key)
        if approved:
            if not (store.signing.on and store.promotion_check(state_id).approval_event is not None):
                _approve_on_worker(ws, store, state_id, by, comment)
            out = promote(ws, store, state_id, by=by, comment=comment, params=params)
            decision = "promoted"
        else:
            reject(ws, store, state_id, by=by, comment=comment)
            out = {"champion": store.champion()}
            decision = "rejected"
    runlog.log("approval", params={"decision": decision, "by": by, "comment": comment or "-"},
               tags={"kedit.decision": decision, "kedit.approver": by})
    runlog.finish()
    return {"decision": decision, "state_id": state_id, "by": by, "comment": comment,
            "champion": store.champion(), **{k: v for k, v in out.items() if k != "event"}}


def _approve_on_worker(ws: Workspace, store: Any, state_id: str, by: str, comment: str) -> None:
    """The reviewer's verdict as an approve event. With ``lineage.approval_signing`` on, the decide step
    signs nothing on a reviewer's behalf unless the worker holds a key (``$KEDIT_SIGNING_KEY``) the allowed
    signers list for ``by``; the reviewer's own signed approval (``kedit lineage approve``) is what counts,
    and when it is recorded this step does not write another."""
    from kedit.lineage.ops import approve
    from kedit.lineage.signing import SigningError

    try:
        approve(store, state_id, by=by, comment=comment, ws=ws)
    except SigningError as exc:
        raise SigningError(f"{exc}. With lineage.approval_signing on, approve with your own key first "
                           f"(`kedit lineage approve {state_id[:12]} --by {by} --key PATH`), then approve the run "
                           f"again") from exc


def summary_text(ws: Workspace, result: dict[str, Any]) -> str:
    """What an operator reads at the end of a refresh."""
    lines = [f"refresh {result.get('refresh_key', '?')}: {result.get('outcome', '?')}"]
    for k in ("feed", "state_id", "gate_report", "decision", "champion"):
        if result.get(k) is not None:
            lines.append(f"  {k:12s} {result[k]}")
    return "\n".join(lines)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dump(obj: Any, path: Path) -> None:
    write_json_atomic(path, json.loads(json.dumps(obj, default=str)))
