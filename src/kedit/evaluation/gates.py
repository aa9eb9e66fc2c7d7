"""Promotion gates: may a candidate edit state replace the champion?

Every check has a value, a threshold (from the ``gates:`` block of params.yaml) and a verdict; the
candidate passes only if all enabled checks pass. Facts that did not take are listed by id, never
counted as applied. The core, :func:`run_gates`, takes loaded models so the nightly flow can call it
with in-memory edited models; ``kedit gate`` loads two store entries and calls it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from kedit.atomic import write_json_atomic, write_text_atomic
from kedit.console import make_console, save_fig
from kedit.evaluation import metrics as M
from kedit.evaluation.answers import ModelAnswers
from kedit.evaluation.canary import CanarySuite, build_canary, compare, shipped_prompts
from kedit.models.store import LoadedModel


def check_settings(cls, data: dict, where: str, kind: str, text_keys: tuple[str, ...] = (),
                   allow_bool: bool = True) -> None:
    """A policy block's keys are ``cls``'s fields and its values numbers or null (``text_keys`` aside);
    the error names the block, the key and the known keys."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown {kind} settings {unknown}; known: {sorted(names)}")
    for k, v in data.items():
        if k in text_keys or v is None:
            continue
        if (isinstance(v, bool) and not allow_bool) or not isinstance(v, int | float):
            raise ValueError(f"{where}.{k}: expected a number or null, got {v!r}")


@dataclass
class GatePolicy:
    """Thresholds of the promotion gate. ``None`` disables a check. Defaults suit SmolLM2-135M;
    each is documented in params.yaml's ``gates:`` block and docs/tracing-evaluation-gates.md."""

    min_efficacy: float | None = 0.9  # fraction of new edits whose new target beats the old one
    min_generalization: float | None = 0.5  # same on the paraphrase prompts
    max_specificity_drop: float | None = 0.1  # champion NS - candidate NS on the new edits' neighbours
    max_neighbourhood_kl: float | None = 0.05  # mean next-token KL(champion || candidate), nats
    min_canary_agreement: float | None = 0.9  # canary prompts whose first canary_k greedy tokens are unchanged
    max_perplexity_increase_pct: float | None = 5.0  # on the reference text slice
    max_fluency_drop: float | None = 32.0  # generation entropy x100: 5% of SmolLM2's ~636
    min_retention: float | None = 0.9  # earlier edits that held under the champion and still hold
    # new edits whose greedy continuation of the edit prompt begins with the new object (free generation,
    # kedit.evaluation.freegen); paraphrase and neighbourhood shares are reported beside it
    min_free_generation: float | None = 0.8
    freegen_tokens: int = 8  # greedy tokens generated per prompt for the free-generation check
    canary_k: int = 1
    fluency_prompts: int = 8
    fluency_tokens: int = 100
    reference_text: str = "wiki-summaries-en:heldout"  # corpus spec or a text file
    reference_tokens: int = 4096
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict, where: str = "gates") -> GatePolicy:
        check_settings(cls, data, where, "gate", text_keys=("reference_text",))
        if data.get("freegen_tokens") is not None and data["freegen_tokens"] < 1:
            raise ValueError(f"{where}.freegen_tokens: the free-generation check needs at least 1 greedy token, "
                             f"got {data['freegen_tokens']} (set min_free_generation: null to disable the check)")
        return cls(**data)

    @classmethod
    def from_params(cls, path: str | Path | None = None, workspace=None) -> GatePolicy:
        """The ``gates:`` block of params.yaml, found by :func:`kedit.params.find_params`."""
        from kedit.params import load_params

        params = load_params(path, workspace)
        return cls.from_dict(params.block("gates"), where=f"{params.source}: gates")


