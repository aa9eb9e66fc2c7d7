"""The lifelong editing benchmark: T CounterFact (or zsRE) records applied in batches of B to one model,
every docs/metrics.md metric measured on all T records after the last batch (and on the records edited
so far every K batches, for the curve), against the unedited baseline. The data set decides how a
record becomes a request and how it is scored (:mod:`kedit.bench.datasets`).

Seconds per edit count only the editing calls (v*, keys, solves, applying the deltas); statistics,
projectors, prefixes and evaluation are reported separately.

A long run can write a checkpoint every N batches (the edit session's progress plus the baseline,
the curve so far and the timings) and be resumed from it after a kill, with the same results as an
uninterrupted run.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kedit.atomic import write_json_atomic, write_text_atomic
from kedit.bench.baseline_cache import baseline_key, load_baseline, save_baseline
from kedit.bench.datasets import get_dataset
from kedit.bench.footprint import edit_footprint, state_bytes
from kedit.console import ProgressLog, device_str
from kedit.editors.hparams import load_hparams
from kedit.editors.precision import resolve_v_dtype
from kedit.evaluation.metrics import wilson_interval
from kedit.stats import DEFAULT_STATS_TOKENS

DEFAULT_DATA = get_dataset("counterfact").default_data()  # ../shared/data/counterfact-dev.json


@dataclass
class LifelongConfig:
    method: str = "alphaedit"
    data: str = str(DEFAULT_DATA)
    edits: int = 100
    batch: int = 10
    offset: int = 0  # first record used
    eval_every: int = 0  # batches between curve points (0: about 10 points)
    # curve points before the last score an evenly spaced sample of at most this many of the records
    # edited so far (0: all of them); the final evaluation scores every record. At T=10,000 scoring all
    # records at every point costs more than the editing on a CPU.
    curve_records: int = 0
    fluency_prompts: int | None = 100  # first N edit prompts for fluency and greedy entropy (None: all T;
    # sampling 100 tokens for each of 10,000 prompts would dwarf the editing time on a CPU)
    fluency_tokens: int = 100  # new tokens generated per fluency prompt (docs/metrics.md: 100)
    ppl_tokens: int = 10_000  # held-out reference tokens for perplexity
    stats_corpus: str = "wiki-summaries-en"
    stats_tokens: int = DEFAULT_STATS_TOKENS
    hparams_file: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    dataset: str = "counterfact"  # kedit.bench.datasets: counterfact or zsre
    skip_invalid: bool = False  # leave out records that fail the data set's check (listed in the results)
    # report on records the hparams file's calibration read (refused otherwise; the report then says so)
    allow_calibration_records: bool = False
    # greedy tokens per prompt for the free-generation scores (kedit.evaluation.freegen; 0: not measured)
    freegen_tokens: int = 8


def load_counterfact(path: str | Path, n: int, offset: int = 0) -> list[dict]:
    return get_dataset("counterfact").load(path, n, offset)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _generation_metrics(lm, fluency_prompts: list[str], fluency_tokens: int, ref_text: str, ppl_tokens: int) -> dict:
    """Fluency, greedy entropy (and their setup) and held-out perplexity."""
    from kedit.evaluation import metrics as M

    # fluency is docs/metrics.md's GE (top-k 5 sampling from a fixed seed); greedy_entropy the same n-gram
    # entropy of greedy continuations of the same prompts, which sampling noise cannot mask
    return {"fluency": M.generation_entropy(lm, fluency_prompts, max_new_tokens=fluency_tokens),
            "greedy_entropy": M.greedy_entropy(lm, fluency_prompts, max_new_tokens=fluency_tokens),
            "fluency_setup": {"prompts": len(fluency_prompts), "new_tokens": fluency_tokens,
                              "top_k": M.FLUENCY_TOP_K, "seed": M.FLUENCY_SEED},
            "perplexity": M.perplexity(lm, ref_text, max_tokens=ppl_tokens)}


def _free_generation(lm, ds, records: list[dict], tokens: int) -> dict | None:
    """Per-record free-generation verdicts (``vars`` of :class:`~kedit.evaluation.freegen.FreeGenRecords`
    without the texts), or None when ``tokens`` is 0."""
    if tokens <= 0:
        return None
    from kedit.evaluation.freegen import free_generation_records

    recs = vars(free_generation_records(lm, *ds.free_generation_fields(records), max_new_tokens=tokens))
    recs.pop("texts")
    return recs


def _free_generation_scores(parts: list[dict | None]) -> dict:
    from kedit.evaluation.freegen import free_generation_scores

    return {} if not parts or any(p is None for p in parts) else free_generation_scores(parts)


def _baseline_metrics(lm, ds, records: list[dict], reference: Any, ids: list, fluency_prompts: list[str],
                      ref_text: str, ppl_tokens: int, fluency_tokens: int = 100, freegen_tokens: int = 0) -> dict:
    """Every metric of the unedited model (its neighbourhood KL and canary agreement against itself:
    0 and 1; the edited model's are read against it piece by piece in :func:`_final_metrics`)."""
    cf = ds.evaluate(lm, records, reference, ids)
    out = {k: cf[k] for k in ds.report} | _generation_metrics(lm, fluency_prompts, fluency_tokens, ref_text, ppl_tokens)
    out |= _free_generation_scores([_free_generation(lm, ds, records, freegen_tokens)])
    out["nkl"] = 0.0
    out["canary_agreement"] = 1.0
    out["failed_ids"] = cf["failed_ids"]
    return out


# records per piece of the final evaluation; with a checkpoint each piece is saved. A piece holds the
# next-token log-probabilities of its locality prompts before and after the edits ([records, vocab] float32
# each, with their KL's temporaries): at 1,000 records Gemma 3's 262k vocabulary made that over 5 GB and the
# run's peak 18.7 GB; at 250 it is a quarter
EVAL_CHUNK = 250


def _final_metrics(session, ds, records: list[dict], reference: Any, ids: list, fluency_prompts: list[str],
                   ref_text: str, ppl_tokens: int, fluency_tokens: int, partial: Path | None, identity: dict,
                   log, freegen_tokens: int = 0) -> tuple[dict, float]:
    """Every metric of the session's edited model (as :func:`_baseline_metrics`; the neighbourhood KL
    and canary agreement against the model as the session began, run for each piece inside
    :meth:`~kedit.editors.session.EditSession.unedited`), in pieces of :data:`EVAL_CHUNK` records. With
    ``partial`` (a file beside the checkpoint) each piece's per-record results are saved as it ends and
    a resumed run scores only the pieces not saved yet: over 10,000 records the final evaluation takes
    about an hour on a CPU, and a kill inside it no longer costs all of it. The pieces are the same
    whether or not the run was interrupted, so the result is too. ``identity`` names the run and state
    the saved pieces belong to; pieces saved for anything else are ignored. Also returns the seconds
    the pieces took, saved ones included."""
    from kedit.evaluation import metrics as M

    lm = session.lm
    saved = json.loads(partial.read_text()) if partial is not None and partial.exists() else {}
    if {k: saved.get(k) for k in identity} != identity:
        saved = {}
    parts: list[dict] = saved.get("parts", [])
    if parts:
        log(f"final evaluation: {min(len(parts) * EVAL_CHUNK, len(records))}/{len(records)} records "
            f"read back from {partial}")
    for start in range(len(parts) * EVAL_CHUNK, len(records), EVAL_CHUNK):
        end = min(start + EVAL_CHUNK, len(records))
        t = time.perf_counter()
        cf = ds.evaluate(lm, records[start:end], None if reference is None else reference[start:end], ids[start:end])
        prompts = [r[ds.locality_field] for r in records[start:end]]
        loc = M.next_token_logprobs(lm, prompts)
        with session.unedited():
            before = M.next_token_logprobs(lm, prompts)
        # docs/metrics.md's canary agreement with the locality prompts as the canary set: greedy next token unchanged
        fg = _free_generation(lm, ds, records[start:end], freegen_tokens)
        parts.append({"scores": _jsonable(cf), "kl": M.kl_rows(before, loc).tolist(),
                      "canary": (before.argmax(-1) == loc.argmax(-1)).tolist(), "freegen": fg,
                      "seconds": time.perf_counter() - t})
        if partial is not None:
            write_json_atomic(partial, {**identity, "parts": parts})
        log(f"final evaluation: {end}/{len(records)} records ({time.perf_counter() - t:.0f}s)")
    cf = ds.merge([p["scores"] for p in parts])
    if "generation" not in saved:  # fluency and perplexity: one piece of their own, after the records
        t = time.perf_counter()
        saved["generation"] = _generation_metrics(lm, fluency_prompts, fluency_tokens, ref_text, ppl_tokens)
        saved["generation_seconds"] = time.perf_counter() - t
        if partial is not None:
            write_json_atomic(partial, {**identity, "parts": parts, "generation": saved["generation"],
                                        "generation_seconds": saved["generation_seconds"]})
    out = {k: cf[k] for k in ds.report} | saved["generation"]
    out |= _free_generation_scores([p.get("freegen") for p in parts])
    out["nkl"] = float(torch.tensor([x for p in parts for x in p["kl"]], dtype=torch.float64).mean())
    same = [x for p in parts for x in p["canary"]]
    out["canary_agreement"] = sum(same) / len(same)
    out["failed_ids"] = cf["failed_ids"]
    return out, sum(p["seconds"] for p in parts) + saved["generation_seconds"]


def run_lifelong(lm, ws, cfg: LifelongConfig, progress: bool = True, edit_out: str | Path | None = None,
                 checkpoint: str | Path | None = None, checkpoint_every: int = 0, resume: bool = False,
                 on_batch: Callable | None = None, baseline_cache: bool = True) -> dict:
    """Run the benchmark on ``lm`` (edited in memory) and return the results dictionary.

    ``edit_out``: also write the sum of all batches' deltas and the final editor state there as a
    `kedit edit` directory, so the edited model can be inspected (``kedit predict --edits``),
    analysed, or edited further (``--state``) without repeating the run.

    ``checkpoint``: a file for the run's progress, written (atomically) every ``checkpoint_every``
    batches and after the last; with ``resume``, a run whose checkpoint exists continues from it
    (``lm`` must be the unedited model again) and gives the results of an uninterrupted run.
    ``on_batch(report)`` is called after each batch's curve point and checkpoint.

    ``baseline_cache``: read the unedited model's metrics from the workspace cache where an earlier run
    scored the same model, records and measurements with the same code (:mod:`kedit.bench.baseline_cache`),
    and keep them there after scoring; False scores them afresh (and still keeps them)."""
    from kedit.editors.common import EditCaches
    from kedit.editors.context import context_prefixes
    from kedit.editors.registry import spec
    from kedit.editors.session import BatchReport
    from kedit.editors.setup import prepare_edit
    from kedit.evaluation.metrics import perplexity
    from kedit.stats.corpus import heldout_text

    if cfg.edits <= 0 or cfg.batch <= 0:
        raise ValueError("edits and batch must be positive")
    ds = get_dataset(cfg.dataset)
    if cfg.skip_invalid:
        records, index, skipped = ds.load_valid(cfg.data, cfg.edits, cfg.offset)
    else:
        records, skipped = ds.load(cfg.data, cfg.edits, cfg.offset), []
        index = list(range(cfg.offset, cfg.offset + len(records)))
    requests = ds.requests(records, cfg.data, cfg.offset, index)
    ids = [r.get("case_id", i) for i, r in zip(index, records)]
    hp = load_hparams(cfg.method, lm, cfg.hparams_file, cfg.overrides)
    from kedit.calibration.split import check_heldout

    # the records reported on against the ones the settings were calibrated on (refused when they overlap)
    heldout = check_heldout(hp.source, cfg.data, index[0] if index else cfg.offset,
                            (index[-1] + 1 - index[0]) if index else 0, cfg.allow_calibration_records)
    method = spec(cfg.method)
    if method.check_model is not None:  # before the baseline is scored (memoir: an uncalibrated store model)
        method.check_model(lm, hp)
    layers = method.edit_layers(hp, lm.adapter.num_layers)  # memoir: its one memory layer
    n_batches = math.ceil(cfg.edits / cfg.batch)
    eval_every = cfg.eval_every or max(1, n_batches // 10)
    fluency_prompts = [r[ds.prompt_field] for r in records[: cfg.fluency_prompts]]
    ref_text = heldout_text()
    log = ProgressLog(progress)
    ck = _resume_point(lm, cfg, checkpoint, log) if resume else None
    resumed_after = ck.batches_done if ck else 0
    # the final evaluation's saved pieces (beside the checkpoint); any from an earlier run go
    partial = None if checkpoint is None else Path(checkpoint).with_name(Path(checkpoint).stem + ".eval.json")
    if partial is not None and (ck is None or ck.batches_done < n_batches):
        partial.unlink(missing_ok=True)

    t = time.perf_counter()
    reference = ds.reference(lm, records)  # the unedited model's answers that locality compares with
    if ck is None:
        key, parts = baseline_key(lm, cfg.dataset, records, fluency_prompts, cfg.fluency_tokens, ref_text,
                                  cfg.ppl_tokens, cfg.freegen_tokens)
        cached = load_baseline(ws.cache_dir, key) if baseline_cache else None
        if cached is not None:
            baseline = dict(cached["baseline"])
            baseline_source = {"cached": True, "key": key, "measured": cached["measured"],
                               "seconds": cached["seconds"]}
        else:
            baseline = _baseline_metrics(lm, ds, records, reference, ids, fluency_prompts, ref_text, cfg.ppl_tokens,
                                         cfg.fluency_tokens, cfg.freegen_tokens)
            save_baseline(ws.cache_dir, key, parts, baseline, time.perf_counter() - t)
            baseline_source = {"cached": False, "key": key}
    else:  # measured before the first batch
        baseline = dict(ck.extra["baseline"])
        baseline_source = ck.extra.get("baseline_source") or {"cached": False}
    eval_seconds = time.perf_counter() - t + (ck.extra["eval_seconds"] if ck else 0.0)
    log(f"baseline: {_fmt_row(baseline)} ({eval_seconds:.0f}s"
        + (f"; read from the workspace cache, scored {baseline_source['measured']} in {baseline_source['seconds']:.0f}s)"
           if baseline_source["cached"] else ")"))

    caches = EditCaches()  # the edit session's: filled here, so its batches find them ready
    t = time.perf_counter()
    # statistics only where the method's spec reads them; the editor
    setup = prepare_edit(lm, cfg.method, ws, hp=hp, stats_corpus=cfg.stats_corpus, stats_tokens=cfg.stats_tokens,
                         stats_progress=progress)
    stats = setup.stats
    prefixes = context_prefixes(lm, hp.n_prefixes, hp.prefix_len, hp.prefix_seed, ws.cache_dir, caches.prefixes)
    # work the first batch would do, done here (AlphaEdit: the null-space projectors)
    nullspace = method.prepare(lm, hp, stats, layers, caches) if method.prepare is not None else {}
    one_time = time.perf_counter() - t + (ck.extra["one_time_seconds"] if ck else 0.0)
    log(f"one-time work {one_time:.1f}s (stats {getattr(stats, 'n_tokens', 0)} tokens, {len(prefixes) - 1} prefixes"
        + (f", null-space dims {nullspace}" if nullspace else "") + ")")

    if ck is None:
        session = setup.session(lm, caches=caches)
        curve: list[dict] = []
    else:
        session = setup.resume(lm, ck, caches, applied=requests)
        curve = ck.extra["curve"]
        checkpoint_every = checkpoint_every or ck.extra["checkpoint_every"]
        log(f"resumed after batch {session.batches_done}/{n_batches} ({session.n_edits} edits) from {checkpoint}")
    checkpoint_seconds = 0.0
    first_state = ck.extra.get("first_state") if ck else None  # state size after the first batch

    def after_batch(rep: BatchReport) -> None:
        nonlocal eval_seconds, first_state
        if first_state is None:
            first_state = {"edits": rep.done, "bytes": state_bytes(rep.result.state)}
        b, dt, res, done = rep.index, rep.seconds, rep.result, rep.done
        met = sum(d.constraint_met for d in res.diagnostics)
        z = res.layer_info.get("z", {}).get("relative_residual_after")
        steps = sum(d.vstar_steps for d in res.diagnostics) / max(len(res.diagnostics), 1)
        warm = res.layer_info.get("memory", {}).get("warm_started")
        log(f"batch {b + 1}/{n_batches}: {dt:.1f}s ({dt / rep.n:.2f} s/edit), v* met {met}/{rep.n} "
            f"in {steps:.1f} steps" + (f" ({warm:.0f} warm-started)" if warm else "")
            + (f", z residual {z:.3f}" if z is not None else "")
            + (f", norm anchor skipped {sum(d.norm_anchor_skipped for d in res.diagnostics)}"
               if "norm_anchor" in res.layer_info else ""))
        if b == n_batches - 1:  # the last point is the final evaluation's (every record): not scored twice
            curve.append({"edits": done, "records": len(records)})
        elif (b + 1) % eval_every == 0:
            t = time.perf_counter()
            pick = curve_sample(done, cfg.curve_records)
            ref = None if reference is None else [reference[i] for i in pick]
            cf = ds.evaluate(lm, [records[i] for i in pick], ref, [ids[i] for i in pick])
            point = {"edits": done, **{k: cf[k] for k in ds.metrics}, "records": len(pick)}
            point["perplexity"] = perplexity(lm, ref_text, max_tokens=cfg.ppl_tokens)
            eval_seconds += time.perf_counter() - t
            curve.append(point)
            log(f"after {done} edits: " + " ".join(f"{k} {point[k]:.3f}" for k in ds.metrics)
                + f" perplexity {point['perplexity']:.2f}")
        if checkpoint is not None and checkpoint_every > 0 and ((b + 1) % checkpoint_every == 0
                                                                or b == n_batches - 1):
            save_checkpoint(f"batch {b + 1}")
        if on_batch is not None:
            on_batch(rep)

    def save_checkpoint(after: str) -> None:
        nonlocal checkpoint_seconds
        t = time.perf_counter()
        extra = {"config": _jsonable(asdict(cfg)), "model_hash": lm.manifest.model_hash, "baseline": baseline,
                 "curve": curve, "eval_seconds": eval_seconds, "one_time_seconds": one_time,
                 "peak_memory_mb": peak_memory_mb(lm.device), "checkpoint_every": checkpoint_every,
                 "first_state": first_state, "baseline_source": baseline_source}
        session.checkpoint(extra).save(checkpoint)
        checkpoint_seconds += time.perf_counter() - t
        log(f"checkpoint after {after} -> {checkpoint} ({time.perf_counter() - t:.1f}s)")

    if ck is None and checkpoint is not None and checkpoint_every > 0:
        save_checkpoint("the baseline")  # over 10,000 records the baseline is a long evaluation of its own

    result = session.apply(requests[session.n_edits:], cfg.batch, after_batch)
    edit_seconds = session.seconds
    diags = [asdict(d) for d in result.diagnostics]
    layer_infos = result.batch_layer_info

    edited, final_seconds = _final_metrics(session, ds, records, reference, ids, fluency_prompts, ref_text, cfg.ppl_tokens,
                            cfg.fluency_tokens, partial, {"config": _jsonable(asdict(cfg)),
                                                          "model_hash": lm.manifest.model_hash,
                                                          "edits_applied": session.n_edits, "chunk": EVAL_CHUNK},
                            log, cfg.freegen_tokens)
    eval_seconds += final_seconds
    curve[-1].update({k: edited[k] for k in ds.metrics}, perplexity=edited["perplexity"])
    edited["seconds_per_edit"] = edit_seconds / cfg.edits
    edited["edit_seconds"] = edit_seconds
    edited["one_time_seconds"] = one_time
    edited["peak_memory_mb"] = max(peak_memory_mb(lm.device), ck.extra["peak_memory_mb"] if ck else 0.0)
    edited["device"] = device_str(lm.device)
    edited.update(edit_footprint(result.deltas, result.state, cfg.edits, (first_state or {}).get("bytes"),
                                 (first_state or {}).get("edits")))
    baseline.update(seconds_per_edit=None, one_time_seconds=None, peak_memory_mb=None, device=edited["device"])
    log(f"edited:   {_fmt_row(edited)}  {edited['seconds_per_edit']:.2f} s/edit")
    if edit_out is not None:
        from kedit.editors.base import EditResult
        from kedit.editors.io import save_edit

        save_edit(edit_out, EditResult(deltas=result.deltas, state=result.state, diagnostics=[], seconds=edit_seconds),
                  {"benchmark": asdict(cfg), "requests": [r.to_dict() for r in requests]})
        log(f"edit ({len(requests)} requests, {n_batches} batches) -> {edit_out}")
    return {
        "config": {**asdict(cfg), "model": lm.slug, "model_hash": lm.manifest.model_hash, "layers": layers,
                   "hparams": hp.to_dict(), "threads": torch.get_num_threads(),
                   # T-Patcher trains its patches directly and runs no v*
                   "v_matmul_dtype": resolve_v_dtype(hp.v_dtype, lm.device) if method.writes_vstar else None,
                   "stats": {"dir": str(stats.dir), "key": stats.key, "n_tokens": stats.n_tokens} if stats else None,
                   "prefixes": prefixes, "nullspace_dim": nullspace, "eval_seconds": eval_seconds,
                   "baseline_source": baseline_source, "load_average": _loadavg(), "subject_fallbacks": ds.subject_fallbacks(records),
                   # the UTC date the run ended: `kedit bench tables` dates each row from it
                   "created": time.strftime("%Y-%m-%d", time.gmtime()),
                   "skipped_records": skipped, "heldout": heldout.to_dict(),
                   **({"checkpoint": {"path": str(checkpoint), "every": checkpoint_every,
                                      "write_seconds": checkpoint_seconds, "resumed_after_batches": resumed_after}}
                      if checkpoint is not None else {})},
        "baseline": baseline,
        "edited": edited,
        "curve": curve,
        "diagnostics": diags,
        "layer_info": layer_infos,
    }


def _baseline_source_note(src: dict | None) -> str:
    """How the unedited row was obtained, for the report (runs from before the cache say nothing)."""
    if not src or not src.get("cached"):
        return ""
    return (f" (the unedited row read from the workspace cache: scored {src['measured']} in "
            f"{src['seconds']:.0f} s by a run on the same model, records and scoring code)")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _resume_point(lm, cfg: LifelongConfig, checkpoint: str | Path | None, log):
    """The checkpoint to continue from (``None``: none written yet, start at the first batch), after
    checking that it belongs to this configuration and model."""
    from kedit.editors.session import SessionCheckpoint

    if checkpoint is None:
        raise ValueError("resume needs the checkpoint file (run with --out and --checkpoint-every)")
    if not Path(checkpoint).exists():
        log(f"no checkpoint at {checkpoint}: starting from the first batch")
        return None
    ck = SessionCheckpoint.load(checkpoint)
    # a setting added to LifelongConfig after the checkpoint was written counts as its default
    old = {**_jsonable(asdict(LifelongConfig())), **(ck.extra.get("config") or {})}
    new = _jsonable(asdict(cfg))
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(f"{checkpoint} was written by a run with other settings ({', '.join(diff)} differ): "
                         "resume with the same arguments, or start a new output directory")
    if ck.extra.get("model_hash") != lm.manifest.model_hash:
        raise ValueError(f"{checkpoint} was written for another model ({str(ck.extra.get('model_hash'))[:12]}, "
                         f"this is {lm.manifest.model_hash[:12]})")
    return ck


def curve_sample(done: int, limit: int) -> list[int]:
    """Indices of the records a curve point scores: all ``done`` edited so far, or at most ``limit``
    of them evenly spaced (first and last included) when ``limit`` > 0."""
    if limit <= 0 or done <= limit:
        return list(range(done))
    if limit == 1:
        return [done - 1]
    return sorted({round(i * (done - 1) / (limit - 1)) for i in range(limit)})


def _loadavg() -> list[float] | None:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


SHORT = {"efficacy": "ES", "generalization": "PS", "specificity": "NS", "reliability": "Rel",
         "locality": "Loc"}


def _dataset_of(res_or_config: dict):
    c = res_or_config.get("config", res_or_config)
    return get_dataset(c.get("dataset", "counterfact"))


def _fmt_row(m: dict) -> str:
    from kedit.evaluation.freegen import FREEGEN_KEYS
    from kedit.evaluation.freegen import SHORT as GEN_SHORT

    keys = [k for k in ("efficacy", "reliability", "generalization", "specificity", "locality") if k in m]
    gen = [k for k in FREEGEN_KEYS if k in m]
    return (" ".join([f"{SHORT[k]} {m[k]:.3f}" for k in keys] + [f"{GEN_SHORT[k]} {m[k]:.3f}" for k in gen]) + " "
            f"GE {m['fluency']:.1f} greedy GE {m['greedy_entropy']:.1f} PPL {m['perplexity']:.2f} NKL {m['nkl']:.4f}")


def _heldout_sentence(d: dict) -> str:
    from kedit.calibration.split import HeldoutCheck

    return HeldoutCheck(**d).sentence()


def results_markdown(res: dict) -> str:
    c, b, e = res["config"], res["baseline"], res["edited"]
    fs = b["fluency_setup"]
    ds = _dataset_of(res)
    from kedit.evaluation.freegen import FREEGEN_KEYS
    from kedit.evaluation.freegen import SHORT as GEN_SHORT

    gen_cols = [k for k in FREEGEN_KEYS if k in b and k in e]
    cols = [k for k in ds.report if k in b] + gen_cols
    head = {"efficacy_magnitude": "EM", "score": "S", **GEN_SHORT}

    def cells(m: dict) -> str:
        return " | ".join(f"{m[k]:.3f}" for k in cols)

    def rel(key: str) -> str:
        return f"{100 * (e[key] - b[key]) / b[key]:+.1f}%" if b[key] else "–"

    lines = [
        f"# Lifelong editing: {c['method']} on {c['model']}",
        "",
        f"{c['edits']} {ds.title} from `{Path(c['data']).name}` (offset {c['offset']}), batches of "
        f"{c['batch']}, all metrics after the last batch. Layers {c['layers']}; device {e['device']}; "
        + (f"v* matmuls in {c['v_matmul_dtype']}; " if c.get("v_matmul_dtype") else "") +
        f"load average at the end {c['load_average']}." + "".join(
            f" Left out as invalid: record {k['record']} ({k['reason']})." for k in c.get("skipped_records", [])),
        "",
        *([_heldout_sentence(c["heldout"]), ""] if c.get("heldout") else []),
        "| run | " + " | ".join(head.get(k, k) for k in cols) + " | fluency (x100) | greedy entropy (x100) | "
        "perplexity | NKL | canary agreement | s/edit | added bytes/edit |",
        "|---|" + "---|" * (len(cols) + 7),
        f"| unedited | {cells(b)} | {b['fluency']:.1f} | {b['greedy_entropy']:.1f} | {b['perplexity']:.2f} "
        "| – | – | – | – |",
        f"| {c['method']} T{c['edits']} B{c['batch']} | {cells(e)} | {e['fluency']:.1f} ({rel('fluency')}) | "
        f"{e['greedy_entropy']:.1f} ({rel('greedy_entropy')}) | {e['perplexity']:.2f} ({rel('perplexity')}) | "
        f"{e['nkl']:.4f} | {_fmt(e.get('canary_agreement'), '.3f')} | {e['seconds_per_edit']:.2f} | "
        f"{_fmt(e.get('added_bytes_per_edit'), ',.0f')} |",
        "",
        f"- editing time {e['edit_seconds']:.1f} s ({e['seconds_per_edit']:.2f} s/edit); one-time work "
        f"(statistics, prefixes, projectors; near 0 when cached by an earlier run) {e['one_time_seconds']:.1f} s; "
        f"evaluation {c['eval_seconds']:.0f} s" + _baseline_source_note(c.get("baseline_source")),
        *([f"- 95% intervals over the {c['edits']} records (Wilson): " + ", ".join(
            f"{k} [{lo:.2f}, {hi:.2f}]" for k in ds.metrics
            for lo, hi in [wilson_interval(round(e[k] * c["edits"]), c["edits"])])] if ds.name == "counterfact" else
          [f"- {', '.join(ds.metrics)}: mean over the {c['edits']} records of the per-record token-level accuracy "
           "under teacher forcing (reliability: tokens of ` alt` after `src` that are the argmax prediction; "
           "generalization: the same after `rephrase`; locality: tokens of ` loc_ans` after `loc` whose argmax "
           f"is the unedited model's); subject found only case-insensitively in {c.get('subject_fallbacks', 0)} "
           "questions"]),
        f"- peak memory {e['peak_memory_mb']:.0f} MB",
        *([f"- memory growth: summed weight deltas {e['delta_bytes']:,} B + editor state {e['state_bytes']:,} B "
           f"= {e['added_bytes']:,} B, {e['added_bytes_per_edit']:,.0f} B per edit; editor state growth per edit "
           f"after the first batch {_fmt(e.get('state_growth_bytes_per_edit'), ',.0f')} B"] if "added_bytes" in e
          else []),
        "- canary agreement (docs/metrics.md) on the locality prompts: share whose greedy next token is unchanged",
        *([f"- free generation (docs/metrics.md): {c.get('freegen_tokens')} greedy tokens after "
           f"each record's edit (`{ds.prompt_field}`), paraphrase (`{ds.paraphrase_field}`) and neighbourhood "
           f"(`{ds.locality_field}`) prompt, no target fed in; ES gen / PS gen: share of edit / paraphrase "
           f"continuations that begin with the new object (`{ds.object_field}`, whole word, case-sensitive), "
           "∋: that contain it anywhere; NS gen / NS gen ∌: share of neighbourhood continuations that do not "
           "begin with / do not contain it"] if gen_cols else []),
        f"- fluency (docs/metrics.md generation entropy): {fs['new_tokens']} new tokens after each of the first "
        f"{fs['prompts']} edit prompts (`{ds.prompt_field}`), top-k sampling with k={fs['top_k']} from seed {fs['seed']}, "
        f"all prompts in one batch; n-gram entropy of the generated text only (word and punctuation tokens, "
        f"2-/3-grams weighted 2/3 and 4/3, log2), mean over prompts, x100",
        f"- greedy entropy: the same n-gram entropy on greedy {fs['new_tokens']}-token continuations of the "
        f"same prompts (sampling noise does not mask repetition there)",
        f"- perplexity on {c['ppl_tokens']} held-out tokens; "
        + (f"statistics {c['stats']['n_tokens']} tokens" if c.get("stats") else "no key statistics (the editor "
           "adds parameters and reads none)"),
    ]
    if c.get("nullspace_dim"):
        lines.append(f"- null-space dimension per layer: {c['nullspace_dim']}")
    infos = res.get("layer_info") or []
    z_miss = [i["z"]["relative_residual_after"] for i in infos if "z" in i]
    if z_miss:
        lines.append(f"- share of the wanted output change not written (prefix-averaged): mean "
                     f"{sum(z_miss) / len(z_miss):.3f} over batches")
    ctx_miss = [i["contexts"]["worst_relative_residual_after"] for i in infos if "contexts" in i]
    if ctx_miss:
        lines.append(f"- key mode `contexts`: worst per-context share not written {max(ctx_miss):.3f}")
    met = sum(d["constraint_met"] for d in res["diagnostics"])
    lines.append(f"- v* early-stop constraint met for {met}/{len(res['diagnostics'])} requests; mean steps "
                 f"{sum(d['vstar_steps'] for d in res['diagnostics']) / max(1, len(res['diagnostics'])):.1f}")
    lines += ["", "## Curve (records edited so far, or an evenly spaced sample of them; perplexity of the held-out "
              "text)", "", "| edits | records scored | " + " | ".join(ds.metrics) + " | perplexity |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {p['edits']} | {p.get('records', p['edits'])} | " + " | ".join(f"{p[k]:.3f}" for k in ds.metrics)
              + " | " + (f"{p['perplexity']:.2f} |" if "perplexity" in p else "– |") for p in res["curve"]]
    return "\n".join(lines) + "\n"


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


# colour, marker, and the dash pattern of the unedited baseline (told apart even where two coincide)
CURVE_STYLE = {"efficacy": ("tab:blue", "o", (0, (6, 3))), "generalization": ("tab:green", "s", (0, (1.5, 1.5))),
               "specificity": ("tab:red", "^", (0, (8, 2, 2, 2)))}


def curve_intervals(res: dict, key: str) -> list[tuple[float, float]]:
    """95% Wilson interval of ``key`` at each curve point (over the records edited so far), the same
    interval the report prints for the final numbers."""
    if _dataset_of(res).name != "counterfact":  # token-level means, not counts: no binomial interval
        return [(p[key], p[key]) for p in res["curve"]]
    return [wilson_interval(round(p[key] * p.get("records", p["edits"])), p.get("records", p["edits"]))
            for p in res["curve"]]


def plot_curve(res: dict, path: str | Path) -> None:
    """Efficacy, generalization and specificity of the records edited so far with 95% Wilson error bars;
    each unedited baseline a dashed line in its metric's colour, labelled at the right; perplexity
    change on its own axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["edits"] for p in res["curve"]]
    fig, ax = plt.subplots(figsize=(7.4, 4.4))
    edited, bases = [], []
    dodge = 0.006 * (max(xs) - min(xs) or max(xs))  # error bars at one x side by side, not on top
    for j, (key, (colour, marker, dashes)) in enumerate(zip(_dataset_of(res).metrics, CURVE_STYLE.values())):
        ys = [p[key] for p in res["curve"]]
        ci = curve_intervals(res, key)
        # specificity is a mean over neighbour prompts, not a count: keep the bar on its side of the point
        err = [[max(0.0, y - lo) for y, (lo, _) in zip(ys, ci)], [max(0.0, hi - y) for y, (_, hi) in zip(ys, ci)]]
        edited.append(ax.errorbar([x + (j - 1) * dodge for x in xs], ys, yerr=err, marker=marker, color=colour, capsize=3, lw=1.5,
                                  label=f"{key} (edited)"))
        base = res["baseline"][key]
        bases.append(ax.axhline(base, color=colour, ls=dashes, lw=1.3, alpha=0.8,
                                label=f"{key}, unedited: {base:.2f}"))
    c = res["config"]
    ax.set(xlabel="records edited so far", ylabel="share of those records (95% interval)", ylim=(0, 1.05),
           title=f"{c['method']} on {c['model']}, batches of {c['batch']} (dashed: the unedited model)")
    handles = [*edited, *bases]  # the legend fills by column: edited curves, then their baselines
    ppl = [(p["edits"], p["perplexity"]) for p in res["curve"] if "perplexity" in p]
    if ppl:  # damage to general text on its own axis: % over the unedited model's perplexity
        base = res["baseline"]["perplexity"]
        ax2 = ax.twinx()
        rel = [100 * (y / base - 1) for _, y in ppl]
        line, = ax2.plot([x for x, _ in ppl], rel, marker="D", ms=4, color="dimgray", ls=":",
                         label="perplexity change, % (right axis)")
        ax2.set_ylabel("perplexity change vs unedited (%)")
        ax2.set_ylim(min(0.0, *rel) - 1, max(1.0, *rel) * 1.3)
        handles += [line, plt.Line2D([], [], alpha=0, label=" ")]  # 8 entries: 3 columns of 3, 3, 2
    fig.legend(handles, [h.get_label() for h in handles], loc="lower center", ncol=3 if ppl else 2, fontsize=8,
               frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(res: dict, out_dir: str | Path, markdown, plot, plot_name: str) -> Path:
    """``results.json``, ``results.md`` (``markdown(res)``) and a plot (``plot(res, path)``) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", res)
    write_text_atomic(out / "results.md", markdown(res))
    plot(res, out / plot_name)
    return out


def write_results(res: dict, out_dir: str | Path) -> Path:
    return write_report(res, out_dir, results_markdown, plot_curve, "curve.png")
