"""Disk and load time of one edit state of SmolLM2-135M as an MLflow model, two ways:

A. kedit's pyfunc (base model logged once + the state's lineage path, restored by load_state_model);
B. the transformers flavor of the exported state directory (a full copy of the weights per state).

The state is fabricated with the sizes of a real AlphaEdit batch on SmolLM2 (rank-10 deltas on the
MLP output weights of layers 4-8, a 1536x1536 float32 key covariance per layer as editor state):
what is measured is storage and loading, not edit quality. One thread, local SQLite store.

    PYTHONPATH=src OMP_NUM_THREADS=1 python docs/bench/mlflow-model-formats/measure.py /tmp/mlf-measure
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def du(path: Path) -> float:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0]) / 1e6


def main(root: Path) -> dict:
    import mlflow

    from kedit.editors.base import EditorState, EditResult, apply_deltas
    from kedit.lineage import LineageStore, ops
    from kedit.lineage.registry import ModelRegistry, Tracking, base_model_uri, log_state_model
    from kedit.models.store import import_embedded, load_model
    from kedit.workspace import Workspace

    ws = Workspace(root)
    import_embedded(ws, "smollm2-135m")
    lm = load_model("smollm2-135m", ws)
    g = torch.Generator().manual_seed(0)
    deltas, tensors = {}, {}
    for i in (4, 5, 6, 7, 8):
        w = lm.adapter.weight(i)
        out_dim, key_dim = w.shape
        deltas[lm.adapter.weight_name(i)] = lm.adapter.to_stored(
            1e-3 * torch.randn(out_dim, 10, generator=g) @ torch.randn(10, key_dim, generator=g))
        k = torch.randn(key_dim, 64, generator=g)
        tensors[f"cache_c.L{i}"] = k @ k.T
    res = EditResult(deltas=deltas, state=EditorState("alphaedit", tensors, {"n_edits": 10}), diagnostics=[])
    apply_deltas(lm.model, deltas)
    store = LineageStore(ws.lineage_dir)
    s = store.commit(lm, res, parent=None, feed={"row_ids": [f"r{i}" for i in range(10)]}, hparams={})
    out: dict = {"state_files_mb": du(store.state_dir(s.id)), "base_model_mb": du(ws.model_dir("smollm2-135m"))}
    prompt = ["The Eiffel Tower is located in the city of"]

    tr = Tracking(ws)
    t = time.perf_counter()
    base_model_uri(tr, ws.model_dir("smollm2-135m"), s.base_model_hash)
    out["A_log_base_once_s"] = time.perf_counter() - t
    t = time.perf_counter()
    logged = log_state_model(tr, store, s)
    out["A_log_state_s"] = time.perf_counter() - t
    out["A_model_mb"] = du(Path(logged.artifact_location.replace("file://", "")))
    reg = ModelRegistry(tr, "smollm2-135m")
    reg.register(s, store.state_dir(s.id), store=store)
    t = time.perf_counter()
    m = mlflow.pyfunc.load_model(f"models:/{reg.name}@candidate")
    out["A_pyfunc_load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    out["A_answer"] = m.predict(prompt, params={"max_new_tokens": 4})[0]
    out["A_predict_s"] = time.perf_counter() - t

    t = time.perf_counter()
    exported = ops.export(ws, store, s.id, root / "export", force=True)
    out["B_export_s"] = time.perf_counter() - t
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(exported)
    tok = AutoTokenizer.from_pretrained(exported)
    reqs = [f"torch=={torch.__version__}", "transformers"]
    t = time.perf_counter()
    with mlflow.start_run(run_name="transformers-flavor", experiment_id=tr.experiment_id):
        info = mlflow.transformers.log_model(transformers_model={"model": model, "tokenizer": tok},
                                             name="exported", task="text-generation", pip_requirements=reqs)
    out["B_log_s"] = time.perf_counter() - t
    out["B_model_mb"] = du(Path(tr.client.get_logged_model(info.model_id).artifact_location.replace("file://", "")))
    t = time.perf_counter()
    comps = mlflow.transformers.load_model(info.model_uri, return_type="components")
    out["B_components_load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    pm = mlflow.pyfunc.load_model(info.model_uri)
    out["B_pyfunc_load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    out["B_answer"] = str(pm.predict(prompt, params={"max_new_tokens": 4}))
    out["B_predict_s"] = time.perf_counter() - t
    del comps
    return out


if __name__ == "__main__":
    result = main(Path(sys.argv[1]).resolve())
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}, indent=1))
