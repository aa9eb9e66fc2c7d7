"""Benchmark: how long it takes to materialise the 1st, 100th and 1000th state of a SmolLM2 lineage.

Builds a linear lineage of ``--states`` edit batches, each a low-rank delta on the MLP output
matrix of 5 layers (576 x 1536 float32 for SmolLM2-135M), committed through the real store (atomic
writes, snapshots every ``--snapshot-every`` states), then times ``LineageStore.materialise`` from
a cold store object (no in-memory cache) at a range of depths, checking every restore bit for bit.

    python -m kedit.bench.restore -w /tmp/ws                     # real SmolLM2 from the model store
    python -m kedit.bench.restore --states 200 --snapshot-every 10

Without the model in the store it uses a random model with SmolLM2's matrix shapes. Writes
``restore.json``, ``restore.md`` and ``restore.png`` to ``--out``. Note: the lineage needs about
18 MB of disk per state (dense fp32 deltas) plus one snapshot every N states; it is deleted at
the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch

from kedit.atomic import sha256_tensor, write_json_atomic, write_text_atomic
from kedit.editors.base import EditorState, EditResult, apply_deltas
from kedit.lineage.store import LineageStore
from kedit.workspace import Workspace


def load_lm(ws: Workspace, slug: str, layers: list[int]):
    """The real model from the store, else a random Llama with SmolLM2's MLP shapes (576 x 1536)."""
    from kedit.models.store import load_model, wrap_model

    try:
        return load_model(slug, ws), True
    except FileNotFoundError:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=320, hidden_size=576, intermediate_size=1536, num_hidden_layers=max(layers) + 1,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
        return wrap_model(AutoModelForCausalLM.from_config(cfg), None, slug="smollm2-shaped-random"), False