@dataclass
class Check:
    name: str
    value: float | None
    threshold: float | None
    passed: bool
    direction: str  # "min": value >= threshold; "max": value <= threshold
    before: float | None = None  # the underlying metric on the champion
    after: float | None = None  # ... on the candidate
    bound: float | None = None  # the threshold in the underlying metric's scale (for the chart)
    detail: str = ""
    skipped: bool = False
    against: str = "champion"  # what "before" is: the champion, or "base" for the drift checks (drift.py)


def gate_check(name: str, value: float | None, threshold: float | None, direction: str, before: float | None = None,
               after: float | None = None, bound: float | None = None, detail: str = "") -> Check:
    """A check's verdict: skipped when disabled (no threshold) or nothing was measured, else value vs threshold."""
    if threshold is None:
        return Check(name, value, None, True, direction, before, after, bound, detail or "disabled", skipped=True)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Check(name, None, threshold, True, direction, before, after, bound, detail or "nothing to measure",
                     skipped=True)
    ok = value >= threshold if direction == "min" else value <= threshold
    return Check(name, float(value), float(threshold), bool(ok), direction, before, after, bound, detail)


@dataclass
class GateReport:
    passed: bool
    checks: list[Check]
    champion: dict
    candidate: dict
    failed_ids: list = field(default_factory=list)  # new edits that did not take (efficacy failures)
    not_generalized_ids: list = field(default_factory=list)
    lost_ids: list = field(default_factory=list)  # earlier edits that no longer hold
    canary_changed: list[dict] = field(default_factory=list)
    policy: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # the edit state under review: {"id", "parent" (None: the base model), "n_edits", "feed"}; empty
    # when two model-store entries are compared directly (``kedit gate``)
    candidate_state: dict = field(default_factory=dict)
    # each side's perplexity and generation entropy ({"champion": {..}, "candidate": {..}}), and which
    # of the champion's were given rather than computed ("champion_given")
    scores: dict = field(default_factory=dict)

    @property
    def reasons(self) -> list[str]:
        """Why the gate failed, one line per failed check, naming the check and what it was compared with."""
        return [f"{c.name} (against {c.against}): {_fmt(c.value)} "
                f"{'<' if c.direction == 'min' else '>'} {_fmt(c.threshold)}" + (f"; {c.detail}" if c.detail else "")
                for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checks"] = [asdict(c) for c in self.checks]
        return d

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "gate.json", self.to_dict())
        write_text_atomic(out / "gate.md", gate_markdown(self))
        plot_gate(self, out / "gate.png")
        return out


