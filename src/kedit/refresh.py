"""The nightly knowledge refresh as plain, resumable steps (no Prefect here).

Each step takes JSON-able inputs, returns a JSON-able dict, and is idempotent on its content key, so
an orchestrator can cache it, retry it, or run it on another machine:

    ingest  -> trace  -> edit (candidate state)  -> gate  -> register  -> [approval]  -> decide

The Prefect tasks in ``tasks/`` are thin wrappers around these functions; ``kedit`` commands call
the same functions directly.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kedit import __version__
from kedit.atomic import sha256_file, sha256_json, write_json_atomic
from kedit.feeds.champion import applied_facts, fact_history  # noqa: F401 (moved there; kept importable)
from kedit.progress import reported
from kedit.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class RefreshConfig:
    """What a nightly refresh does; read from the ``refresh:`` block of params.yaml, overridable."""

    model: str = "smollm2-135m"
    method: str = "memoir"  # params.yaml refresh.method: the editor measured best over 1,000+ edits
    device: str = "cpu"
    trace_sample: int = 1
    trace_noise_samples: int = 5
    edit_batch_size: int = 10  # a feed is applied in sequential batches of this size (0: one batch)
    approval_timeout_s: int = 24 * 3600
    stats_corpus: str = "wiki-summaries-en"
    stats_max_tokens: int = 200_000
    stats_seq_len: int = 256
    stats_batch_size: int = 16
    hparams_overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_params(cls, params_file: str | Path | None = None, workspace: Any = None,
                    **overrides: Any) -> RefreshConfig:
        """The ``refresh:`` block, ``model.slug`` and ``stats:`` of params.yaml (found by
        :func:`kedit.params.find_params`), then ``overrides`` (``None`` values ignored)."""
        from kedit.params import load_params

        params = load_params(params_file, workspace)
        data: dict[str, Any] = params.block("refresh")
        stats = params.block("stats")
        for k in ("corpus", "max_tokens", "seq_len", "batch_size"):
            if k in stats:
                data[f"stats_{k}"] = stats[k]
        if params.block("model").get("slug"):
            data["model"] = params.block("model")["slug"]
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"refresh config: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def open_lineage(ws: Workspace):
    from kedit.lineage.ops import open_store

    return open_store(ws)


def load_state_model(ws: Workspace, cfg: RefreshConfig, state_id: str | None):
    """The base model with ``state_id`` materialised (bit-exact); returns (lm, editor_state)."""
    from kedit.models.store import load_model

    lm = load_model(cfg.model, ws, device=cfg.device)
    store = open_lineage(ws)
    editor_state = store.materialise(state_id, lm) if state_id else None
    return lm, editor_state


def predicts_targets(lm, rows: Sequence[dict[str, Any]]) -> list[bool]:
    """Which rows the model already answers with ``target_new`` under greedy decoding (one batch)."""
    from kedit.evaluation.metrics import encode_targets, greedy_tokens

    if not rows:
        return []
    prompts = [r["prompt"].format(r["subject"]) for r in rows]
    targets = encode_targets(lm.tokenizer, [r["target_new"] for r in rows])
    k = max(len(t) for t in targets)
    got = greedy_tokens(lm, prompts, k=k)
    return [got[i, : len(t)].tolist() == t for i, t in enumerate(targets)]


def champion_predictor(ws: Workspace, cfg: RefreshConfig):
    """The no-op check of an ingest: (state id, rows) -> does that state's model already answer each
    row's ``target_new``? The model is loaded on the first call only (a feed with nothing left to
    check loads nothing)."""
    loaded: dict[str | None, Any] = {}

    def predicts(state_id: str | None, rows: list[dict[str, Any]]) -> list[bool]:
        if state_id not in loaded:
            loaded[state_id], _ = load_state_model(ws, cfg, state_id)
        return predicts_targets(loaded[state_id], rows)

    return predicts


class RunLog:
    """MLflow runs for one refresh: a parent run keyed by the refresh key, a child run per step.

    Runs are found again by tag, so a resumed or retried refresh logs into the same runs.
    """

    def __init__(self, ws: Workspace, refresh_key: str, name: str = "nightly-refresh", kind: str = "refresh") -> None:
        from kedit.lineage.registry import Tracking

        self.tracking = Tracking(ws)
        self.client = self.tracking.client
        self.key = refresh_key
        self.parent_id = self._find_or_create(name, {"kedit.refresh": refresh_key, "kedit.kind": kind})

    def _find_or_create(self, name: str, tags: dict[str, str]) -> str:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        found = self.client.search_runs([self.tracking.experiment_id], filter_string=query, max_results=1)
        if found:
            return found[0].info.run_id
        run = self.client.create_run(self.tracking.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def child(self, step: str) -> str:
        return self._find_or_create(step, {"kedit.refresh": self.key, "kedit.step": step,
                                           "mlflow.parentRunId": self.parent_id})

    def log(self, step: str, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
            artifacts: Sequence[str | Path] = (), tags: dict[str, str] | None = None) -> str:
        run_id = self.child(step)
        for k, v in (params or {}).items():
            s = str(v)
            try:
                self.client.log_param(run_id, k, s[:497] + "..." if len(s) > 500 else s)
            except Exception:  # a param is immutable once logged (resumed run): keep the first value
                pass
        for k, v in (metrics or {}).items():
            if v is not None and isinstance(v, int | float):
                self.client.log_metric(run_id, k, float(v))
        for k, v in (tags or {}).items():
            self.client.set_tag(run_id, k, str(v))
        for a in artifacts:
            if a and Path(a).exists():
                if Path(a).is_dir():
                    self.client.log_artifacts(run_id, str(a), artifact_path=step)
                else:
                    self.client.log_artifact(run_id, str(a), artifact_path=step)
        return run_id

    def finish(self, status: str = "FINISHED") -> None:
        for r in self.client.search_runs([self.tracking.experiment_id],
                                         filter_string=f"tags.`kedit.refresh` = '{self.key}'"):
            if r.info.status == "RUNNING":
                self.client.set_terminated(r.info.run_id, status=status)


def refresh_key(feed_sha256: str, parent: str | None, cfg: RefreshConfig, ws: Workspace | None = None) -> str:
    """Content key of one refresh: the same feed on the same parent with the same editor is one refresh
    (the editor's settings: the workspace model's calibrated file where there is one)."""
    from kedit.editors.hparams import hparams_file_for

    try:
        hp_file = sha256_file(hparams_file_for(cfg.model, model_dir=ws.model_dir(cfg.model) if ws else None))
    except FileNotFoundError:
        hp_file = None
    return sha256_json({"feed": feed_sha256, "parent": parent, "model": cfg.model, "method": cfg.method,
                        "hparams": cfg.hparams_overrides, "hparams_file": hp_file,
                        "batch": cfg.edit_batch_size, "kedit": __version__})[:16]


def reports_dir(ws: Workspace, key: str) -> Path:
    d = ws.reports_dir / key
    d.mkdir(parents=True, exist_ok=True)
    return d


# --- steps ---------------------------------------------------------------------------------------
@reported("ingest")
def ingest_step(ws: Workspace, feed: str, cfg: RefreshConfig) -> dict[str, Any]:
    """Read, validate (Great Expectations), quarantine and deduplicate one feed against the champion
    (the same function as ``kedit feed ingest``), with the champion model's no-op check."""
    from kedit.feeds.champion import ingest_for_champion
    from kedit.feeds.schema import FeedPolicy
    from kedit.params import load_params

    path = resolve_feed(ws, feed)
    params = load_params(workspace=ws)
    policy = FeedPolicy.from_params({"feeds": params.block("feeds")})
    res = ingest_for_champion(ws, path, policy, predictor=champion_predictor(ws, cfg))
    champion = res.champion
    out = {"feed": str(path), "feed_sha256": res.sha256, "passed": bool(res.passed), "message": res.message,
           "champion": champion, "accepted": res.accepted, "counts": res.counts,
           "report_path": str(res.report_path) if res.report_path else None,
           "quarantine_path": str(res.quarantine_path) if res.quarantine_path else None}
    out["refresh_key"] = refresh_key(res.sha256, champion, cfg, ws)
    runlog = RunLog(ws, out["refresh_key"])
    runlog.log("validation", params={"feed": path.name, "feed_sha256": res.sha256, "champion": champion},
               metrics={"rows_accepted": len(res.accepted), "rows_quarantined": len(res.quarantined),
                        "rows_dropped": len(res.dropped), "passed": float(res.passed)},
               artifacts=[p for p in (res.report_path, res.quarantine_path) if p])
    return out


