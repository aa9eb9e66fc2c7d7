"""Which held-out tokens a saved lifelong edit damages: the per-token NLL change on the benchmark's
10,000 held-out wiki-summary tokens (windows of 512, as its perplexity reads them), how concentrated
it is, and the 25 worst tokens in context.

Usage (after `kedit bench lifelong ... --save-edit --out OUT`):
    KEDIT_HOME=WS python docs/bench/scripts/token_damage.py OUT/edit
"""

import sys

import torch
from safetensors.torch import load_file

from kedit.editors.base import apply_deltas
from kedit.evaluation.metrics import token_nlls
from kedit.models.store import load_model
from kedit.stats.corpus import heldout_text
from kedit.workspace import Workspace

torch.set_num_threads(1)
lm = load_model("smollm2-135m", Workspace.default())
deltas = load_file(f"{sys.argv[1]}/deltas.safetensors")
text, TOKENS, WINDOW = heldout_text(), 10000, 512
ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:TOKENS]


def token_nll() -> torch.Tensor:
    return token_nlls(lm, text, max_tokens=TOKENS, window=WINDOW)


before = token_nll()
apply_deltas(lm.model, deltas)
change = token_nll() - before
print(f"perplexity {float(before.mean().exp()):.2f} -> {float((before + change).mean().exp()):.2f}")
ranked = change.sort(descending=True).values
for q in (0.01, 0.05, 0.1, 0.25, 0.5):
    k = int(q * change.numel())
    print(f"top {q:.0%} of tokens carry {float(ranked[:k].sum() / change.sum()):.2f} of the NLL increase")
print("tokens worse / better:", int((change > 0).sum()), int((change < 0).sum()))
where = [(i, j) for i in range(0, len(ids), WINDOW) for j in range(min(WINDOW, len(ids) - i) - 1)]
for t in change.argsort(descending=True)[:25].tolist():
    i, j = where[t]
    context = lm.tokenizer.decode(ids[i + max(0, j - 8): i + j + 1])
    print(f"{float(change[t]):+.2f} nats  {context!r} -> {lm.tokenizer.decode(ids[i + j + 1: i + j + 2])!r}")
