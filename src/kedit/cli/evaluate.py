"""`kedit canary build`, `kedit gate` and `kedit evaluate`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kedit.cli import CLIError, workspace


def register(sub) -> None:
    c = sub.add_parser("canary", help="the canary suite: prompts the champion answers today")
    cs = c.add_subparsers(dest="canary_cmd", required=True)
    b = cs.add_parser("build", help="record a model's greedy continuation and next-token distribution")
    b.add_argument("--model", required=True, help="store slug or model directory (the champion)")
    b.add_argument("--edits", default=None, help="JSON/JSONL of past edits whose neighbourhood prompts join the suite")
    b.add_argument("--prompts", default=None, help="prompt list (one a line) instead of the shipped one")
    b.add_argument("--k", type=int, default=None, help="greedy tokens stored per prompt (params canary.k)")
    b.add_argument("--max-prompts", type=int, default=None)
    b.add_argument("--params", default=None, help="params file with a canary: block (default: kedit.params lookup)")
    b.add_argument("--out", default=None, help="default: <workspace>/canary/<slug>/")
    b.set_defaults(func=_canary_build)

    g = sub.add_parser("gate", help="promotion gate: candidate vs champion; exits 1 if any check fails")
    g.add_argument("--champion", required=True, help="store slug or model directory")
    g.add_argument("--candidate", required=True, help="store slug or model directory")
    g.add_argument("--out", required=True, help="folder for gate.json, gate.md and gate.png")
    g.add_argument("--new-edits", default=None, help="JSON/JSONL CounterFact records the candidate adds")
    g.add_argument("--prior-edits", default=None, help="JSON/JSONL records already in the lineage (retention)")
    g.add_argument("--canary", default=None, help="canary suite folder (default: <workspace>/canary/<champion>/ "
                                                  "if present, else built on the fly)")
    g.add_argument("--reference", default=None, help="reference text file for perplexity (params gates.reference_text)")
    g.add_argument("--params", default=None, help="params file with the gates: block (default: kedit.params lookup)")
    g.add_argument("--base", default=None,
                   help="the unedited base model (slug or folder): adds the drift checks against it (params drift:)")
    g.set_defaults(func=_gate)

    e = sub.add_parser("evaluate", help="CounterFact efficacy / generalization / specificity / score of a model")
    e.add_argument("--model", required=True)
    e.add_argument("--records", required=True, help="JSON/JSONL flat CounterFact records")
    e.add_argument("--n", type=int, default=None, help="first N records")
    e.add_argument("--fluency", type=int, default=0, help="also generation entropy on the first N prompts")
    e.add_argument("--out", default=None, help="write metrics.json here")
    e.set_defaults(func=_evaluate)


def _records(path: str | None) -> list[dict]:
    from kedit.cli.trace import read_facts

    return read_facts(path) if path else []


def _canary_build(args) -> int:
    from kedit.evaluation.canary import build_canary, canary_dir, parse_prompt_lines
    from kedit.models.store import load_model
    from kedit.params import load_params

    cfg = {"k": 8, "max_prompts": None}
    cfg.update(load_params(args.params, workspace(args)).block("canary"))
    k = args.k or int(cfg["k"])
    ws = workspace(args)
    lm = load_model(args.model, ws)
    prompts = None
    if args.prompts:
        p = Path(args.prompts)
        if not p.exists():
            raise FileNotFoundError(f"--prompts: {p} does not exist")
        prompts = parse_prompt_lines(p.read_text())
    suite = build_canary(lm, prompts, edits=_records(args.edits), k=k,
                         max_prompts=args.max_prompts or cfg.get("max_prompts"))
    out = Path(args.out) if args.out else canary_dir(ws, lm.slug)
    suite.save(out)
    n_edit = suite.sources.count("edit-neighbourhood")
    print(f"canary suite for {lm.slug} ({lm.manifest.model_hash[:12]}): {len(suite.prompts)} prompts "
          f"({len(suite.prompts) - n_edit} shipped, {n_edit} from edit neighbourhoods), {k} greedy tokens each -> {out}")
    for p, c in list(zip(suite.prompts, suite.continuations))[:5]:
        print(f"  {p!r} -> {c!r}")
    return 0


def _gate(args) -> int:
    from kedit.evaluation.canary import CanarySuite, canary_dir
    from kedit.evaluation.gates import GatePolicy, run_gates
    from kedit.models.store import load_model

    ws = workspace(args)
    policy = GatePolicy.from_params(args.params, ws)
    champion = load_model(args.champion, ws)
    candidate = load_model(args.candidate, ws)
    if champion.adapter.model_type != candidate.adapter.model_type:
        raise CLIError(f"champion is {champion.adapter.model_type}, candidate {candidate.adapter.model_type}: "
                       f"not the same model family")
    if args.canary:
        canary = CanarySuite.load(args.canary)
    else:
        default = canary_dir(ws, champion.slug)
        canary = CanarySuite.load(default) if (default / "canary.json").exists() else None
    text = None
    if args.reference:
        ref = Path(args.reference)
        if not ref.exists():
            raise FileNotFoundError(f"--reference: {ref} does not exist")
        text = ref.read_text(encoding="utf-8")
    drift = _drift_gate(args, ws, policy, canary, text) if args.base else None
    if drift is not None and text is None:
        text = drift.reference_text
    rep = run_gates(champion, candidate, policy, new_edits=_records(args.new_edits),
                    prior_edits=_records(args.prior_edits), canary=canary, reference_text=text, drift=drift)
    out = rep.save(args.out)
    from kedit.cli.tables import print_gate_checks

    print_gate_checks(rep.to_dict()["checks"])
    if rep.failed_ids:
        print(f"  edits that did not take: {', '.join(map(str, rep.failed_ids))}")
    print(f"gate {'PASSED' if rep.passed else 'FAILED'}: {out / 'gate.md'}")
    return 0 if rep.passed else 1


def _drift_gate(args, ws, policy, canary, text):
    """The drift checks against ``--base``: its reference outputs on the canary prompts (the stored suite's,
    else the shipped list) and the new edits' neighbourhoods, cached in the workspace."""
    from kedit.evaluation.canary import neighbourhood_prompts, shipped_prompts
    from kedit.evaluation.drift import DriftPolicy, build_drift_gate, cache_root
    from kedit.evaluation.gates import load_reference_text
    from kedit.models.store import load_model

    dpol = DriftPolicy.from_params(args.params, ws)
    base = load_model(args.base, ws)
    prompts = [*(canary.prompts if canary is not None else shipped_prompts()),
               *neighbourhood_prompts(_records(args.new_edits))]
    if text is None and dpol.max_perplexity_increase_pct is not None:
        text = load_reference_text(policy)
    return build_drift_gate(base, base.manifest.model_hash, prompts, dpol, canary_k=policy.canary_k, text=text,
                            reference_tokens=policy.reference_tokens, cache=cache_root(ws))


def _evaluate(args) -> int:
    from kedit.evaluation import metrics as M
    from kedit.models.store import load_model

    lm = load_model(args.model, workspace(args))
    recs = _records(args.records)[: args.n] if args.n else _records(args.records)
    res = M.evaluate_counterfact(lm, recs)
    summary = {k: res[k] for k in ("n", "efficacy", "generalization", "specificity", "efficacy_magnitude", "score")}
    if args.fluency:
        summary["fluency"] = M.generation_entropy(lm, [r["prompt"] for r in recs[: args.fluency]])
    json.dump(summary, sys.stdout, indent=2)
    print()
    if args.out:
        from kedit.atomic import write_json_atomic

        write_json_atomic(Path(args.out) / "metrics.json", {**summary, "per_record": res})
    return 0