def as_counterfact(rec: dict, k: int, where: str, efficacy_only: bool = False) -> dict:
    """A flat CounterFact record from a flat record or an edit-request dict (template + subject)
    (``efficacy_only``: only the fields efficacy reads are required, as retention asks)."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}[{k}]: expected a dict, got {type(rec).__name__}")
    r = dict(rec)
    if "{}" in str(r.get("prompt", "")) and r.get("subject"):
        r["prompt"] = r["prompt"].replace("{}", r["subject"])
    r.setdefault("case_id", r.get("id", k))
    if "ground_truth" not in r and r.get("target_true"):
        r["ground_truth"] = r["target_true"]
    if "rephrase_prompt" not in r and r.get("paraphrases"):
        r["rephrase_prompt"] = r["paraphrases"][0]
    M.check_counterfact([r], where=f"{where}[{k}]", efficacy_only=efficacy_only)
    return r


def load_reference_text(policy: GatePolicy) -> str | None:
    """The perplexity reference text of ``policy`` (a file, or a corpus spec's held-out slice); None when unavailable."""
    spec = policy.reference_text
    p = Path(spec)
    if p.is_file():
        return p.read_text(encoding="utf-8")
    try:
        from kedit.stats.corpus import heldout_text

        return heldout_text(max_chars=policy.reference_tokens * 8, spec=spec)
    except (ImportError, FileNotFoundError, ValueError):
        return None


def _free_generation_check(champion: LoadedModel, candidate: LoadedModel, new: list[dict],
                           policy: GatePolicy) -> Check:
    """The share of new edits whose greedy continuation of the edit prompt begins with the new object
    (champion's beside it), with the paraphrase and neighbourhood shares in the detail."""
    from kedit.evaluation.freegen import evaluate_free_generation

    cols = ([r["prompt"] for r in new], [r["rephrase_prompt"] for r in new], [r["locality_prompt"] for r in new],
            [r["target_new"] for r in new])
    b = evaluate_free_generation(champion, *cols, max_new_tokens=policy.freegen_tokens)
    a = evaluate_free_generation(candidate, *cols, max_new_tokens=policy.freegen_tokens)
    return gate_check("free_generation", a["gen_efficacy"], policy.min_free_generation, "min", b["gen_efficacy"],
                      a["gen_efficacy"], policy.min_free_generation,
                      f"{policy.freegen_tokens} greedy tokens: edit prompts begin with the new object "
                      f"{a['gen_efficacy']:.2f} (contain {a['gen_efficacy_contains']:.2f}), paraphrases "
                      f"{a['gen_generalization']:.2f} ({a['gen_generalization_contains']:.2f}), neighbours free of it "
                      f"{a['gen_specificity']:.2f} ({a['gen_specificity_contains']:.2f}; champion "
                      f"{b['gen_specificity']:.2f})")


def run_gates(champion: LoadedModel, candidate: LoadedModel, policy: GatePolicy | None = None,
              new_edits: Sequence[dict] = (), prior_edits: Sequence[dict] = (), canary: CanarySuite | None = None,
              reference_text: str | None = None, fluency_prompts: Sequence[str] | None = None,
              progress: bool = True, candidate_state: dict | None = None, drift=None,
              champion_scores: dict[str, float] | None = None) -> GateReport:
    """Compare ``candidate`` with ``champion`` on every check of ``policy``.

    ``new_edits``: the records this candidate is meant to add; ``prior_edits``: the records already in
    the lineage (retention); ``canary``: the champion's stored suite (built on the fly when ``None``);
    ``candidate_state``: the lineage state under review (id, parent, n_edits, feed), named in the reports.
    ``drift``: a :class:`kedit.evaluation.drift.DriftGate` adds the checks against the base model.
    ``champion_scores``: the champion's ``perplexity`` / ``generation_entropy`` already measured on this
    very text and these fluency prompts (:mod:`kedit.evaluation.side_scores`), used instead of scoring it.
    """
    policy = policy or GatePolicy()
    t0 = time.perf_counter()
    console = make_console(stderr=True, quiet=not progress)
    new = [as_counterfact(r, k, "new_edits") for k, r in enumerate(new_edits)]
    prior = [as_counterfact(r, k, "prior_edits", efficacy_only=True) for k, r in enumerate(prior_edits)]
    checks: list[Check] = []
    notes: list[str] = []
    rep = GateReport(passed=False, checks=checks, policy=asdict(policy), notes=notes,
                     champion={"slug": champion.slug, "model_hash": champion.manifest.model_hash},
                     candidate={"slug": candidate.slug, "model_hash": candidate.manifest.model_hash},
                     candidate_state=dict(candidate_state or {}))
    answers = ModelAnswers(candidate)  # the candidate's canary / neighbourhood answers, each scored once
    known = dict(champion_scores or {})
    sides: dict[str, dict] = {"champion": {}, "candidate": {}, "champion_given": []}
    rep.scores = sides

    def champion_side(name: str, compute):
        if name in known:
            sides["champion_given"].append(name)
            value = float(known[name])
        else:
            value = compute()
        sides["champion"][name] = value
        return value

    with console.status("gate: scoring edits") as status:
        # new edits: efficacy, generalization, specificity (champion = before, candidate = after)
        if new:
            before = M.evaluate_counterfact(champion, new)
            after = M.evaluate_counterfact(candidate, new)
            rep.failed_ids = after["failed_ids"]
            rep.not_generalized_ids = [i for i, ok in zip(after["ids"], after["generalization_ok"]) if not ok]
            checks.append(gate_check("efficacy", after["efficacy"], policy.min_efficacy, "min", before["efficacy"],
                                 after["efficacy"], policy.min_efficacy,
                                 f"{len(rep.failed_ids)} of {len(new)} new edits did not take"))
            checks.append(gate_check("generalization", after["generalization"], policy.min_generalization, "min",
                                 before["generalization"], after["generalization"], policy.min_generalization))
            drop = before["specificity"] - after["specificity"]
            checks.append(gate_check("specificity_drop", drop, policy.max_specificity_drop, "max", before["specificity"],
                                 after["specificity"],
                                 None if policy.max_specificity_drop is None
                                 else before["specificity"] - policy.max_specificity_drop,
                                 f"NS {before['specificity']:.3f} -> {after['specificity']:.3f}"))
            if policy.min_free_generation is not None:
                status.update("gate: free generation")
                checks.append(_free_generation_check(champion, candidate, new, policy))
            else:
                checks.append(gate_check("free_generation", None, None, "min", detail="disabled"))
        else:
            for name, thr, d in (("efficacy", policy.min_efficacy, "min"),
                                 ("generalization", policy.min_generalization, "min"),
                                 ("specificity_drop", policy.max_specificity_drop, "max"),
                                 ("free_generation", policy.min_free_generation, "min")):
                checks.append(gate_check(name, None, thr, d, detail="no new edits"))

        # retention of earlier edits: those that held under the champion must still hold
        if prior:
            status.update("gate: retention of earlier edits")
            b = M.evaluate_efficacy(champion, prior)
            a = M.evaluate_efficacy(candidate, prior)
            held = [i for i, ok in enumerate(b["efficacy_ok"]) if ok]
            kept = [i for i in held if a["efficacy_ok"][i]]
            rep.lost_ids = [b["ids"][i] for i in held if not a["efficacy_ok"][i]]
            value = len(kept) / len(held) if held else None
            checks.append(gate_check("retention", value, policy.min_retention, "min", b["efficacy"], a["efficacy"],
                                 policy.min_retention, f"{len(kept)} of {len(held)} earlier edits still hold"))
        else:
            checks.append(gate_check("retention", None, policy.min_retention, "min", detail="no earlier edits"))

        # canary suite: greedy agreement, and the next-token KL together with the edits' neighbours
        status.update("gate: canary suite")
        if canary is None:
            canary = build_canary(champion, edits=prior, k=max(1, policy.canary_k))
            notes.append(f"canary suite built on the fly from the champion ({len(canary.prompts)} prompts)")
        elif canary.model_hash != champion.manifest.model_hash:
            notes.append(f"canary suite was recorded on model {canary.model_hash[:12]}, champion is "
                         f"{champion.manifest.model_hash[:12]}: agreement is measured against the stored answers")
        cmp = compare(canary, candidate, k=policy.canary_k, answers=answers)
        rep.canary_changed = cmp.changed
        checks.append(gate_check("canary_agreement", cmp.agreement, policy.min_canary_agreement, "min", 1.0,
                             cmp.agreement, policy.min_canary_agreement,
                             f"{len(cmp.changed)} of {len(canary.prompts)} canary answers changed"))
        kl_rows = [torch.tensor(cmp.kl_per_prompt, dtype=torch.float64)]
        loc = list(dict.fromkeys(r["locality_prompt"] for r in new))
        if loc:
            kl_rows.append(M.kl_rows(M.next_token_logprobs(champion, loc), answers.logprobs(loc)))
        nkl = float(torch.cat(kl_rows).mean())
        checks.append(gate_check("neighbourhood_kl", nkl, policy.max_neighbourhood_kl, "max", 0.0, nkl,
                             policy.max_neighbourhood_kl,
                             f"mean over {len(loc)} neighbourhood + {len(canary.prompts)} canary prompts"))

        # perplexity of a reference text slice
        status.update("gate: perplexity")
        text = reference_text if reference_text is not None else (
            load_reference_text(policy) if policy.max_perplexity_increase_pct is not None else None)
        if text:
            p0 = champion_side("perplexity", lambda: M.perplexity(champion, text, max_tokens=policy.reference_tokens))
            p1 = sides["candidate"]["perplexity"] = M.perplexity(candidate, text, max_tokens=policy.reference_tokens)
            inc = 100.0 * (p1 / p0 - 1.0)
            thr = policy.max_perplexity_increase_pct
            checks.append(gate_check("perplexity_increase_pct", inc, thr, "max", p0, p1,
                                 None if thr is None else p0 * (1 + thr / 100), f"PPL {p0:.2f} -> {p1:.2f}"))
        else:
            checks.append(gate_check("perplexity_increase_pct", None, policy.max_perplexity_increase_pct, "max",
                                 detail=f"no reference text ({policy.reference_text!r} unavailable)"))

        # fluency: generation entropy on a fixed prompt list from a fixed seed
        if policy.max_fluency_drop is not None and policy.fluency_prompts > 0:
            status.update("gate: fluency (generation)")
            fp = fluency_prompt_list(policy, fluency_prompts)
            g0 = champion_side("generation_entropy", lambda: M.generation_entropy(
                champion, fp, max_new_tokens=policy.fluency_tokens, seed=policy.seed))
            g1 = sides["candidate"]["generation_entropy"] = M.generation_entropy(
                candidate, fp, max_new_tokens=policy.fluency_tokens, seed=policy.seed)
            checks.append(gate_check("fluency_drop", g0 - g1, policy.max_fluency_drop, "max", g0, g1,
                                 g0 - policy.max_fluency_drop, f"GE {g0:.1f} -> {g1:.1f} on {len(fp)} prompts"))
        else:
            checks.append(gate_check("fluency_drop", None, policy.max_fluency_drop, "max", detail="disabled"))

        if drift is not None:  # cumulative drift: the candidate against the base model (evaluation/drift.py)
            status.update("gate: drift against the base model")
            checks.extend(drift.checks(candidate, list(checks), gate_text=text, gate_tokens=policy.reference_tokens,
                                       answers=answers))

    if sides["champion_given"]:
        notes.append(f"the champion's {' and '.join(sides['champion_given'])} were measured at its own gate on "
                     f"the same text, prompts and settings, and read from there")
    rep.passed = all(c.passed for c in checks)
    rep.seconds = time.perf_counter() - t0
    return rep


def fluency_prompt_list(policy: GatePolicy, fluency_prompts: Sequence[str] | None = None) -> list[str]:
    """The prompts the fluency check generates from: the caller's, or the policy's share of the shipped list."""
    return list(fluency_prompts) if fluency_prompts is not None else shipped_prompts()[: policy.fluency_prompts]


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def subject_line(rep: GateReport) -> str:
    """What is under review, in a few words: the candidate state (id, parent, edits), else the models."""
    st = rep.candidate_state
    if st.get("id"):
        parent = str(st["parent"])[:12] if st.get("parent") else "base model"
        edits = f", {st['n_edits']} edits" if st.get("n_edits") is not None else ""
        return f"state {str(st['id'])[:12]} (parent {parent}{edits})"
    cand, champ = rep.candidate, rep.champion
    if cand["slug"] == champ["slug"]:
        return f"{cand['slug']} {cand['model_hash'][:12]} vs {champ['model_hash'][:12]}"
    return f"{cand['slug']} vs {champ['slug']}"


def subject_details(rep: GateReport) -> list[str]:
    """The header lines of gate.md: the candidate state, its parent (what it is compared with), the model."""
    st = rep.candidate_state
    model = f"`{rep.candidate['slug']}` (base {rep.candidate['model_hash'][:12]})"
    if st.get("id"):
        out = [f"candidate state: `{st['id']}`",
               f"parent (compared with): {'`' + str(st['parent']) + '`' if st.get('parent') else 'the base model'}"]
        if st.get("n_edits") is not None:
            out.append(f"edits: {st['n_edits']}" + (f" from `{st['feed']}`" if st.get("feed") else ""))
        return [*out, f"model: {model}"]
    return [f"candidate: {model}",
            f"champion: `{rep.champion['slug']}` ({rep.champion['model_hash'][:12]})"]


def gate_markdown(rep: GateReport) -> str:
    verdict = "PASSED" if rep.passed else "FAILED"
    lines = [f"# Promotion gate {verdict}: {subject_line(rep)}", "", *[f"- {x}" for x in subject_details(rep)],
             f"- {sum(c.passed and not c.skipped for c in rep.checks)} of {len(rep.checks)} checks passed "
             f"({sum(c.skipped for c in rep.checks)} skipped); {rep.seconds:.1f} s", "",
             "| check | value | threshold | champion | candidate | verdict | detail |",
             "|---|---|---|---|---|---|---|"]
    for c in [c for c in rep.checks if c.against == "champion"]:
        op = ">=" if c.direction == "min" else "<="
        verdict_c = "skipped" if c.skipped else ("pass" if c.passed else "**FAIL**")
        thr = f"{op} {_fmt(c.threshold)}" if c.threshold is not None else "–"
        lines.append(f"| {c.name} | {_fmt(c.value)} | {thr} | {_fmt(c.before)} | {_fmt(c.after)} | {verdict_c} "
                     f"| {c.detail} |")
    lines += _drift_section(rep)
    lines += ["", "![value vs threshold](gate.png)", ""]
    if rep.failed_ids:
        lines += [f"## Edits that did not take ({len(rep.failed_ids)})", "",
                  "These are NOT applied facts: the new target does not beat the old one on the edit prompt.", "",
                  ", ".join(f"`{i}`" for i in rep.failed_ids), ""]
    if rep.not_generalized_ids:
        lines += [f"## Edits that do not generalize to their paraphrase ({len(rep.not_generalized_ids)})", "",
                  ", ".join(f"`{i}`" for i in rep.not_generalized_ids), ""]
    if rep.lost_ids:
        lines += [f"## Earlier edits no longer holding ({len(rep.lost_ids)})", "",
                  ", ".join(f"`{i}`" for i in rep.lost_ids), ""]
    if rep.canary_changed:
        lines += [f"## Canary answers that changed ({len(rep.canary_changed)})", "", "| prompt | before | after |",
                  "|---|---|---|"]
        for c in rep.canary_changed[:50]:
            esc = [str(c[k]).replace("|", "\\|").replace("\n", " ") for k in ("prompt", "before", "after")]
            lines.append(f"| {esc[0]} | {esc[1]!r} | {esc[2]!r} |")
        lines.append("")
    if rep.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in rep.notes] + [""]
    return "\n".join(lines)


