"""Reading settings of the sparse residual memory, swept on one written memory (reading does not change
what is written): CounterFact ES / PS / NS (METRICS.md), perplexity on held-out wiki text and the share
of its tokens that read an entry, for mask thresholds with and without exact keys; then, for the shipped
setting without exact keys, the facts that fail on their own prompt and how far their bare-prompt
fingerprint is from their stored mask.

Usage:
  python docs/bench/scripts/memoir_read_sweep.py WS --edits 200 --batch 100     # write, then sweep
  python docs/bench/scripts/memoir_read_sweep.py WS --edit-dir RUN/edit --edits 1000  # a saved state
(WS: a workspace holding smollm2-135m; RUN/edit: `kedit bench lifelong --save-edit` output.)
"""
import argparse
import json
import time

import torch

from kedit.bench.datasets import get_dataset
from kedit.editors.attach import detach
from kedit.editors.context import context_prefixes
from kedit.editors.hparams import load_hparams
from kedit.editors.io import load_state
from kedit.editors.memoir import (
    BG,
    EXACT,
    MASKS,
    PERM,
    attach,
    fingerprint,
    one_hot_sets,
    read_memory,
    text_inputs,
)
from kedit.editors.prompts import pad_right, subject_rows
from kedit.editors.registry import get_editor
from kedit.evaluation.metrics import evaluate_counterfact, perplexity
from kedit.hooks import Trace
from kedit.models.store import load_model
from kedit.stats.corpus import heldout_text
from kedit.workspace import Workspace

ap = argparse.ArgumentParser()
ap.add_argument("ws")
ap.add_argument("--edits", type=int, default=200)
ap.add_argument("--batch", type=int, default=100)
ap.add_argument("--edit-dir")
ap.add_argument("--thresholds", default="0.35,0.4,0.45,0.5")
ap.add_argument("--exact", default="off,0.8,0.9,0.95", help="'off' or exact-key thresholds")
ap.add_argument("--ppl-tokens", type=int, default=5000)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--out", default="memoir_read_sweep.json")
a = ap.parse_args()
torch.set_num_threads(a.threads)
ws = Workspace(a.ws)
lm = load_model("smollm2-135m", ws)
ds = get_dataset("counterfact")
recs = ds.load(ds.default_data(), a.edits)
reqs = ds.requests(recs, str(ds.default_data()), 0)
hp = load_hparams("memoir", lm)
if a.edit_dir:
    state = load_state(a.edit_dir)
else:
    ed, state, t0 = get_editor("memoir", hp, cache_dir=ws.cache_dir), None, time.time()
    for i in range(0, a.edits, a.batch):
        state = ed.compute(lm, reqs[i: i + a.batch], state, None).state
        print(f"batch {i // a.batch}: {time.time() - t0:.0f} s", flush=True)
detach(lm.model, "memoir")
assert EXACT in state.tensors, "the state has no exact keys"
layer, k = int(state.meta["layer"]), int(state.meta["k"])
name, d = lm.adapter.mlp_out_name(layer), state.tensors[BG].shape[0]


def score() -> dict[str, torch.Tensor]:
    """Per record: efficacy, generalization and specificity verdicts (METRICS.md)."""
    ev = evaluate_counterfact(lm, recs)
    return {k_: torch.tensor(ev[f"{long}_ok"]) for k_, long in
            (("es", "efficacy"), ("ps", "generalization"), ("ns", "specificity"))}


ref = heldout_text()
_, wiki_x = text_inputs(lm, name, ref, a.ppl_tokens)
base = {k_: float(v.double().mean()) for k_, v in score().items()}
base["ppl"] = perplexity(lm, ref, max_tokens=a.ppl_tokens)
print("unedited", base, flush=True)
rows = []
for ex in a.exact.split(","):
    for thr in (float(t) for t in a.thresholds.split(",")):
        st = state.copy()
        st.meta["threshold"] = thr
        if ex == "off":
            del st.tensors[EXACT]
        else:
            st.meta["exact_threshold"] = float(ex)
        attach(lm, st)
        s = score()
        ppl = perplexity(lm, ref, max_tokens=a.ppl_tokens)
        exact = one_hot_sets(st.tensors[EXACT], d) if EXACT in st.tensors else None
        fired = read_memory(wiki_x, st.tensors[BG], st.tensors[PERM], one_hot_sets(st.tensors[MASKS], d), k, thr,
                            exact, st.meta.get("exact_threshold", 1.0)).tokens.numel()
        row = dict(exact=ex, threshold=thr, **{k_: float(v.double().mean()) for k_, v in s.items()}, ppl=ppl,
                   ppl_change=ppl / base["ppl"] - 1, wiki_fired=fired / wiki_x.shape[0])
        rows.append(row)
        print(row, flush=True)
        if ex == "off" and thr == float(a.thresholds.split(",")[0]):  # why facts fail without exact keys
            fail = (~s["es"]).nonzero().squeeze(1).tolist()
            prefixes = context_prefixes(lm, hp.n_prefixes, hp.prefix_len, hp.prefix_seed, ws.cache_dir)
            rws = subject_rows(lm.tokenizer, [reqs[i] for i in fail], prefixes)
            xs = []
            for c in range(0, len(rws.ids), 64):
                with torch.no_grad(), Trace(lm.model, [name], retain_input=True, stop=True) as tr:
                    lm.model(input_ids=pad_right(rws.ids[c: c + 64], 0, lm.device), use_cache=False)
                xs.append(tr.inputs[name][torch.arange(len(rws.ids[c: c + 64])), torch.tensor(rws.subj_pos[c: c + 64])])
            if fail:
                fp = fingerprint(torch.cat(xs), st.tensors[BG], st.tensors[PERM], k).view(len(fail), len(prefixes), k)
                for j, i in enumerate(fail):
                    own = one_hot_sets(st.tensors[MASKS][i: i + 1], d)[0]
                    ov = [round(float(own[fp[j, c]].sum()) / k, 2) for c in range(len(prefixes))]
                    print(f"  ES fails on record {i}: overlap with its mask, bare prompt {ov[0]}, prefixed {ov[1:]}")
        detach(lm.model, "memoir")
json.dump(dict(unedited=base, rows=rows, edits=a.edits, edit_dir=a.edit_dir), open(a.out, "w"), indent=1)
