"""Post-hoc consolidation of a saved lifelong edit: re-solve every layer's summed update D against all
edit keys at once, trading the outputs on those keys against the output on general text:

    D' = argmin ||(D' - D) K||² + mu · tr(D' C D'ᵀ) = D S (S + mu C)⁻¹,   S = Σ K Kᵀ (the editor state)

(C = second moment of general-text keys). It shows how much perplexity the edit's own keys allow
to be taken back, and at what efficacy.

With a word-internal key moment (word_internal_stats.py) and a weight β, general text is
C + β·C_int instead, to protect the tokens inside words and names that the edits damage most.

Usage (after `kedit bench lifelong ... --save-edit --out OUT`):
    KEDIT_HOME=WS python docs/bench/scripts/consolidate.py OUT/edit 1000 1,100,400,1600 [C_INT.safetensors BETA]
"""

import sys
import time

import torch
from safetensors.torch import load_file

from kedit.bench.lifelong import DEFAULT_DATA, load_counterfact
from kedit.editors.base import apply_deltas
from kedit.evaluation.metrics import evaluate_counterfact, perplexity
from kedit.models.store import load_model
from kedit.stats.collect import ensure_stats
from kedit.stats.corpus import heldout_text
from kedit.workspace import Workspace

torch.set_num_threads(2)
ws = Workspace.default()
lm = load_model("smollm2-135m", ws)
deltas = load_file(f"{sys.argv[1]}/deltas.safetensors")
state = load_file(f"{sys.argv[1]}/state.safetensors")
records = load_counterfact(DEFAULT_DATA, int(sys.argv[2]))
mus = [float(x) for x in sys.argv[3].split(",")]
internal = load_file(sys.argv[4]) if len(sys.argv) > 5 else {}
beta = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
text = heldout_text()


def layer_of(name: str) -> int:
    return int(name.split(".")[2])


stats = ensure_stats(lm, sorted(layer_of(n) for n in deltas), ws, "wiki-summaries-en", max_tokens=200000,
                     progress=False)


def evaluate(ds) -> str:
    apply_deltas(lm.model, ds)
    try:
        t = time.time()
        p = perplexity(lm, text, max_tokens=10000)
        cf = evaluate_counterfact(lm, records)
        return (f"ppl {p:.2f} ES {cf['efficacy']:.3f} PS {cf['generalization']:.3f} "
                f"NS {cf['specificity']:.3f} ({time.time() - t:.0f}s)")
    finally:
        apply_deltas(lm.model, ds, sign=-1.0)


if not beta:
    print("as edited:", evaluate(deltas), flush=True)
for mu in mus:
    out = {}
    for n, D in deltas.items():
        S = state[f"cache_c.L{layer_of(n)}"].double()
        C = stats.mom2[layer_of(n)].double()
        if beta:
            C = C + beta * internal[f"layer.{layer_of(n)}"].double()
        A = S + mu * C
        out[n] = torch.linalg.solve((A + A.T) / 2, S @ D.double().T).T.float()  # D' = D S A⁻¹
    ratio = {layer_of(n): round(float(out[n].norm() / deltas[n].norm()), 3) for n in out}
    print(f"mu {mu:g}: norm ratio {ratio}", evaluate(out), flush=True)