def _drift_section(rep: GateReport) -> list[str]:
    """The checks against the base model (cumulative drift), as their own table after the champion's."""
    drift = [c for c in rep.checks if c.against == "base"]
    if not drift:
        return []
    lines = ["", "## Against base (cumulative drift since the unedited model)", "",
             "| check | value | threshold | base | candidate | verdict | detail |", "|---|---|---|---|---|---|---|"]
    for c in drift:
        op = ">=" if c.direction == "min" else "<="
        verdict_c = "skipped" if c.skipped else ("pass" if c.passed else "**FAIL**")
        thr = f"{op} {_fmt(c.threshold)}" if c.threshold is not None else "–"
        lines.append(f"| {c.name} | {_fmt(c.value)} | {thr} | {_fmt(c.before)} | {_fmt(c.after)} | {verdict_c} "
                     f"| {c.detail} |")
    return lines
# How each check reads on the chart: a "max" check is a drop or an increase with an upper bound, drawn as
# that single number against its threshold; a "min" check is a level the candidate must reach, drawn
# next to the champion's level.
CHANGE_LABELS = {"specificity_drop": "NS drop", "neighbourhood_kl": "KL (nats)",
                 "perplexity_increase_pct": "PPL increase (%)", "fluency_drop": "GE drop (x100)",
                 "drift_perplexity_increase_pct": "PPL vs base (%)", "drift_neighbourhood_kl": "KL vs base (nats)"}


