"""Subject-token fingerprints of the sparse residual memory on SmolLM2 (CounterFact dev records 0-19):
overlap of each fact's stored mask (context-averaged subject fingerprint) with its bare prompt and
paraphrase, and the best overlap of any stored mask with neighbourhood prompts and held-out wiki tokens.

Usage: python docs/bench/scripts/memoir_fingerprints.py WS LAYERS   (e.g. WS 4,8,12,16; WS: a workspace
holding smollm2-135m; ../shared/data/counterfact-dev.json)
"""
import json
import sys
import time
from itertools import islice

import torch

from kedit.editors.context import context_prefixes
from kedit.editors.io import request_from_record
from kedit.editors.prompts import subject_rows
from kedit.hooks import Trace
from kedit.models.store import load_model
from kedit.stats.corpus import load_corpus
from kedit.workspace import Workspace

torch.set_num_threads(1)
lm = load_model("smollm2-135m", Workspace(sys.argv[1]))
recs = json.load(open("../shared/data/counterfact-dev.json"))[:20]
LAYERS = [int(x) for x in sys.argv[2].split(",")]
KS = [32, 64, 128, 256]
tok = lm.tokenizer
names = {lm.adapter.mlp_out_name(i): i for i in LAYERS}
def acts(text):
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad(), Trace(lm.model, names, retain_input=True, stop=True) as tr:
        lm.model(input_ids=ids)
    return {i: tr.inputs[n][0].float() for n, i in names.items()}
t0 = time.time()
wiki = list(islice(load_corpus("wiki-summaries-en").texts(), 40))
held = list(islice(load_corpus("wiki-summaries-en:heldout").texts(), 20))
print("corpus", round(time.time() - t0, 1), flush=True)
bg = {i: torch.zeros(lm.adapter.key_dim()) for i in LAYERS}
cnt = 0
for t in wiki:
    a = acts(t[:600])
    for i in LAYERS:
        bg[i] += a[i].sum(0)
    cnt += a[LAYERS[0]].shape[0]
for i in LAYERS:
    bg[i] /= cnt
reqs = [request_from_record(r) for r in recs]
prefixes = context_prefixes(lm, 5, 10, 0, Workspace(sys.argv[1]).cache_dir)
rows = subject_rows(tok, reqs, prefixes)
def subj_act(ids, pos):
    with torch.no_grad(), Trace(lm.model, names, retain_input=True, stop=True) as tr:
        lm.model(input_ids=torch.tensor([ids]))
    return {i: tr.inputs[n][0, pos].float() for n, i in names.items()}
S = [subj_act(ids, p) for ids, p in zip(rows.ids, rows.subj_pos)]  # request-major, bare first
para = []
for r, rec in zip(reqs, recs):
    rp = rec["rephrase_prompt"]
    if r.subject in rp:
        pr = subject_rows(tok, [type(r)(rp.replace(r.subject, "{}", 1), r.subject, r.target_new)], [""])
        para.append(subj_act(pr.ids[0], pr.subj_pos[0]))
    else:
        para.append(None)
N = [acts(rec["locality_prompt"]) for rec in recs]
H = [acts(t[:600]) for t in held]
print("acts", round(time.time() - t0, 1), "s", flush=True)
def topk(v, k): return set(torch.topk(v, k).indices.tolist())
def ov(a, b): return len(a & b) / len(a)
out = []
nc = len(prefixes)
for L in LAYERS:
    for k in KS:
        stored = [topk(torch.stack([S[i * nc + c][L] for c in range(nc)]).mean(0) - bg[L], k) for i in range(len(reqs))]
        bare = [ov(topk(S[i * nc][L] - bg[L], k), stored[i]) for i in range(len(reqs))]
        bare_right = sum(max(range(len(reqs)), key=lambda j: ov(topk(S[i * nc][L] - bg[L], k), stored[j])) == i for i in range(len(reqs)))
        pp = [ov(topk(p[L] - bg[L], k), stored[i]) for i, p in enumerate(para) if p is not None]
        ne = [max(ov(topk(a[L][t] - bg[L], k), s) for s in stored for t in range(a[L].shape[0])) for a in N]
        wk = torch.tensor([max(ov(topk(a[L][t] - bg[L], k), s) for s in stored) for a in H for t in range(a[L].shape[0])])
        cross = max(ov(stored[i], stored[j]) for i in range(len(reqs)) for j in range(len(reqs)) if i != j)
        row = dict(L=L, k=k, bare_min=min(bare), bare_med=float(torch.tensor(bare).median()), bare_right=bare_right,
                   para_n=len(pp), para_min=min(pp), para_med=float(torch.tensor(pp).median()),
                   neigh_max=max(ne), neigh_med=float(torch.tensor(ne).median()), cross_max=cross,
                   wiki_max=float(wk.max()), wiki_p999=float(wk.quantile(0.999)), wiki_n=int(wk.numel()))
        out.append(row)
        print(" ".join(f"{a}={b:.3f}" if isinstance(b, float) else f"{a}={b}" for a, b in row.items()), flush=True)
json.dump(out, open(f"memoir_fingerprints_{sys.argv[2]}.json", "w"), indent=1)
