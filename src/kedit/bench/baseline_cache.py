"""The unedited model's benchmark metrics, kept in the workspace cache so a second run on the same records
does not score them again.

Scoring the unedited model is a full evaluation of its own (on Gemma 3 270M at T=1,000: CounterFact
scores, 3,000 free-generation prompts, fluency and perplexity, half an hour on a 2-core CPU), and it
is the same for every method and setting tried on those records. A cached baseline is used only where
everything it depends on is equal: the model's content hash, its device and dtype, the records, the
prompts and token counts of each measurement, the held-out text, the torch and transformers versions
and the source of the code that scores it (so a change to a metric invalidates every cached
baseline). The file is written atomically; an unreadable one counts as absent.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from kedit.atomic import write_json_atomic

CACHE_SUBDIR = "bench-baseline"
# the modules whose code computes a baseline: their source is part of the key
SCORING_MODULES = ("kedit.evaluation.metrics", "kedit.evaluation.freegen", "kedit.bench.datasets",
                   "kedit.models.scoring", "kedit.bench.lifelong")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scoring_code_hash(modules: tuple[str, ...] = SCORING_MODULES) -> str:
    """sha256 over the source files of ``modules`` (in order)."""
    import importlib

    h = hashlib.sha256()
    for name in modules:
        h.update(name.encode() + b"\0" + Path(importlib.import_module(name).__file__).read_bytes() + b"\0")
    return h.hexdigest()


def baseline_key(lm, dataset: str, records: list[dict], fluency_prompts: list[str], fluency_tokens: int,
                 ref_text: str, ppl_tokens: int, freegen_tokens: int) -> tuple[str, dict[str, Any]]:
    """The cache key of a baseline (hex sha256) and what it was computed from (kept in the file)."""
    import torch
    import transformers

    param = next(lm.model.parameters())
    parts = {"model_hash": lm.manifest.model_hash, "device": str(param.device), "dtype": str(param.dtype),
             "dataset": dataset, "records": _sha(json.dumps(records, sort_keys=True).encode()),
             "n_records": len(records),
             "fluency_prompts": _sha(json.dumps(fluency_prompts).encode()), "fluency_tokens": fluency_tokens,
             "ref_text": _sha(ref_text.encode()), "ppl_tokens": ppl_tokens, "freegen_tokens": freegen_tokens,
             "torch": torch.__version__, "transformers": transformers.__version__, "code": scoring_code_hash()}
    return _sha(json.dumps(parts, sort_keys=True).encode()), parts


def baseline_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / CACHE_SUBDIR / f"{key}.json"


def load_baseline(cache_dir: str | Path, key: str) -> dict[str, Any] | None:
    """The cached entry (``baseline``, ``seconds``, ``measured``, ``parts``) or None when there is none
    or it cannot be read."""
    path = baseline_path(cache_dir, key)
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("baseline"), dict):
        return None
    return entry


def save_baseline(cache_dir: str | Path, key: str, parts: dict[str, Any], baseline: dict[str, Any],
                  seconds: float) -> Path:
    path = baseline_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"key": key, "parts": parts, "baseline": baseline, "seconds": round(seconds, 1),
                             "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return path
