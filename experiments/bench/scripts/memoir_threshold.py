"""The sparse residual memory on SmolLM2: CounterFact dev records 0-19 written in one batch at one
layer and k, then ES / PS / NS (METRICS.md) and the share of held-out wiki tokens that read an entry,
for a sweep of reading thresholds (training does not depend on the threshold).

Usage: python docs/bench/scripts/memoir_threshold.py WS LAYER K [LR]   (WS: a workspace holding smollm2-135m)
"""
import json
import sys
import time
from itertools import islice

import torch

from kedit.editors.attach import detach
from kedit.editors.hparams import load_hparams
from kedit.editors.io import request_from_record
from kedit.editors.memoir import BG, MASKS, PERM, attach, one_hot_sets, read_memory
from kedit.editors.registry import get_editor
from kedit.evaluation.metrics import target_logprobs
from kedit.hooks import Trace
from kedit.models.store import load_model
from kedit.stats.corpus import load_corpus
from kedit.workspace import Workspace

torch.set_num_threads(1)
lm = load_model("smollm2-135m", Workspace(sys.argv[1]))
recs = json.load(open("../shared/data/counterfact-dev.json"))[:20]
reqs = [request_from_record(r) for r in recs]
held = [t[:600] for t in islice(load_corpus("wiki-summaries-en:heldout").texts(), 20)]
L, K = int(sys.argv[2]), int(sys.argv[3])
LR = float(sys.argv[4]) if len(sys.argv) > 4 else 0.1
hp = load_hparams("memoir", lm, overrides={"mm_layer": L, "mm_k": K, "mm_lr": LR})
ed = get_editor("memoir", hp, cache_dir=Workspace(sys.argv[1]).cache_dir)
ed.progress = lambda it, a, nll: print(f"{it}:{a}:{nll:.3f}", end=" ", flush=True)
t0 = time.time()
res = ed.compute(lm, reqs, None, None)
print(f"\ntrain {time.time() - t0:.1f}s nll_end med {sorted(d.vstar_loss_end for d in res.diagnostics)[10]:.3f}", flush=True)
def score(kind):
    P = [r["prompt"] if kind == "es" else r["rephrase_prompt"] if kind == "ps" else r["locality_prompt"] for r in recs]
    new = target_logprobs(lm, P, [r["target_new"] for r in recs])
    old = target_logprobs(lm, P, [r["ground_truth"] if kind != "ns" else r["locality_ground_truth"] for r in recs])
    return float((new > old).double().mean()) if kind != "ns" else float((old > new).double().mean())
name = lm.adapter.mlp_out_name(L)
acts = []
for t in held:
    ids = lm.tokenizer(t, return_tensors="pt").input_ids
    with torch.no_grad(), Trace(lm.model, [name], retain_input=True, stop=True) as tr:
        lm.model(input_ids=ids)
    acts.append(tr.inputs[name][0])
detach(lm.model, "memoir")
base = {k: score(k) for k in ("es", "ps", "ns")}
print("base", base, flush=True)
rows = []
for thr in (0.3, 0.35, 0.4, 0.45, 0.5):
    st = res.state.copy()
    st.meta["threshold"] = thr
    attach(lm, st)
    s = {k: score(k) for k in ("es", "ps", "ns")}
    stored = one_hot_sets(st.tensors[MASKS], lm.adapter.key_dim())
    fired = sum(read_memory(a, st.tensors[BG], st.tensors[PERM], stored, K, thr).tokens.numel() for a in acts)
    ntok = sum(a.shape[0] for a in acts)
    rows.append(dict(L=L, k=K, lr=LR, thr=thr, **s, wiki_fire=fired / ntok, wiki_tokens=ntok))
    print(rows[-1], flush=True)
    detach(lm.model, "memoir")
json.dump(dict(base=base, rows=rows), open(f"memoir_threshold_L{L}_k{K}_lr{LR}.json", "w"))
