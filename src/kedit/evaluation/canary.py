"""The canary suite: fixed prompts the champion answers today, with its greedy continuation and
next-token distribution stored, so a candidate can be compared with the champion without reloading it.

Stored per model under ``<workspace>/canary/<slug>/``: ``canary.safetensors`` (greedy token ids
``[n, k]`` and next-token log-probabilities ``[n, V]``) and ``canary.json`` (prompts, where each
came from, decoded continuations, the champion's model hash). No pickle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kedit.atomic import save_tensors_atomic, sha256_tensor, write_json_atomic
from kedit.evaluation import metrics as M
from kedit.evaluation.answers import ModelAnswers
from kedit.models.store import LoadedModel
from kedit.prompts import SHIPPED, parse_prompt_lines, shipped_prompts  # noqa: F401 (importable from here)
from kedit.workspace import Workspace


def neighbourhood_prompts(edits: Sequence[dict]) -> list[str]:
    """Neighbourhood prompts of past edits: flat CounterFact ``locality_prompt`` or request ``neighbors``."""
    out: list[str] = []
    for k, e in enumerate(edits):
        if not isinstance(e, dict):
            raise ValueError(f"edits[{k}]: expected a dict, got {type(e).__name__}")
        if isinstance(e.get("locality_prompt"), str) and e["locality_prompt"].strip():
            out.append(e["locality_prompt"].strip())
        for n in e.get("neighbors") or []:
            if isinstance(n, str) and n.strip():
                out.append(n.strip())
    return list(dict.fromkeys(out))


def canary_dir(ws: Workspace, slug: str) -> Path:
    return ws.root / "canary" / slug


@dataclass
class CanarySuite:
    model: str
    model_hash: str
    prompts: list[str]
    sources: list[str]  # "shipped" or "edit-neighbourhood"
    greedy: torch.Tensor  # [n, k] greedy token ids
    logprobs: torch.Tensor  # [n, V] next-token log-probabilities
    continuations: list[str] = field(default_factory=list)

    @property
    def k(self) -> int:
        return int(self.greedy.shape[1])

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(out / "canary.safetensors", {"greedy": self.greedy, "logprobs": self.logprobs},
                            metadata={"model": self.model, "model_hash": self.model_hash})
        write_json_atomic(out / "canary.json", {
            "model": self.model, "model_hash": self.model_hash, "n": len(self.prompts), "k": self.k,
            "prompts": self.prompts, "sources": self.sources, "continuations": self.continuations,
            "tensors_sha256": {"greedy": sha256_tensor(self.greedy), "logprobs": sha256_tensor(self.logprobs)},
        })
        return out

    @classmethod
    def load(cls, path: str | Path) -> CanarySuite:
        from safetensors.torch import load_file

        d = Path(path)
        meta_p, tens_p = d / "canary.json", d / "canary.safetensors"
        if not meta_p.exists() or not tens_p.exists():
            raise FileNotFoundError(f"{d}: no canary suite (canary.json + canary.safetensors); "
                                    f"build one with `kedit canary build --model SLUG`")
        meta = json.loads(meta_p.read_text())
        t = load_file(str(tens_p))
        for name in ("greedy", "logprobs"):
            want = meta.get("tensors_sha256", {}).get(name)
            if want and sha256_tensor(t[name]) != want:
                raise ValueError(f"{tens_p}: tensor {name!r} does not match its recorded sha256 (corrupt suite)")
        if t["greedy"].shape[0] != len(meta["prompts"]):
            raise ValueError(f"{d}: {t['greedy'].shape[0]} stored rows for {len(meta['prompts'])} prompts")
        return cls(model=meta["model"], model_hash=meta["model_hash"], prompts=meta["prompts"],
                   sources=meta["sources"], greedy=t["greedy"], logprobs=t["logprobs"],
                   continuations=meta.get("continuations", []))


def build_canary(lm: LoadedModel, prompts: Sequence[str] | None = None, edits: Sequence[dict] = (),
                 k: int = 8, max_prompts: int | None = None, batch_size: int = 32) -> CanarySuite:
    """Record the model's greedy continuation (``k`` tokens) and next-token distribution per prompt.

    Prompts: ``prompts`` (default: the shipped list) followed by the neighbourhood prompts of ``edits``.
    """
    base = list(prompts) if prompts is not None else shipped_prompts()
    neigh = [p for p in neighbourhood_prompts(edits) if p not in set(base)]
    allp = base + neigh
    sources = ["shipped"] * len(base) + ["edit-neighbourhood"] * len(neigh)
    if max_prompts:
        allp, sources = allp[:max_prompts], sources[:max_prompts]
    if not allp:
        raise ValueError("canary: no prompts")
    greedy = M.greedy_tokens(lm, allp, k=k, batch_size=batch_size)
    logprobs = M.next_token_logprobs(lm, allp, batch_size=batch_size)
    conts = [lm.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in greedy]
    return CanarySuite(model=lm.slug, model_hash=lm.manifest.model_hash, prompts=allp, sources=sources,
                       greedy=greedy, logprobs=logprobs, continuations=conts)


@dataclass
class CanaryComparison:
    agreement: float  # fraction of prompts whose first `k` greedy tokens are unchanged
    kl: float  # mean KL(P_champion || P_candidate) of the next token
    k: int
    changed: list[dict]  # prompts whose answer changed: prompt, before, after
    kl_per_prompt: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def compare(suite: CanarySuite, candidate: LoadedModel, k: int = 1, batch_size: int = 32,
            answers: ModelAnswers | None = None) -> CanaryComparison:
    """Candidate vs the stored champion answers: greedy agreement on the first ``k`` tokens and next-token KL.

    ``answers``: the candidate's memo of answers (:class:`~kedit.evaluation.answers.ModelAnswers`), shared
    with the gate's other checks so no prompt is scored twice."""
    if k > suite.k:
        raise ValueError(f"canary: agreement over {k} tokens but the suite stores only {suite.k}")
    if answers is not None and answers.lm is not candidate:
        raise ValueError("canary: the answers memo belongs to another model than the candidate")
    answers = answers or ModelAnswers(candidate, batch_size=batch_size)
    after = answers.greedy(suite.prompts, k)
    logp = answers.logprobs(suite.prompts)
    if logp.shape[1] != suite.logprobs.shape[1]:
        raise ValueError(f"canary: candidate vocabulary {logp.shape[1]} != suite's {suite.logprobs.shape[1]}")
    before = suite.greedy[:, :k]
    same = (before == after).all(1)
    tok = candidate.tokenizer
    changed = [{"prompt": p, "before": tok.decode(b.tolist()), "after": tok.decode(a.tolist())}
               for p, b, a, s in zip(suite.prompts, before, after, same.tolist()) if not s]
    kl = M.kl_rows(suite.logprobs, logp)
    return CanaryComparison(agreement=M.canary_agreement(before, after), kl=float(kl.mean()), k=k, changed=changed,
                            kl_per_prompt=kl.tolist())
