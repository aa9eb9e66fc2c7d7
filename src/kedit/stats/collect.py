"""Compute, cache and load key statistics under ``stats/<model-slug>/<corpus-slug>/``.

Layout: ``mom2.safetensors`` (``layer.<i>`` -> mean E[k kᵀ], float64) and ``manifest.json``
(model hash, corpus hash, tokens, dtype, layers, settings). The manifest is written last, so a
directory with a manifest is always complete. Long runs checkpoint partial sums under
``.partial/`` and resume from there after an interruption.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kedit.atomic import save_tensors_atomic, sha256_json, write_json_atomic
from kedit.progress import StepProgress, ticker
from kedit.stats import DEFAULT_STATS_TOKENS
from kedit.stats.corpus import Corpus, load_corpus
from kedit.stats.second_moment import RunningMoment, accumulate_batch, tokenize_batches
from kedit.workspace import Workspace

MANIFEST = "manifest.json"
TENSORS = "mom2.safetensors"


@dataclass
class StatsBundle:
    """Loaded statistics: per-layer E[k kᵀ] plus where they came from."""

    mom2: dict[int, torch.Tensor]
    n_tokens: int
    dir: Path
    manifest: dict

    @property
    def key(self) -> str:
        """Content key (model, corpus, token budget, settings) for caches derived from these stats."""
        return self.manifest["key"]

    @property
    def layers(self) -> list[int]:
        return sorted(self.mom2)


def stats_dir(ws: Workspace, model_slug: str, corpus_slug: str) -> Path:
    return ws.stats_dir / model_slug / corpus_slug


def _settings(lm, corpus: Corpus, max_tokens: int, seq_len: int) -> dict:
    return {"model_hash": lm.manifest.model_hash, "corpus_sha256": corpus.sha256, "max_tokens": max_tokens,
            "seq_len": seq_len}


def load_stats(path: Path, layers: list[int] | None = None) -> StatsBundle:
    from safetensors.torch import load_file

    manifest_path = Path(path) / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{path}: no statistics here (missing {MANIFEST}); run `kedit stats compute`")
    manifest = json.loads(manifest_path.read_text())
    tensors = load_file(str(Path(path) / TENSORS))
    want = layers if layers is not None else manifest["layers"]
    missing = [i for i in want if f"layer.{i}" not in tensors]
    if missing:
        raise KeyError(f"{path}: statistics lack layers {missing} (have {manifest['layers']})")
    return StatsBundle({i: tensors[f"layer.{i}"] for i in want}, manifest["n_tokens"], Path(path), manifest)


def _existing_covers(path: Path, settings: dict, layers: list[int]) -> dict | None:
    mpath = path / MANIFEST
    if not mpath.exists():
        return None
    manifest = json.loads(mpath.read_text())
    if all(manifest.get(k) == v for k, v in settings.items()):
        return manifest
    return None


def compute_stats(lm, layers: list[int], ws: Workspace, corpus: str | Corpus = "wiki-summaries-en",
                  max_tokens: int = DEFAULT_STATS_TOKENS, seq_len: int = 256, batch_size: int = 16,
                  progress: bool = True, checkpoint_every: int = 20, force: bool = False,
                  _stop_after_batches: int | None = None) -> StatsBundle:
    """Collect E[k kᵀ] for ``layers`` (merged with layers already on disk for the same settings)."""
    corpus = load_corpus(corpus) if isinstance(corpus, str) else corpus
    out = stats_dir(ws, lm.slug, corpus.slug)
    settings = _settings(lm, corpus, max_tokens, seq_len)
    existing = None if force else _existing_covers(out, settings, layers)
    if existing and set(layers) <= set(existing["layers"]):
        return load_stats(out, layers)
    all_layers = sorted(set(layers) | set(existing["layers"] if existing else []))
    run_key = sha256_json({**settings, "layers": all_layers, "batch_size": batch_size})
    partial = out / ".partial"
    moments = {i: RunningMoment(lm.adapter.key_dim(i)) for i in all_layers}
    done_batches = 0
    if (partial / "state.json").exists():
        st = json.loads((partial / "state.json").read_text())
        if st.get("run_key") == run_key:
            from safetensors.torch import load_file

            sums = load_file(str(partial / "sums.safetensors"))
            for i in all_layers:
                moments[i].total = sums[f"layer.{i}"]
                moments[i].count = st["tokens"]
            done_batches = st["batches"]
        else:
            shutil.rmtree(partial)

    tokens = moments[all_layers[0]].count
    fwd_seconds = 0.0
    t0 = time.perf_counter()
    tty = sys.stderr.isatty()  # a live bar in a terminal; elsewhere (pipes, logs, dvc repro) plain lines
    bar, task = _progress(progress and tty, max_tokens, tokens, f"stats {lm.slug} L{all_layers[0]}-{all_layers[-1]}")
    report = StepProgress(ws.root, "stats", echo=progress and not tty)
    what = f"E[k kT] of {lm.slug} layers {all_layers[0]}-{all_layers[-1]} over {corpus.slug}"
    report(f"{what}: collecting {max_tokens:,} tokens" + (f", resuming at {tokens:,}" if tokens else ""))
    tick = ticker(report, max_tokens, what)
    try:
        for b, batch in enumerate(tokenize_batches(lm.tokenizer, corpus.texts(), batch_size, seq_len)):
            if b < done_batches:
                continue
            if tokens >= max_tokens:
                break
            tb = time.perf_counter()
            n = accumulate_batch(lm, all_layers, batch, moments)
            fwd_seconds += time.perf_counter() - tb
            tokens += n
            done_batches = b + 1
            if bar is not None:
                bar.update(task, completed=min(tokens, max_tokens))
            tick(min(tokens, max_tokens))
            if checkpoint_every and done_batches % checkpoint_every == 0:
                _checkpoint(partial, moments, run_key, done_batches, tokens)
            if _stop_after_batches is not None and done_batches >= _stop_after_batches:
                raise KeyboardInterrupt("simulated interruption")
    finally:
        if bar is not None:
            bar.stop()
    if tokens == 0:
        raise ValueError(f"corpus {corpus.slug!r} produced no tokens")
    mom2 = {i: moments[i].moment() for i in all_layers}
    manifest = {**settings, "key": sha256_json(settings), "model_slug": lm.slug, "corpus": corpus.slug,
                "corpus_description": corpus.description, "n_tokens": tokens, "dtype": "float64",
                "layers": all_layers, "batch_size": batch_size, "kind": "uncentred second moment E[k k^T]",
                "key_module": lm.adapter.spec.mlp_out, "seconds": round(time.perf_counter() - t0, 2),
                "tokens_per_second": round(tokens / max(fwd_seconds, 1e-9), 1),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the old manifest must not vouch for new tensors
    save_tensors_atomic(out / TENSORS, {f"layer.{i}": m for i, m in mom2.items()})
    write_json_atomic(out / MANIFEST, manifest)  # last: its presence marks a complete directory
    shutil.rmtree(partial, ignore_errors=True)
    report(f"{what}: {tokens:,} tokens in {manifest['seconds']:.0f} s -> {out}")
    return StatsBundle({i: mom2[i] for i in layers}, tokens, out, manifest)


def ensure_stats(lm, layers: list[int], ws: Workspace, corpus: str | Corpus = "wiki-summaries-en",
                 max_tokens: int = DEFAULT_STATS_TOKENS, seq_len: int = 256, batch_size: int = 16,
                 progress: bool = True) -> StatsBundle:
    """Load statistics covering ``layers`` if present for these settings, else compute them."""
    return compute_stats(lm, layers, ws, corpus, max_tokens=max_tokens, seq_len=seq_len,
                         batch_size=batch_size, progress=progress)


def _checkpoint(partial: Path, moments: dict[int, RunningMoment], run_key: str, batches: int, tokens: int) -> None:
    partial.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(partial / "sums.safetensors", {f"layer.{i}": m.total for i, m in moments.items()})
    write_json_atomic(partial / "state.json", {"run_key": run_key, "batches": batches, "tokens": tokens})


def _progress(enabled: bool, total: int, done: int, label: str):
    if not enabled:
        return None, None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(),
                   TextColumn("{task.completed:,}/{task.total:,} tok"),
                   TextColumn("[cyan]{task.fields[rate]}"),
                   TimeRemainingColumn(), transient=True)
    task = bar.add_task(label, total=total, completed=done, rate="")
    bar.start()
    return _RateBar(bar, task), task


class _RateBar:
    """Rich progress with a tokens/s field computed from wall time."""

    def __init__(self, bar, task) -> None:
        self.bar, self.task, self.t0 = bar, task, time.perf_counter()
        self.start_done = bar.tasks[0].completed

    def update(self, task, completed: int) -> None:
        rate = (completed - self.start_done) / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(task, completed=completed, rate=f"{rate:,.0f} tok/s")

    def stop(self) -> None:
        self.bar.stop()
