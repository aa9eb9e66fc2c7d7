"""A worker process of tests/test_shared_stack.py: one machine's side of a step on the shared lineage.

``edit WS MODEL_SRC SEED``: in workspace WS, inside the shared section (cross-host lock, pull,
publish), apply a fabricated edit of the tiny Llama on the shared champion and commit it with a passed
gate; prints the state id. ``gate WS STATE NAME HOLD_S``: inside the section, record a gate event for
STATE and hold the lock HOLD_S seconds; prints when it entered and left the section.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]


def edit(ws_dir: str, model_src: str, seed: int) -> None:
    from kedit.editors.base import apply_deltas
    from kedit.lineage.access import lineage_params, load_state_model, open_store
    from kedit.lineage.shared import section
    from kedit.models.store import import_hf
    from kedit.workspace import Workspace
    from tests.test_lineage import fabricate

    ws = Workspace(ws_dir)
    params = lineage_params(ws)
    with section(ws, f"edit seed {seed}", params, wait_s=120):
        if not ws.model_dir("tiny-llama").exists():
            import_hf(ws, model_src, slug="tiny-llama")
        store = open_store(ws, params)
        parent = store.champion()
        lm, prev = load_state_model(ws, "tiny-llama", parent)
        res = fabricate(lm, prev, seed=seed, rows=[f"row-{seed}"], layers=(1, 2))
        res.deltas = {k: 50 * v for k, v in res.deltas.items()}
        apply_deltas(lm.model, res.deltas)
        facts = [{"id": f"row-{seed}", "subject": "Rome", "prompt": "{} is the capital of",
                  "target_new": f"X{seed}", "target_true": "Italy"}]
        s = store.commit(lm, res, parent=parent, feed={"row_ids": [f"row-{seed}"], "facts": facts,
                                                      "path": f"feeds/{seed}.jsonl", "file_sha256": f"f{seed}"},
                         hparams={"method": "alphaedit"}, predictions={})
        store.record_gate(s.id, {"passed": True}, against=parent)
        print(json.dumps({"state": s.id}), flush=True)


def gate(ws_dir: str, state: str, name: str, hold_s: float) -> None:
    from kedit.lineage.access import lineage_params, open_store
    from kedit.lineage.shared import section
    from kedit.workspace import Workspace

    ws = Workspace(ws_dir)
    params = lineage_params(ws)
    with section(ws, f"gate by {name}", params, wait_s=120):
        entered = time.time()
        store = open_store(ws, params)
        seen = len(store.events())
        store.record_gate(state, {"passed": True, "by": name}, against=store.get(state).parent, by=name)
        time.sleep(hold_s)
        left = time.time()
    print(json.dumps({"name": name, "entered": entered, "left": left, "events_seen": seen}), flush=True)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "edit":
        edit(args[0], args[1], int(args[2]))
    elif cmd == "gate":
        gate(args[0], args[1], args[2], float(args[3]))
    else:
        raise SystemExit(f"unknown command {cmd!r}")
