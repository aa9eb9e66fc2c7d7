"""Span keys on a written memory: which held-out wiki tokens read an entry (the fact's own subject, or
another name that ends the same way), how much of the perplexity change each kind causes, and a sweep
of `mm_span_threshold` (ES / PS / NS on an evenly spaced sample of the memory's records, perplexity on
the held-out text). Writing does not read the memory, so span keys added to a memory written without
them are the keys the editor would have written.

Usage:
  python docs/bench/scripts/memoir_span_keys.py WS RUN/checkpoint.safetensors [--records 500]
  python docs/bench/scripts/memoir_span_keys.py WS RUN/edit --records 500      # a --save-edit state
(WS: a workspace holding smollm2-135m; the memory's facts: CounterFact dev from record 0.)
"""
import argparse
import json
import time
from pathlib import Path

import torch

from kedit.bench.datasets import get_dataset
from kedit.bench.lifelong import curve_sample
from kedit.editors import memoir as M
from kedit.editors.attach import detach
from kedit.editors.hparams import load_hparams
from kedit.editors.io import load_state
from kedit.editors.session import SessionCheckpoint
from kedit.evaluation.metrics import evaluate_counterfact, perplexity
from kedit.models.store import load_model
from kedit.stats.corpus import heldout_text
from kedit.workspace import Workspace

ap = argparse.ArgumentParser()
ap.add_argument("ws")
ap.add_argument("memory", help="a lifelong checkpoint file or a --save-edit directory")
ap.add_argument("--records", type=int, default=500)
ap.add_argument("--thresholds", default="0.3,0.4,0.5")
ap.add_argument("--ppl-tokens", type=int, default=10_000)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--out", default="memoir_span_keys.json")
a = ap.parse_args()
torch.set_num_threads(a.threads)
ws = Workspace(a.ws)
lm = load_model("smollm2-135m", ws)
hp = load_hparams("memoir", lm)
state = SessionCheckpoint.load(a.memory).state if Path(a.memory).is_file() else load_state(a.memory)
owners = state.meta["entry_owner"]
ds = get_dataset("counterfact")
recs = ds.load(ds.default_data(), len(owners))
reqs = ds.requests(recs, str(ds.default_data()), 0)
unguarded = state.copy()
for key in (M.SPAN, M.SPAN_ON):
    unguarded.tensors.pop(key, None)
t = time.time()
keyed = M.with_span_keys(lm, unguarded, reqs, hp, ws.cache_dir)
print(f"span keys for {len(owners)} entries in {time.time() - t:.0f}s; "
      f"{int(keyed.tensors[M.SPAN_ON].sum())} subjects span several tokens", flush=True)

# 1. which wiki tokens read which entry without span keys
layer, k = int(state.meta["layer"]), int(state.meta["k"])
name, d = lm.adapter.mlp_out_name(layer), state.tensors[M.BG].shape[0]
ref = heldout_text()
ids, x = M.text_inputs(lm, name, ref, a.ppl_tokens)
ids = ids[None]
rd = M.read_memory(x, state.tensors[M.BG], state.tensors[M.PERM], M.one_hot_sets(state.tensors[M.MASKS], d), k,
                   float(state.meta["threshold"]))
own, partial = set(), set()
for tok_i, e in zip(rd.tokens.tolist(), rd.entry.tolist()):
    text = lm.tokenizer.decode(ids[0, max(0, tok_i - 40): tok_i + 1])
    (own if text.rstrip().endswith(reqs[e].subject) else partial).add(e)
    print(f"  {'own    ' if e in own else 'partial'} {rd.best_overlap[tok_i]:.2f} "
          f"...{lm.tokenizer.decode(ids[0, max(0, tok_i - 6): tok_i + 1])!r} -> {reqs[e].subject!r}")
print(f"{rd.tokens.numel()} of {x.shape[0]} tokens read an entry: {len(own)} entries on their own subject, "
      f"{len(partial)} on another name", flush=True)


def without(st, drop):
    keep = torch.tensor([i for i in range(len(owners)) if i not in drop], dtype=torch.long)
    out = st.copy()
    for key in (M.MASKS, M.EXACT, M.BLOCK_U, M.BLOCK_V):
        if key in st.tensors:
            out.tensors[key] = st.tensors[key].index_select(0, keep)
    out.meta = {**st.meta, "entry_owner": [owners[i] for i in keep.tolist()]}
    return out


def ppl_of(st):
    if st is not None:
        M.attach(lm, st)
    p = perplexity(lm, ref, max_tokens=a.ppl_tokens)
    detach(lm.model, "memoir")
    return p


base = ppl_of(None)
split = {label: ppl_of(st) / base - 1 for label, st in (
    ("all entries", unguarded), ("without the partial-match entries", without(unguarded, partial)),
    ("without the own-subject entries", without(unguarded, own)))}
for label, v in split.items():
    print(f"perplexity change, {label}: {100 * v:+.2f}%", flush=True)

# 2. the span threshold
sample = [recs[i] for i in curve_sample(len(owners), a.records)]


rows = []
for thr in [None, *(float(t) for t in a.thresholds.split(","))]:
    st = unguarded if thr is None else keyed.copy()
    if thr is not None:
        st.meta["span_threshold"] = thr
    M.attach(lm, st)
    ev = evaluate_counterfact(lm, sample)
    row = dict(span_threshold=thr, es=ev["efficacy"], ps=ev["generalization"], ns=ev["specificity"])
    detach(lm.model, "memoir")
    row["ppl_change"] = ppl_of(st) / base - 1
    rows.append(row)
    print(row, flush=True)
json.dump(dict(entries=len(owners), own=len(own), partial=len(partial), split=split, sweep=rows),
          open(a.out, "w"), indent=1)
