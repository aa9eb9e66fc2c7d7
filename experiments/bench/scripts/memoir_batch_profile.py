"""Where one `memoir` batch spends its time: the batch after the first N entries of a saved memory
(CounterFact dev records N..N+B-1, as a long run would write them, warm start included), timed per v*
iteration (how many requests are still active after it), for one or more hparams settings.

Usage:
  python docs/bench/scripts/memoir_batch_profile.py WS --state RUN/edit --entries 5000 \
      --settings "{};{v_stop_nll: 0.1};{v_stop_nll: 0.2}"
(WS: a workspace holding smollm2-135m; RUN/edit: `kedit bench lifelong --save-edit` output; without
--state the batch starts from an empty memory. Each setting runs the same batch from the same state.)
On a GPU: `--device cuda --warmup` (one untimed batch first: CUDA's start-up is not the batch's), and
compare replay groupings, e.g. --settings "{};{v_replay_merge_tokens: 1000};{v_replay_merge_tokens: 100000}".
"""
import argparse
import json
import time

import torch
import yaml

from kedit.bench.datasets import get_dataset
from kedit.editors.hparams import load_hparams
from kedit.editors.io import load_state
from kedit.editors.memoir import select_entries
from kedit.editors.registry import get_editor
from kedit.editors.session import EditSession
from kedit.models.store import load_model
from kedit.workspace import Workspace

ap = argparse.ArgumentParser()
ap.add_argument("ws")
ap.add_argument("--state", default=None, help="a saved memoir edit directory to take the first entries from")
ap.add_argument("--entries", type=int, default=0, help="entries kept (the batch is records N..N+B-1)")
ap.add_argument("--batch", type=int, default=100)
ap.add_argument("--settings", default="{}", help="';'-separated YAML mappings of hparams overrides")
ap.add_argument("--data", default=None)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--device", default="cpu")
ap.add_argument("--warmup", action="store_true", help="run the first setting once, untimed, before the rest")
ap.add_argument("--out", default="memoir_batch_profile.json")
a = ap.parse_args()
if a.entries and not a.state:
    ap.error("--entries needs --state")
torch.set_num_threads(a.threads)
ws = Workspace(a.ws)
lm = load_model("smollm2-135m", ws, device=a.device)
ds = get_dataset("counterfact")
data = a.data or str(ds.default_data())
recs = ds.load(data, a.batch, a.entries)
reqs = ds.requests(recs, data, a.entries, list(range(a.entries, a.entries + a.batch)))
start = None
if a.state:
    full = load_state(a.state)
    start = select_entries(full, list(range(a.entries)))
    del full

rows = []
settings = a.settings.split(";")
for n_run, text in enumerate(settings[:1] * a.warmup + settings):
    overrides = yaml.safe_load(text) or {}
    hp = load_hparams("memoir", lm, None, overrides)
    iters, last = [], [0.0]

    def progress(it, active, nll, iters=iters, last=last):
        now = time.perf_counter()
        iters.append({"iteration": it, "active_after": active, "seconds": round(now - last[0], 2),
                      "mean_nll_active": round(nll, 3)})
        last[0] = now

    editor = get_editor("memoir", hp, cache_dir=ws.cache_dir, progress=progress)
    session = EditSession(lm, editor, None, state=start)
    if start is None:  # the empty memory's background mean is one-time work: not part of the batch
        editor.compute(lm, reqs[:1])
    t = time.perf_counter()
    last[0] = t
    rep = session.step(reqs, a.batch)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    if a.warmup and n_run == 0:
        print(f"warm-up batch: {rep.seconds:.1f} s")
        del session, editor
        continue
    steps = sum(d.vstar_steps for d in rep.result.diagnostics) / len(reqs)
    met = sum(d.constraint_met for d in rep.result.diagnostics)
    rows.append({"setting": overrides, "seconds": round(rep.seconds, 1), "mean_steps": round(steps, 2),
                 "met": met, "iterations": iters,
                 "warm_started": rep.result.layer_info.get("memory", {}).get("warm_started")})
    print(f"{json.dumps(overrides)}: {rep.seconds:.1f} s ({rep.seconds / len(reqs):.3f} s/edit), v* met {met}/"
          f"{len(reqs)} in {steps:.2f} steps")
    print("  iteration  active after  seconds")
    for r in iters:
        print(f"  {r['iteration']:>9}  {r['active_after']:>12}  {r['seconds']:>7.2f}")
    del session, editor

with open(a.out, "w") as f:
    json.dump({"entries": a.entries, "batch": a.batch, "threads": a.threads, "device": a.device, "rows": rows}, f, indent=1)
print("->", a.out)
