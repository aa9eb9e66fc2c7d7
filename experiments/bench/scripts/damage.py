"""Where the perplexity damage of a saved lifelong edit comes from: per layer, and per singular direction.

Usage (after `kedit bench lifelong ... --edits 300 --batch 100 --save-edit --out OUT`):
    KEDIT_HOME=WS python docs/bench/scripts/damage.py OUT/edit 300
Prints the perplexity (10,000 held-out wiki-summary tokens) with each layer's summed update alone and
with all but it, and with the top-k singular directions of every layer's update removed.
"""

import sys

import torch
from safetensors.torch import load_file

from kedit.bench.lifelong import DEFAULT_DATA, load_counterfact
from kedit.editors.base import apply_deltas
from kedit.evaluation.metrics import evaluate_counterfact, perplexity
from kedit.models.store import load_model
from kedit.stats.collect import ensure_stats
from kedit.stats.corpus import heldout_text
from kedit.workspace import Workspace

torch.set_num_threads(1)
ws = Workspace.default()
lm = load_model("smollm2-135m", ws)
deltas = load_file(f"{sys.argv[1]}/deltas.safetensors")
records = load_counterfact(DEFAULT_DATA, int(sys.argv[2]))
text = heldout_text()


def ppl() -> float:
    return perplexity(lm, text, max_tokens=10000)


def es_ps() -> tuple[float, float]:
    cf = evaluate_counterfact(lm, records)
    return round(cf["efficacy"], 3), round(cf["generalization"], 3)


def with_deltas(ds, fn):
    apply_deltas(lm.model, ds)
    try:
        return fn()
    finally:
        apply_deltas(lm.model, ds, sign=-1.0)


def layer_of(name: str) -> int:
    return int(name.split(".")[2])


print("unedited ppl", round(ppl(), 3))
print("edited ppl", round(with_deltas(deltas, ppl), 3), "ES/PS", with_deltas(deltas, es_ps))
names = sorted(deltas, key=layer_of)
stats = ensure_stats(lm, [layer_of(n) for n in names], ws, "wiki-summaries-en", max_tokens=200000, progress=False)
for n in names:
    d, w, c = deltas[n].double(), lm.model.state_dict()[n].double(), stats.mom2[layer_of(n)].double()
    share = float(torch.einsum("ij,jk,ik->", d, c, d) / torch.einsum("ij,jk,ik->", w, c, w))
    sv = torch.linalg.svdvals(d)
    alone = with_deltas({n: deltas[n]}, ppl)
    others = with_deltas({k: v for k, v in deltas.items() if k != n}, ppl)
    print(f"L{layer_of(n)}: |Δ| {float(d.norm()):.1f} sv top5 {[round(float(x), 1) for x in sv[:5]]} sv20 {float(sv[19]):.2f} "
          f"share {share:.4f} ppl alone {alone:.2f} all but it {others:.2f}")
for k in (1, 4, 16, 64):
    cut = {}
    for n in names:
        u, s, vh = torch.linalg.svd(deltas[n].double(), full_matrices=False)
        cut[n] = (deltas[n].double() - u[:, :k] @ torch.diag(s[:k]) @ vh[:k]).float()
    print(f"top-{k} removed: ppl {with_deltas(cut, ppl):.2f} ES/PS {with_deltas(cut, es_ps)}")
