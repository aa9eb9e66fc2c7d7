"""Random prefixes ("context templates") that v* and the keys average over.

The model itself writes a few short continuations of generic openers once; they are cached on
disk under ``<cache_dir>/contexts/`` keyed by the model hash and the generation settings, so every
run with the same base model sees the same prefixes (reproducible edits, no regeneration cost).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kedit.atomic import sha256_json, write_json_atomic

OPENERS = ["The", "Therefore", "Because", "I", "You"]


def _clean(text: str) -> str:
    text = " ".join(text.replace("{", " ").replace("}", " ").split())
    return text


def generate_prefixes(lm, n: int, length: int, seed: int = 0) -> list[str]:
    """``n`` prefixes of ``length`` new tokens each, sampled (top-k 5) from the model with a fixed seed."""
    tok, model = lm.tokenizer, lm.model
    out: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    state = torch.random.get_rng_state()
    try:
        for i in range(n):
            opener = OPENERS[i % len(OPENERS)]
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            ids = tok(opener, return_tensors="pt").input_ids.to(lm.device)
            with torch.no_grad():
                seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                                     max_new_tokens=length, min_new_tokens=length,
                                     pad_token_id=tok.pad_token_id, eos_token_id=None)
            out.append(_clean(tok.decode(seq[0], skip_special_tokens=True)) + ". ")
    finally:
        torch.random.set_rng_state(state)
    return out


def context_prefixes(lm, n: int = 5, length: int = 10, seed: int = 0,
                     cache_dir: str | Path | None = None, memo: dict[str, list[str]] | None = None) -> list[str]:
    """``[""] + n`` model-written prefixes (the empty one is the bare prompt), cached on disk by model
    hash and in ``memo`` (a run's :attr:`kedit.editors.common.EditCaches.prefixes`) when given."""
    if n <= 0:
        return [""]
    key = sha256_json({"model": lm.manifest.model_hash, "n": n, "length": length, "seed": seed})[:20]
    path = Path(cache_dir) / "contexts" / f"{key}.json" if cache_dir else None
    if memo is not None and key in memo:
        prefixes = memo[key][1:]
    elif path is not None and path.exists():
        prefixes = json.loads(path.read_text())["prefixes"]
    else:
        prefixes = generate_prefixes(lm, n, length, seed)
    if path is not None and not path.exists():
        write_json_atomic(path, {"model_hash": lm.manifest.model_hash, "n": n, "length": length,
                                 "seed": seed, "prefixes": prefixes})
    out = [""] + list(prefixes)
    if memo is not None:
        memo[key] = out
    return list(out)