def plot_gate(rep: GateReport, path: str | Path) -> None:
    """One panel per check: for a drop / increase, its size against the threshold; for a level, the
    champion's and the candidate's against the threshold; a skipped check says so and why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checks = rep.checks
    cols = 4
    rows = math.ceil(len(checks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.7 * rows + 0.5), squeeze=False)
    for ax in axes.flat[len(checks):]:
        ax.axis("off")
    for ax, c in zip(axes.flat, checks):
        _panel(ax, c)
    fig.suptitle(f"Promotion gate {'PASSED' if rep.passed else 'FAILED'}: {subject_line(rep)}\n"
                 f"dashed line: threshold; green: pass, red: fail", fontsize=9)
    fig.tight_layout()
    save_fig(fig, path)


def panel_spec(c: Check) -> dict:
    """What a check's panel shows: ``kind`` (skipped / change / level), the bars (label, value), the
    threshold and a caption. A change (drop / increase) is one bar, the change itself, against its
    threshold; a level is the reference's (champion, or base for a drift check) and the candidate's values
    against the threshold."""
    if c.skipped:
        return {"kind": "skipped", "bars": [], "threshold": None,
                "caption": f"skipped ({c.detail})" if c.detail else "skipped"}
    if c.direction == "max":
        caption = (f"{c.against} {_fmt(c.before)} -> candidate {_fmt(c.after)}"
                   if c.before is not None and c.after is not None else c.detail)
        return {"kind": "change", "bars": [(CHANGE_LABELS.get(c.name, c.name), c.value)],
                "threshold": c.threshold, "caption": caption}
    before = c.before if c.before is not None else float("nan")
    return {"kind": "level", "bars": [(c.against, before), ("candidate", c.value)], "threshold": c.threshold,
            "caption": c.detail}


def _panel(ax, c: Check) -> None:
    spec = panel_spec(c)
    op = ">=" if c.direction == "min" else "<="
    if spec["kind"] == "skipped":
        ax.set_xticks([]), ax.set_yticks([])
        for side in ax.spines.values():
            side.set_color("lightgray")
        ax.set_title(c.name, fontsize=8, color="gray")
        ax.text(0.5, 0.5, spec["caption"].replace(" (", "\n("), ha="center", va="center", fontsize=9,
                color="gray", transform=ax.transAxes)
        return
    colour = "tab:green" if c.passed else "tab:red"
    labels = [b[0] for b in spec["bars"]]
    vals = [b[1] for b in spec["bars"]]
    thr = spec["threshold"]
    if spec["kind"] == "change":
        bars = ax.bar(labels, vals, color=colour, width=0.5)
        top, bottom = max(vals[0], thr), min(0.0, vals[0])
        span = (top - bottom) or 1.0
        ax.set_ylim(bottom - (0.2 if bottom < 0 else 0.05) * span, top + 0.15 * span)  # room for the labels
        ax.axhline(0, color="gray", lw=0.5)
    else:
        bars = ax.bar(labels, vals, color=["tab:blue", colour], width=0.6)
        ax.set_ylim(0, max(1.0, *(v for v in vals if v == v)) * 1.12)
    ax.bar_label(bars, labels=[_fmt(v) for v in vals], fontsize=7, padding=1)  # a zero stays visible
    ax.axhline(thr, color="black", ls="--", lw=1)
    if spec["caption"]:
        ax.set_xlabel(spec["caption"], fontsize=7)
    verdict = "pass" if c.passed else "FAIL"
    ax.set_title(f"{c.name}\n{_fmt(c.value)} {op} {_fmt(c.threshold)}: {verdict}", fontsize=8,
                 color="black" if c.passed else "tab:red")
    ax.tick_params(labelsize=7)