def fabricate(lm, layers: list[int], seed: int, rank: int, scale: float) -> EditResult:
    """A rank-``rank`` update per layer (as MEMIT/AlphaEdit produce) and a small editor state."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for i in layers:
        out_dim, key_dim = lm.adapter.weight(i).shape
        r = torch.randn(out_dim, rank, generator=g) * scale
        k = torch.randn(key_dim, rank, generator=g)
        deltas[lm.adapter.weight_name(i)] = lm.adapter.to_stored(r @ k.T)
    state = EditorState("alphaedit", {"key_counts": torch.full((len(layers),), float(seed))}, {"batch": seed})
    return EditResult(deltas=deltas, state=state, diagnostics=[])


def build(store: LineageStore, lm, n: int, layers: list[int], rank: int, scale: float) -> tuple[list[str], float]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    ids: list[str] = []
    parent = None
    t0 = time.perf_counter()
    with Progress(TextColumn("committing states"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn()) as prog:
        task = prog.add_task("build", total=n)
        for i in range(n):
            res = fabricate(lm, layers, i, rank, scale)
            apply_deltas(lm.model, res.deltas)
            s = store.commit(lm, res, parent=parent, feed={"file_sha256": f"bench-{i}", "row_ids": [f"b{i}"]},
                             hparams={"bench": True, "rank": rank})
            ids.append(s.id)
            parent = s.id
            prog.advance(task)
    return ids, time.perf_counter() - t0


def time_restore(root: Path, snapshot_every: int, state_id: str, lm, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        store = LineageStore(root, snapshot_every=snapshot_every)  # cold: no cached tensors
        store.states()  # index load is not what we time (it is shared by every later call)
        t = time.perf_counter()
        store.materialise(state_id, lm)
        times.append(time.perf_counter() - t)
    rec = LineageStore(root).get(state_id)
    params = dict(lm.model.named_parameters())
    assert all(sha256_tensor(params[n]) == h for n, h in rec.tensor_sha256.items()), "restore not bit-exact"
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workspace", default=None, help="workspace with models/<slug> (default: $KEDIT_HOME or cwd)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--states", type=int, default=1000)
    ap.add_argument("--snapshot-every", type=int, default=None, help="default: params.yaml lineage.snapshot_every")
    ap.add_argument("--layers", default="3,4,5,6,7")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lineage-dir", default=None, help="default: <workspace>/.kedit-cache/bench-restore")
    ap.add_argument("--out", default="bench-out/restore")
    ap.add_argument("--keep", action="store_true", help="keep the benchmark lineage")
    args = ap.parse_args(argv)

    from kedit.lineage.ops import lineage_params

    ws = Workspace.default(args.workspace)
    every = args.snapshot_every or int(lineage_params(ws)["snapshot_every"])
    layers = [int(x) for x in args.layers.split(",")]
    root = Path(args.lineage_dir) if args.lineage_dir else ws.cache_dir / "bench-restore"
    out = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    lm, real = load_lm(ws, args.model, layers)
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters()
            if n in {lm.adapter.weight_name(i) for i in layers}}
    store = LineageStore(root, snapshot_every=every)
    ids, build_s = build(store, lm, args.states, layers, args.rank, 1e-4)
    disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    with torch.no_grad():  # restore starts from the base model, as a fresh process would
        for n, p in lm.model.named_parameters():
            if n in base:
                p.copy_(base[n])
    depths = sorted({d for d in (1, 2, every - 1, every, every + 1, 50, 99, 100, 101, 500, 999, 1000,
                                 args.states - 1, args.states) if 1 <= d <= args.states})
    rows = []
    for d in depths:
        t = time_restore(root, every, ids[d - 1], lm, args.repeats)
        replays = d % every if d >= every else d
        rows.append({"state": d, "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                     "replayed_deltas": replays, "from": "snapshot" if d >= every else "base"})
        print(f"state {d:5d}: {statistics.median(t) * 1000:8.1f} ms  ({replays} deltas replayed from "
              f"{rows[-1]['from']}, bit-exact)")
    result = {"model": args.model if real else "random model with SmolLM2 shapes", "real_model": real,
              "states": args.states, "snapshot_every": every, "layers": layers,
              "tensor_shape": list(next(iter(base.values())).shape), "dtype": str(next(iter(base.values())).dtype),
              "rank": args.rank, "build_seconds": build_s, "commit_ms_per_state": 1000 * build_s / args.states,
              "disk_bytes": disk, "disk_mb_per_state": disk / args.states / 1e6, "restore": rows,
              "torch_threads": torch.get_num_threads()}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "restore.json", result)
    _plot(rows, every, out / "restore.png")
    write_text_atomic(out / "restore.md", _markdown(result))
    print(f"report: {out / 'restore.md'}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _plot(rows: list[dict], every: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r["state"] for r in rows], [r["median_s"] * 1000 for r in rows], "o-")
    ax.set_xscale("log")
    ax.set_xlabel("state number (depth in the lineage)")
    ax.set_ylabel("materialise time (ms, median)")
    ax.set_title(f"Restore time vs depth (snapshot every {every} states)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(r: dict) -> str:
    lines = [
        "# Lineage restore benchmark", "",
        f"Model: {r['model']}; {r['states']} states, deltas on layers {r['layers']} "
        f"({'x'.join(map(str, r['tensor_shape']))} {r['dtype']}, rank {r['rank']}); snapshot every "
        f"{r['snapshot_every']} states.", "",
        f"Building the lineage took {r['build_seconds']:.1f} s ({r['commit_ms_per_state']:.0f} ms per commit); "
        f"it uses {r['disk_bytes'] / 1e9:.2f} GB ({r['disk_mb_per_state']:.1f} MB per state).", "",
        "| state | median | min | max | deltas replayed | from |", "|---:|---:|---:|---:|---:|---|",
    ]
    for x in r["restore"]:
        lines.append(f"| {x['state']} | {x['median_s'] * 1000:.1f} ms | {x['min_s'] * 1000:.1f} ms | "
                     f"{x['max_s'] * 1000:.1f} ms | {x['replayed_deltas']} | {x['from']} |")
    lines += ["", "Every restore was checked against the recorded sha256 of each edited tensor (bit-exact). "
              "Times are with the files in the OS page cache (just written).", "", "![restore](restore.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