@reported("trace")
def trace_step(ws: Workspace, cfg: RefreshConfig, rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Causal-trace a sample of the feed's facts on the champion: where does the current fact live?"""
    from kedit.tracing import trace_fact

    store = open_lineage(ws)
    lm, _ = load_state_model(ws, cfg, store.champion())
    out_dir = reports_dir(ws, key) / "tracing"
    done = []
    for r in rows[: cfg.trace_sample]:
        res = trace_fact(lm, r["prompt"], r["subject"], target=r.get("target_true") or None,
                         samples=cfg.trace_noise_samples)
        d = res.save(out_dir / str(r["id"]))
        last_subject = res.subject_range[1] - 1
        mlp = res.effects.get("mlp")
        peak = int(torch.tensor(mlp[last_subject]).argmax()) if mlp else None
        done.append({"id": r["id"], "dir": str(d), "target": res.target, "clean_prob": res.clean_prob,
                     "peak_mlp_layer": peak, "seconds": res.seconds})
    RunLog(ws, key).log("tracing", params={"n_traced": len(done)},
                        metrics={f"peak_mlp_layer_{i}": d["peak_mlp_layer"] for i, d in enumerate(done)},
                        artifacts=[out_dir] if done else [])
    return {"traced": done, "dir": str(out_dir)}


@reported("edit")
def edit_step(ws: Workspace, cfg: RefreshConfig, ingest: dict[str, Any]) -> dict[str, Any]:
    """Apply the accepted rows on top of the champion and commit the result as a candidate state.

    Content-addressed: the same feed on the same parent with the same editor yields the same state id,
    so a retry never applies the same edits twice.
    """
    from kedit.editors.base import apply_deltas
    from kedit.editors.hparams import load_hparams
    from kedit.editors.registry import ATTACHERS, get_editor
    from kedit.editors.session import EditSession
    from kedit.feeds.ingest import to_edit_requests
    from kedit.stats.collect import ensure_stats

    rows = ingest["accepted"]
    if not rows:
        return {"state_id": None, "n_edits": 0, "reason": "no rows to apply"}
    parent = ingest["champion"]
    store = open_lineage(ws)
    lm, editor_state = load_state_model(ws, cfg, parent)
    hp = load_hparams(cfg.method, lm, overrides=cfg.hparams_overrides or None)
    layers = hp.resolve_layers(lm.adapter.num_layers)
    # an editor that adds parameters reads no key statistics (its memory set plays their part)
    stats = None if cfg.method in ATTACHERS else ensure_stats(
        lm, layers, ws, cfg.stats_corpus, max_tokens=cfg.stats_max_tokens, seq_len=cfg.stats_seq_len,
        batch_size=cfg.stats_batch_size)
    editor = get_editor(cfg.method, hp, cache_dir=stats.dir if stats else ws.cache_dir)
    requests = to_edit_requests(rows)
    names = [lm.adapter.weight_name(i) for i in layers]
    params = dict(lm.model.named_parameters())
    at_parent = {n: params[n].detach().clone() for n in names}
    t0 = time.perf_counter()
    # the lifelong protocol: sequential batches, each preserving the keys of the ones before it
    result = EditSession(lm, editor, stats, editor_state).apply(requests, cfg.edit_batch_size)
    seconds = time.perf_counter() - t0
    # the state records the summed delta on top of the parent: put the model exactly there
    with torch.no_grad():
        for n, t in at_parent.items():
            params[n].copy_(t)
    apply_deltas(lm.model, result.deltas)
    predictions = _predictions(lm, rows)
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


def _predictions(lm, rows: list[dict[str, Any]], max_new_tokens: int = 6) -> dict[str, str]:
    """Greedy continuations of each edited prompt: recorded with the state for audits and rollbacks."""
    from kedit.evaluation.metrics import greedy_tokens

    prompts = [r["prompt"].format(r["subject"]) for r in rows]
    toks = greedy_tokens(lm, prompts, k=max_new_tokens)
    return {p: lm.tokenizer.decode(t, skip_special_tokens=True) for p, t in zip(prompts, toks.tolist())}


def greedy_answers(lm, prompts: Sequence[str], k: int = 4) -> list[str]:
    """The model's short greedy answer to each prompt: the first word of a ``k``-token continuation."""
    import re

    from kedit.evaluation.metrics import greedy_tokens

    if not prompts:
        return []
    toks = greedy_tokens(lm, list(prompts), k=k)
    out = []
    for row in toks.tolist():
        text = lm.tokenizer.decode(row, skip_special_tokens=True)
        m = re.search(r"[\w][\w'.-]*", text)
        out.append(m.group(0).rstrip(".") if m else (text.strip() or "?"))
    return out


def gate_records(champion_lm, facts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat CounterFact-style records for the gates from feed facts.

    The old answer (when the feed gives none) and each neighbour prompt's answer are what the champion
    says today, so specificity asks exactly "did the neighbours keep the champion's answers?". A fact
    without neighbours borrows its template with another fact's subject (CounterFact's construction).
    """
    from kedit.evaluation.canary import shipped_prompts

    facts = list(facts)
    texts = [f["prompt"].format(f["subject"]) for f in facts]
    locality = []
    for i, f in enumerate(facts):
        neigh = [n for n in (f.get("neighbors") or []) if n.strip()]
        if neigh:
            locality.append(neigh[0])
            continue
        other = next((g["subject"] for g in facts if g["subject"] != f["subject"]), None)
        locality.append(f["prompt"].format(other) if other else shipped_prompts()[i % len(shipped_prompts())])
    answers = greedy_answers(champion_lm, texts + locality)
    current, loc_gt = answers[: len(facts)], answers[len(facts):]
    out = []
    for f, text, cur, loc, gt in zip(facts, texts, current, locality, loc_gt):
        true = f.get("target_true") or cur
        if true.strip().lower() == f["target_new"].strip().lower():
            true = cur if cur.strip().lower() != f["target_new"].strip().lower() else true + " (old)"
        para = [p for p in (f.get("paraphrases") or []) if p.strip()]
        out.append({"case_id": f["id"], "prompt": text, "subject": f["subject"], "target_new": f["target_new"],
                    "ground_truth": true, "rephrase_prompt": para[0] if para else text,
                    "locality_prompt": loc, "locality_ground_truth": gt})
    return out


def without_edited_subjects(canary, facts: Sequence[dict[str, Any]]):
    """Drop canary prompts that ask about a subject being edited (or edited before), or about an old
    answer being replaced: their answers are meant to change, so they are not canaries for these edits."""
    import dataclasses

    words = {w.lower() for f in facts for w in (f.get("subject"), f.get("target_true")) if w and len(w) > 2}
    keep = [i for i, p in enumerate(canary.prompts) if not any(w in p.lower() for w in words)]
    if len(keep) == len(canary.prompts):
        return canary
    return dataclasses.replace(
        canary, prompts=[canary.prompts[i] for i in keep], sources=[canary.sources[i] for i in keep],
        greedy=canary.greedy[keep], logprobs=canary.logprobs[keep],
        continuations=[canary.continuations[i] for i in keep] if canary.continuations else [])


@reported("gate")
def gate_step(ws: Workspace, cfg: RefreshConfig, ingest: dict[str, Any], edit: dict[str, Any]) -> dict[str, Any]:
    """Compare the candidate with the champion on the gate policy; write gate.json / gate.md / gate.png."""
    from kedit.evaluation.canary import build_canary
    from kedit.evaluation.drift import drift_summary
    from kedit.evaluation.gates import GatePolicy, run_gates

    sid = edit["state_id"]
    store = open_lineage(ws)
    champ_lm, _ = load_state_model(ws, cfg, ingest["champion"])
    cand_lm, _ = load_state_model(ws, cfg, sid)
    policy = GatePolicy.from_params(workspace=ws)
    new = gate_records(champ_lm, ingest["accepted"])
    prior_facts = store.fact_records(ingest["champion"])  # less retracted facts: retention must not ask for them
    prior = gate_records(champ_lm, prior_facts) if prior_facts else []
    out_dir = reports_dir(ws, ingest["refresh_key"]) / "gate"
    # the canary suite is what the champion answers today: shipped prompts + past edits' neighbourhoods
    canary = build_canary(champ_lm, edits=prior_facts, k=max(1, policy.canary_k))
    canary = without_edited_subjects(canary, [*ingest["accepted"], *prior_facts])
    canary.save(out_dir / "canary")
    drift = nightly_drift_gate(ws, cfg, policy, store.get(sid).base_model_hash, [*canary.prompts,
                               *(r["locality_prompt"] for r in new)])
    report = run_gates(champ_lm, cand_lm, policy, new_edits=new, prior_edits=prior, canary=canary,
                       progress=False, candidate_state={"id": sid, "parent": ingest["champion"],
                                                        "n_edits": edit.get("n_edits"),
                                                        "feed": Path(ingest["feed"]).name if ingest.get("feed") else None},
                       reference_text=drift.reference_text, drift=drift)
    report.save(out_dir)
    gate = report.to_dict()
    store.record_gate(sid, {"passed": gate["passed"], "checks": gate["checks"], "failed_ids": gate["failed_ids"],
                            "lost_ids": gate["lost_ids"],
                            "drift": drift_summary(report.checks, drift.reference.model_hash)},
                      against=ingest["champion"], report=str(out_dir))
    runlog = RunLog(ws, ingest["refresh_key"])
    runlog.log(
        "evaluation", metrics={c["name"]: c["value"] for c in gate["checks"] if c.get("value") is not None},
        tags={"kedit.gate": "passed" if gate["passed"] else "failed", "kedit.state": sid}, artifacts=[out_dir])
    log_candidate_model(ws, store, sid, runlog, out_dir)
    return {"passed": bool(gate["passed"]), "report_dir": str(out_dir),
            "checks": [{k: c[k] for k in ("name", "value", "threshold", "passed")} for c in gate["checks"]],
            "failed_ids": gate["failed_ids"], "lost_ids": gate["lost_ids"]}


def log_candidate_model(ws: Workspace, store, state_id: str, runlog: RunLog, gate_dir: Path) -> str | None:
    """Every candidate, passed or failed, becomes a loadable MLflow model on the refresh's run, with its
    gate metrics, verdict and report (``lineage.mlflow: false`` in params.yaml turns this off)."""
    from kedit.lineage.ops import lineage_params
    from kedit.lineage.registry import log_state_model

    if not lineage_params(ws).get("mlflow", True):
        return None
    logged = log_state_model(runlog.tracking, store, store.get(state_id), run_id=runlog.parent_id,
                             gate_dir=gate_dir)
    return logged.model_id


def nightly_drift_gate(ws: Workspace, cfg: RefreshConfig, policy, base_hash: str, prompts: Sequence[str]):
    """The drift gate against the lineage's base model: its reference outputs come from the workspace
    cache (the base model is loaded only when a prompt or the reference text is not cached yet)."""
    from kedit.evaluation.drift import DriftPolicy, build_drift_gate, cache_root
    from kedit.evaluation.gates import _reference_text

    drift_policy = DriftPolicy.from_params(workspace=ws)
    wants_text = policy.max_perplexity_increase_pct is not None or drift_policy.max_perplexity_increase_pct is not None
    text = _reference_text(policy) if wants_text else None
    return build_drift_gate(lambda: load_state_model(ws, cfg, None)[0], base_hash, prompts,
                            drift_policy, canary_k=policy.canary_k, text=text,
                            reference_tokens=policy.reference_tokens, cache=cache_root(ws))


@reported("register")
def register_step(ws: Workspace, key: str, state_id: str) -> dict[str, Any]:
    """Register the candidate's logged MLflow model as a model version with the ``candidate`` alias."""
    from kedit.lineage.ops import register_candidate

    store = open_lineage(ws)
    runlog = RunLog(ws, key)
    mv = register_candidate(ws, store, state_id, run_id=runlog.parent_id)
    return {"registered_model": mv.name, "version": str(mv.version), "state_id": state_id,
            "model_uri": f"models:/{mv.name}/{mv.version}", "source": mv.source}


@reported("decide")
def decide_step(ws: Workspace, key: str, state_id: str, approved: bool, by: str, comment: str) -> dict[str, Any]:
    """Record the reviewer's verdict; on approval promote through ``kedit.lineage.ops.promote`` (the
    promotion rules, one lock over the lineage event, git + DVC and the MLflow alias). A rejection
    leaves the champion where it is."""
    from kedit.lineage.ops import approve, promote

    store = open_lineage(ws)
    runlog = RunLog(ws, key)
    if approved:
        approve(store, state_id, by=by, comment=comment)
        out = promote(ws, store, state_id, by=by, comment=comment)
        decision = "promoted"
    else:
        store.reject(state_id, by=by, comment=comment)
        out = {"champion": store.champion()}
        decision = "rejected"
    runlog.log("approval", params={"decision": decision, "by": by, "comment": comment or "-"},
               tags={"kedit.decision": decision, "kedit.approver": by})
    runlog.finish()
    return {"decision": decision, "state_id": state_id, "by": by, "comment": comment,
            "champion": store.champion(), **{k: v for k, v in out.items() if k != "event"}}


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
