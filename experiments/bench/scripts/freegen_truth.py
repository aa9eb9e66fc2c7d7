"""Free generation of the unedited model, scored against the TRUE object (`ground_truth`): how often a
model states a fact it was trained on, as the first words of a greedy continuation (and anywhere in
it), on CounterFact's edit prompts and paraphrases. The benchmark's PS gen asks that of an edited fact.

    PYTHONPATH=src python experiments/bench/scripts/freegen_truth.py WORKSPACE MODEL N [DATA]
"""
import json
import sys

import torch

from kedit.evaluation.freegen import begins_with, contains, continuations
from kedit.models.store import load_model
from kedit.workspace import Workspace

ws, slug, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = sys.argv[4] if len(sys.argv) > 4 else "../shared/data/counterfact-dev.json"
torch.set_num_threads(1)
lm = load_model(slug, Workspace(ws))
recs = json.load(open(data))[:n]
for key in ("prompt", "rephrase_prompt"):
    texts = continuations(lm, [r[key] for r in recs])
    b = sum(begins_with(t, r["ground_truth"]) for t, r in zip(texts, recs)) / n
    c = sum(contains(t, r["ground_truth"]) for t, r in zip(texts, recs)) / n
    print(f"{slug} {key}: begins with the true object {b:.3f}, contains it {c:.3f}", flush=True)
    for t, r in list(zip(texts, recs))[:8]:
        print(f"    {r[key]!r} -> {t!r} (true: {r['ground_truth']})")
