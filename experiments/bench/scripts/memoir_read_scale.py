"""Read settings of a saved sparse residual memory: held-out perplexity for a grid of read scales, mask
thresholds and span thresholds, then CounterFact ES / PS / NS (METRICS.md) on an evenly spaced sample
of the edited records for the settings asked for. Reading does not change what is written (the memory
is suspended while v* and the blocks are computed), so a row is what a run with that read setting gives.

Usage:
  python docs/bench/scripts/memoir_read_scale.py WS RUN/edit --edits 10000 --scales 1,0.8,0.6 \
      --exact-scales 1.0 --thresholds 0.5,0.55 --spans 0.3,0.5 --score "1.0/0.5/0.3,0.7/0.5/0.3" --every 10
(WS: a workspace holding smollm2-135m; RUN/edit: `kedit bench lifelong --save-edit` output; --entries
1000: read only the entries the first 1,000 edits wrote; --exact-scales: the exact-key reads' shares,
'same' for the mask reads' share; --score: the scale/threshold/span settings to score on records,
'all' for every grid row.)
"""
import argparse
import itertools
import json
import math
import time

import torch

from kedit.bench.datasets import get_dataset
from kedit.editors import memoir as M
from kedit.editors.attach import detach
from kedit.editors.io import load_state
from kedit.editors.memoir import attach
from kedit.evaluation.metrics import (
    evaluate_counterfact,
    generation_entropy,
    greedy_entropy,
    kl_rows,
    next_token_logprobs,
    token_nlls,
)
from kedit.models.store import load_model
from kedit.stats.corpus import heldout_text
from kedit.workspace import Workspace

ap = argparse.ArgumentParser()
ap.add_argument("ws")
ap.add_argument("edit_dir")
ap.add_argument("--edits", type=int, required=True, help="records edited into the saved state (dev 0..N-1)")
ap.add_argument("--entries", type=int, default=None,
                help="read only the first N entries: with the own-block read, the state after the first N edits")
ap.add_argument("--scales", default="1.0,0.8,0.6")
ap.add_argument("--exact-scales", default="same", help="exact-key read shares ('same': the mask reads' share)")
ap.add_argument("--thresholds", default="0.5")
ap.add_argument("--spans", default="0.3")
ap.add_argument("--score", default="", help="scale/threshold/span settings to score on records ('all': every row)")
ap.add_argument("--every", type=int, default=10, help="score every N-th edited record")
ap.add_argument("--ppl-tokens", type=int, default=10_000)
ap.add_argument("--fluency-prompts", type=int, default=0,
                help="also fluency and greedy entropy (METRICS.md) after the first N records' prompts, as the benchmark")
ap.add_argument("--locality", action="store_true",
                help="also neighbourhood KL and canary agreement on the scored records' locality prompts")
ap.add_argument("--skip-unedited-scores", action="store_true", help="score the unedited model's perplexity only")
ap.add_argument("--data", default=None)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--out", default="memoir_read_scale.json")
a = ap.parse_args()
torch.set_num_threads(a.threads)
lm = load_model("smollm2-135m", Workspace(a.ws))
ds = get_dataset("counterfact")
state = load_state(a.edit_dir)
if a.entries is not None:  # entries are appended in edit order and own-block reads never touch W'
    assert M.reads_own_block(state), "--entries needs a state that reads its own blocks"
    state = M.select_entries(state, list(range(a.entries)))
    a.edits = a.entries
all_recs = ds.load(a.data or ds.default_data(), a.edits)
recs, fluency_prompts = all_recs[:: a.every], [r["prompt"] for r in all_recs[: a.fluency_prompts]]
detach(lm.model, "memoir")
ref = heldout_text()


def scored() -> dict[str, float]:
    """ES / PS / NS / EM (and with --locality NKL / canary agreement) over ``recs`` in pieces of 1,000
    records (10,000 locality distributions at once would take tens of GB), running totals printed."""
    out: dict[str, float] = {}
    if fluency_prompts:
        out.update(fluency=generation_entropy(lm, fluency_prompts, max_new_tokens=100),
                   greedy_entropy=greedy_entropy(lm, fluency_prompts, max_new_tokens=100))
    sums: dict[str, float] = {}
    for i in range(0, len(recs), 1000):
        part = recs[i: i + 1000]
        ev = evaluate_counterfact(lm, part)
        got = {m: float(ev[m]) * len(part) for m in ("efficacy", "generalization", "specificity", "efficacy_magnitude")}
        if a.locality:
            now = next_token_logprobs(lm, loc_prompts[i: i + 1000])
            before = unedited_loc[i: i + 1000]
            got.update(nkl=float(kl_rows(before, now).double().sum()),
                       canary_agreement=float((before.argmax(-1) == now.argmax(-1)).double().sum()))
        sums = {k: sums.get(k, 0.0) + v for k, v in got.items()}
        n = min(i + 1000, len(recs))
        print(f"  {n}/{len(recs)} records:", {k: round(v / n, 4) for k, v in sums.items()}, flush=True)
    return out | {k: v / len(recs) for k, v in sums.items()}


loc_prompts = [r["locality_prompt"] for r in recs]
unedited_loc = next_token_logprobs(lm, loc_prompts) if a.locality else None
base_nll = token_nlls(lm, ref, a.ppl_tokens)
base = dict(perplexity=math.exp(float(base_nll.mean())), **({} if a.skip_unedited_scores else scored()))
print("unedited", base, flush=True)
want = {tuple(float(x) for x in s.split("/")) for s in a.score.split(",") if s and s != "all"}
rows = []
exact_scales = [None] if a.exact_scales == "same" else [float(x) for x in a.exact_scales.split(",")]
grid = itertools.product(*(map(float, s.split(",")) for s in (a.scales, a.thresholds, a.spans)), exact_scales)
for scale, thr, span, exact_scale in grid:
    st = state.copy()
    st.meta.update(threshold=thr, span_threshold=span, read_scale=scale,
                   exact_read_scale=scale if exact_scale is None else exact_scale)
    attach(lm, st)
    t0 = time.time()
    nll = token_nlls(lm, ref, a.ppl_tokens)
    row = dict(scale=scale, exact_scale=M.exact_read_scale(st), threshold=thr, span=span,
               perplexity=math.exp(float(nll.mean())))
    row["ppl_change"] = row["perplexity"] / base["perplexity"] - 1
    if a.score == "all" or (scale, thr, span) in want:
        row.update(scored())
    row["seconds"] = round(time.time() - t0, 1)
    detach(lm.model, "memoir")
    rows.append(row)
    print(row, flush=True)
json.dump(dict(unedited=base, rows=rows, edits=a.edits, entries=a.entries, every=a.every, edit_dir=a.edit_dir), open(a.out, "w"),
          indent=1)
