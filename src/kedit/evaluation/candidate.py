"""Gate one lineage state against its parent: the one recipe the nightly refresh's gate step and
`kedit lineage gate` both run.

The parent is the "champion" side (for the refresh it is the champion), the checks and thresholds are
the ``gates:`` and ``drift:`` blocks of params.yaml, and the state's own records say what to ask: its
feed facts are the new edits, the facts applied on the parent's path are the earlier ones (retention),
and the canary suite is what the parent answers today, less prompts about subjects whose answers move.
A retraction has no new edits, so the edit checks are skipped; what it must show instead is that the
retracted fact's prompt no longer gives the retracted object (the ``retraction`` check). The reports
(gate.json / gate.md / gate.png, the canary suite) go to the folder the caller names; the verdict is
recorded against the parent, the one the promotion rules count; the caller's MLflow run log, when
given, gets the metrics and the candidate as a loadable model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedit.config import RefreshConfig
from kedit.evaluation.canary import CanarySuite, build_canary
from kedit.evaluation.drift import DriftGate, DriftPolicy, build_drift_gate, cache_root, drift_summary
from kedit.evaluation.gates import (
    Check,
    GatePolicy,
    GateReport,
    fluency_prompt_list,
    gate_check,
    load_reference_text,
    run_gates,
)
from kedit.evaluation.side_scores import SideScoreCache, score_settings
from kedit.lineage.access import load_state_model
from kedit.lineage.retract import RETRACTION, find_fact
from kedit.lineage.runlog import RunLog, log_candidate_model
from kedit.lineage.store import LineageStore
from kedit.models.scoring import greedy_answers, predicts_targets
from kedit.prompts import shipped_prompts
from kedit.workspace import Workspace

RETRACTION_CHECK = "retraction"


@dataclass
class CandidateGate:
    """What gating one state found: the report, the verdict as recorded, the lineage event, the logged
    MLflow model (None: not logged)."""

    report: GateReport
    verdict: dict[str, Any]
    report_dir: Path
    event_seq: int
    retracted: list[str]
    mlflow_model_id: str | None = None


def gate_records(champion_lm, facts: Sequence[dict[str, Any]], neighbours: bool = True) -> list[dict[str, Any]]:
    """Flat CounterFact-style records for the gates from feed facts.

    The old answer (when the feed gives none) and each neighbour prompt's answer are what the champion
    says today, so specificity asks exactly "did the neighbours keep the champion's answers?". A fact
    without neighbours borrows its template with another fact's subject (CounterFact's construction).
    ``neighbours=False``: the records retention reads (prompt, new and old object), with the champion
    asked only for the old answers the feed does not give.
    """
    facts = list(facts)
    texts = [f["prompt"].format(f["subject"]) for f in facts]
    if not neighbours:  # the same old answers as below, the champion asked only where they need it
        ask = [i for i, f in enumerate(facts) if not f.get("target_true") or _same(f["target_true"], f["target_new"])]
        said = dict(zip(ask, greedy_answers(champion_lm, [texts[i] for i in ask]))) if ask else {}
        return [{"case_id": f["id"], "prompt": text, "subject": f["subject"], "target_new": f["target_new"],
                 "ground_truth": _old_answer(f, said.get(i))} for i, (f, text) in enumerate(zip(facts, texts))]
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
        para = [p for p in (f.get("paraphrases") or []) if p.strip()]
        out.append({"case_id": f["id"], "prompt": text, "subject": f["subject"], "target_new": f["target_new"],
                    "ground_truth": _old_answer(f, cur), "rephrase_prompt": para[0] if para else text,
                    "locality_prompt": loc, "locality_ground_truth": gt})
    return out


def _same(a: str, b: str) -> bool:
    return a.strip().lower() == b.strip().lower()


def _old_answer(fact: dict[str, Any], current: str | None) -> str:
    """The old object a gate scores the new one against: the feed's ``target_true``, else the champion's
    ``current`` answer; where that is the new object itself, the champion's answer if it differs, else
    the object marked " (old)". ``current`` may be None only where the feed's old object differs from
    the new one."""
    true = fact.get("target_true") or current
    if _same(true, fact["target_new"]):
        true = current if not _same(current, fact["target_new"]) else true + " (old)"
    return true


def without_edited_subjects(canary: CanarySuite, facts: Sequence[dict[str, Any]]) -> CanarySuite:
    """Drop canary prompts that ask about a subject being edited (or edited before), or about an old
    answer being replaced: their answers are meant to change, so they are not canaries for these edits."""
    words = {w.lower() for f in facts for w in (f.get("subject"), f.get("target_true")) if w and len(w) > 2}
    keep = [i for i, p in enumerate(canary.prompts) if not any(w in p.lower() for w in words)]
    if len(keep) == len(canary.prompts):
        return canary
    return dataclasses.replace(
        canary, prompts=[canary.prompts[i] for i in keep], sources=[canary.sources[i] for i in keep],
        greedy=canary.greedy[keep], logprobs=canary.logprobs[keep],
        continuations=[canary.continuations[i] for i in keep] if canary.continuations else [])


def lineage_drift_gate(ws: Workspace, cfg: RefreshConfig, policy: GatePolicy, base_hash: str,
                       prompts: Sequence[str]) -> DriftGate:
    """The drift gate against the lineage's base model: its reference outputs come from the workspace
    cache (the base model is loaded only when a prompt or the reference text is not cached yet)."""
    drift_policy = DriftPolicy.from_params(workspace=ws)
    wants_text = policy.max_perplexity_increase_pct is not None or drift_policy.max_perplexity_increase_pct is not None
    text = load_reference_text(policy) if wants_text else None
    return build_drift_gate(lambda: load_state_model(ws, cfg.model, None, cfg.device)[0], base_hash, prompts,
                            drift_policy, canary_k=policy.canary_k, text=text,
                            reference_tokens=policy.reference_tokens, cache=cache_root(ws))


def retraction_check(parent_lm: Any, candidate_lm: Any, records: Sequence[dict], threshold: float | None) -> Check:
    """Share of retracted facts whose prompt no longer gives their ``target_new`` under greedy decoding.

    ``before`` is the same share on the parent (0 when every edit had taken there). A fact whose edit
    never took on the parent passes trivially; the detail says so."""
    rows = [r for r in records if r and r.get("prompt") and r.get("subject") and r.get("target_new")]
    if not rows:
        return gate_check(RETRACTION_CHECK, None, threshold, "min",
                          detail="the retracted facts' records (prompt, subject, target_new) are not in the lineage")
    held = predicts_targets(parent_lm, rows)
    still = predicts_targets(candidate_lm, rows)
    prompts = [r["prompt"].format(r["subject"]) for r in rows]
    was, now = greedy_answers(parent_lm, prompts), greedy_answers(candidate_lm, prompts)
    parts = []
    for r, h, s, a, b in zip(rows, held, still, was, now):
        state = "STILL gives it" if s else ("gone" if h else "gone (the parent did not give it either)")
        parts.append(f"{r['id']}: {r['target_new']!r} {state}; answer {a!r} -> {b!r}")
    gone = sum(not s for s in still) / len(rows)
    return gate_check(RETRACTION_CHECK, gone, threshold, "min", sum(not h for h in held) / len(rows), gone,
                      threshold, "; ".join(parts))


def gate_candidate(ws: Workspace, store: LineageStore, state_id: str, cfg: RefreshConfig, out_dir: Path,
                   runlog: RunLog | None = None, by: str = "kedit-gate") -> CandidateGate:
    """Gate state ``state_id`` against its parent, write the reports to ``out_dir``, record the verdict
    (by ``by``), and, with a ``runlog``, log the metrics and the candidate model to MLflow.

    ``cfg`` gives the model and the device the two sides are loaded on."""
    state = store.get(state_id)
    sid, parent = state.id, state.parent
    retracted = [str(f) for f in state.feed.get("retracted", []) or []]
    policy = GatePolicy.from_params(workspace=ws)
    parent_lm, _ = load_state_model(ws, cfg.model, parent, cfg.device)
    cand_lm, _ = load_state_model(ws, cfg.model, sid, cfg.device)

    new_facts = list(state.feed.get("facts", []) or [])  # this state's own edits
    gone = set(retracted)
    # the parent's facts (less retracted ones): retention must not ask for a fact this state removes
    prior_facts = [f for f in store.fact_records(parent) if str(f.get("id")) not in gone]
    retracted_records = [r for r in (find_fact(store, parent, f).record for f in retracted) if r] if parent else []
    new = gate_records(parent_lm, new_facts) if new_facts else []
    prior = gate_records(parent_lm, prior_facts, neighbours=False) if prior_facts else []
    # the canary suite is what the parent answers today, less prompts about subjects whose answers move
    canary = build_canary(parent_lm, edits=prior_facts, k=max(1, policy.canary_k))
    canary = without_edited_subjects(canary, [*new_facts, *prior_facts, *retracted_records])
    canary.save(out_dir / "canary")
    drift = lineage_drift_gate(ws, cfg, policy, state.base_model_hash,
                               [*canary.prompts, *(r["locality_prompt"] for r in new)])
    kind = state.feed.get("kind")
    feed = (f"retraction of {', '.join(retracted)}" if kind == RETRACTION
            else Path(state.feed["path"]).name if state.feed.get("path") else None)
    # the parent's perplexity and fluency were measured when it was gated itself (same settings)
    scores = SideScoreCache(ws.cache_dir / "side-scores")
    settings = score_settings(drift.reference_text, policy.reference_tokens, fluency_prompt_list(policy),
                              policy.fluency_tokens, policy.seed, cfg.device,
                              str(next(cand_lm.model.parameters()).dtype)).key()
    parent_name = parent or f"base-{state.base_model_hash[:16]}"
    report = run_gates(parent_lm, cand_lm, policy, new_edits=new, prior_edits=prior, canary=canary,
                       progress=False, reference_text=drift.reference_text, drift=drift,
                       candidate_state={"id": sid, "parent": parent, "feed": feed,
                                        "n_edits": None if kind == RETRACTION else state.n_edits},
                       champion_scores=scores.get(parent_name, settings))
    given = set(report.scores.get("champion_given", []))  # read from the parent's entry: nothing to write back
    scores.put(parent_name, settings, {k: v for k, v in report.scores.get("champion", {}).items() if k not in given})
    scores.put(sid, settings, report.scores.get("candidate", {}))
    champion = store.champion()
    if parent != champion:
        report.notes.append(f"the parent {(parent or 'base')[:12]} is not the champion "
                            f"({champion[:12] if champion else 'the base model'}): the \"champion\" columns are the parent's")
    if state.n_edits and not new_facts:
        report.notes.append(f"{state.n_edits} edits of this state have no records in the lineage (feed facts): "
                            f"the edit checks could not score them")
    if retracted:
        report.notes.append(f"retraction of {', '.join(retracted)} by {state.feed.get('by')}: "
                            f"{state.feed.get('reason')} (no new edits: the edit checks are skipped; the "
                            f"retraction check asks that the retracted object is gone, at gates.min_efficacy)")
        report.checks.append(retraction_check(parent_lm, cand_lm, retracted_records, policy.min_efficacy))
        report.passed = all(c.passed for c in report.checks)
    report.save(out_dir)
    gate = report.to_dict()
    verdict = {"passed": gate["passed"], "checks": gate["checks"], "failed_ids": gate["failed_ids"],
               "lost_ids": gate["lost_ids"], "drift": drift_summary(report.checks, drift.reference.model_hash)}
    if retracted:
        verdict["retracted"] = retracted
    ev = store.record_gate(sid, verdict, against=parent, by=by, report=ws.rel(out_dir))
    model_id = None
    if runlog is not None:
        runlog.log("evaluation",
                   metrics={c["name"]: c["value"] for c in gate["checks"] if c.get("value") is not None},
                   tags={"kedit.gate": "passed" if gate["passed"] else "failed", "kedit.state": sid},
                   artifacts=[out_dir])
        model_id = log_candidate_model(ws, store, sid, runlog, out_dir)
    return CandidateGate(report=report, verdict=verdict, report_dir=out_dir, event_seq=ev.seq,
                         retracted=retracted, mlflow_model_id=model_id)
