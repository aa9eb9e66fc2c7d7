"""Drift gate: the candidate against the *base* model, not only against the champion.

The champion gate bounds one night's change; a hundred nights that each pass it can still add up to a
broken model. These checks compare the candidate with the unedited model the lineage starts from, on
the same measures the champion gate uses (perplexity of the reference text, greedy canary agreement,
next-token KL on the canary + neighbourhood prompts), with their own thresholds (params.yaml ``drift:``).

The base model's side never changes for a given base model and prompt set, so it is computed once and
cached under ``<workspace>/.kedit-cache/drift/<base hash>/<prompt-set key>/``; a later gate on the same
prompts loads it without loading or running the base model, and a gate on a new prompt set computes
only the prompts (and the reference text) that no earlier entry of the same base holds.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kedit.atomic import save_tensors_atomic, sha256_bytes, sha256_json, sha256_tensor, write_json_atomic
from kedit.evaluation import metrics as M
from kedit.evaluation.canary import CanarySuite, compare
from kedit.evaluation.gates import check_settings, gate_check
from kedit.models.store import LoadedModel

CHECK_PREFIX = "drift_"
CACHE_VERSION = 1
KEEP_ENTRIES = 8  # prompt sets cached per base model: each night's new neighbourhoods make a new one


@dataclass
class DriftPolicy:
    """Thresholds of the cumulative drift from the base model (params.yaml ``drift:``); ``None`` disables
    a check. Looser than the nightly bounds (one night's change), tighter than what breaks the model."""

    max_perplexity_increase_pct: float | None = 10.0  # 100 (PPL_candidate / PPL_base - 1), reference text
    min_canary_agreement: float | None = 0.8  # prompts whose first gates.canary_k greedy tokens match base
    max_neighbourhood_kl: float | None = 0.1  # mean next-token KL(base || candidate), nats

    @classmethod
    def from_dict(cls, data: dict, where: str = "drift") -> DriftPolicy:
        check_settings(cls, data, where, "drift", allow_bool=False)
        return cls(**{k: (None if v is None else float(v)) for k, v in data.items()})

    @classmethod
    def from_params(cls, path: str | Path | None = None, workspace=None) -> DriftPolicy:
        """The ``drift:`` block of params.yaml, found by :func:`kedit.params.find_params`."""
        from kedit.params import load_params

        params = load_params(path, workspace)
        return cls.from_dict(params.block("drift"), where=f"{params.source}: drift")


# --- the base model's reference outputs, cached ----------------------------------------------------
def text_sha256(text: str | None) -> str | None:
    return None if text is None else sha256_bytes(text.encode("utf-8"))


def prompt_set_key(prompts: Sequence[str], k: int, text: str | None, reference_tokens: int) -> str:
    """What the base's reference outputs depend on besides the base model: the prompts (in order), the
    greedy tokens kept, the reference text and how many of its tokens are scored."""
    return sha256_json({"v": CACHE_VERSION, "prompts": list(prompts), "k": int(k), "text": text_sha256(text),
                        "reference_tokens": int(reference_tokens)})


def cache_root(workspace) -> Path:
    """``<workspace>/.kedit-cache/drift`` for a Workspace (or a folder standing for its root)."""
    cache = getattr(workspace, "cache_dir", None)
    return Path(cache if cache is not None else Path(workspace) / ".kedit-cache") / "drift"


@dataclass
class BaseReference:
    """The base model's outputs the drift checks compare with: greedy tokens ``[n, k]`` and next-token
    log-probabilities ``[n, V]`` per prompt, and the per-token NLL of the reference text (or ``None``)."""

    model_hash: str
    key: str
    prompts: list[str]
    greedy: torch.Tensor
    logprobs: torch.Tensor
    reference_nll: torch.Tensor | None
    text_sha256: str | None
    reference_tokens: int
    computed: int = 0  # prompts the base model was run on to build this (0: all from the cache)
    computed_text: bool = False

    @property
    def k(self) -> int:
        return int(self.greedy.shape[1])

    @property
    def perplexity(self) -> float | None:
        return None if self.reference_nll is None else math.exp(float(self.reference_nll.mean()))

    def suite(self) -> CanarySuite:
        """The rows as a canary suite, so the candidate is scored by :func:`kedit.evaluation.canary.compare`."""
        return CanarySuite(model="base", model_hash=self.model_hash, prompts=list(self.prompts),
                           sources=["drift"] * len(self.prompts), greedy=self.greedy, logprobs=self.logprobs)

    def save(self, out_dir: Path) -> Path:
        """Tensors first, then the JSON that names their hashes: a crash between leaves an entry that
        fails :meth:`load` and is recomputed, never a wrong one."""
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {"greedy": self.greedy.contiguous(), "logprobs": self.logprobs.contiguous()}
        if self.reference_nll is not None:
            tensors["reference_nll"] = self.reference_nll.contiguous()
        save_tensors_atomic(out_dir / "reference.safetensors", tensors, metadata={"model_hash": self.model_hash})
        write_json_atomic(out_dir / "reference.json", {
            "version": CACHE_VERSION, "model_hash": self.model_hash, "key": self.key, "prompts": self.prompts,
            "k": self.k, "text_sha256": self.text_sha256, "reference_tokens": self.reference_tokens,
            "perplexity": self.perplexity, "tensors_sha256": {n: sha256_tensor(t) for n, t in tensors.items()}})
        return out_dir

    @classmethod
    def load(cls, d: Path) -> BaseReference | None:
        """The entry in ``d``, or ``None`` when it is absent, incomplete or does not match its hashes."""
        from safetensors.torch import load_file

        meta_p, tens_p = d / "reference.json", d / "reference.safetensors"
        if not meta_p.is_file() or not tens_p.is_file():
            return None
        try:
            meta = json.loads(meta_p.read_text(encoding="utf-8"))
            t = load_file(str(tens_p))
        except (OSError, ValueError):
            return None
        want = meta.get("tensors_sha256") or {}
        if meta.get("version") != CACHE_VERSION or set(want) != set(t) or any(
                sha256_tensor(t[n]) != h for n, h in want.items()):
            return None
        return cls(model_hash=meta["model_hash"], key=meta["key"], prompts=meta["prompts"], greedy=t["greedy"],
                   logprobs=t["logprobs"], reference_nll=t.get("reference_nll"), text_sha256=meta["text_sha256"],
                   reference_tokens=int(meta["reference_tokens"]))


def base_reference(base: LoadedModel | Callable[[], LoadedModel], base_hash: str, prompts: Sequence[str],
                   k: int = 1, text: str | None = None, reference_tokens: int = 4096,
                   cache: Path | None = None, batch_size: int = 32, keep: int = KEEP_ENTRIES) -> BaseReference:
    """The base model's reference outputs on ``prompts`` (and ``text``), from ``cache`` when it holds them.

    ``base``: the base model, or a function that loads it (called only when something must be computed);
    ``base_hash``: its content hash (the cache key; checked against the model when it is loaded);
    ``keep``: entries kept per base model (newest first; each holds ``[n, V]`` float32 log-probabilities).
    """
    prompts = list(dict.fromkeys(p for p in prompts if p))
    if not prompts:
        raise ValueError("drift: no prompts to compare the candidate with the base on")
    key = prompt_set_key(prompts, k, text, reference_tokens)
    where = cache / base_hash[:16] / key[:16] if cache is not None else None
    if where is not None:
        hit = BaseReference.load(where)
        if hit is not None and hit.key == key and hit.model_hash == base_hash:
            return hit
    # reuse the rows (and the text NLL) that earlier entries of this base already hold
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    nll = None
    tsha = text_sha256(text)
    if where is not None and where.parent.is_dir():
        for d in _entries_newest_first(where.parent):
            if all(p in rows for p in prompts) and (text is None or nll is not None):
                break
            old = BaseReference.load(d)
            if old is None or old.model_hash != base_hash:
                continue
            if old.k >= k:
                for i, p in enumerate(old.prompts):
                    rows.setdefault(p, (old.greedy[i, :k], old.logprobs[i]))
            if nll is None and text is not None and old.text_sha256 == tsha \
                    and old.reference_tokens == reference_tokens and old.reference_nll is not None:
                nll = old.reference_nll
    missing = [p for p in prompts if p not in rows]
    need_text = text is not None and nll is None
    if missing or need_text:
        lm = base() if callable(base) else base
        if lm.manifest.model_hash != base_hash:
            raise ValueError(f"drift: the base model loaded has hash {lm.manifest.model_hash[:12]}, "
                             f"the lineage records {base_hash[:12]}")
        if missing:
            g = M.greedy_tokens(lm, missing, k=k, batch_size=batch_size)
            lp = M.next_token_logprobs(lm, missing, batch_size=batch_size)
            rows.update({p: (g[i], lp[i]) for i, p in enumerate(missing)})
        if need_text:
            nll = M.token_nlls(lm, text, max_tokens=reference_tokens)
    ref = BaseReference(model_hash=base_hash, key=key, prompts=prompts,
                        greedy=torch.stack([rows[p][0] for p in prompts]),
                        logprobs=torch.stack([rows[p][1] for p in prompts]), reference_nll=nll, text_sha256=tsha,
                        reference_tokens=reference_tokens, computed=len(missing), computed_text=need_text)
    if where is not None:
        ref.save(where)
        for old_dir in _entries_newest_first(where.parent)[max(1, keep):]:
            if old_dir != where:
                shutil.rmtree(old_dir, ignore_errors=True)
    return ref


def _entries_newest_first(base_dir: Path) -> list[Path]:
    def mtime(d: Path) -> float:
        try:
            return (d / "reference.json").stat().st_mtime
        except OSError:
            return 0.0

    return sorted((d for d in base_dir.iterdir() if d.is_dir()), key=mtime, reverse=True)


# --- the checks ---------------------------------------------------------------------------------
def perplexity_increase_pct(base_ppl: float, candidate_ppl: float) -> float:
    """100 (PPL_candidate / PPL_base - 1): the cumulative perplexity change since the base model."""
    return 100.0 * (candidate_ppl / base_ppl - 1.0)


@dataclass
class DriftGate:
    """What :func:`kedit.evaluation.gates.run_gates` needs to add the drift checks: the base's cached
    reference outputs, the thresholds and the gate's canary_k (greedy tokens compared)."""

    reference: BaseReference
    policy: DriftPolicy
    canary_k: int = 1
    reference_text: str | None = None  # the text the reference NLL was computed on

    def checks(self, candidate: LoadedModel, gate_checks: Sequence = (), gate_text: str | None = None,
               gate_tokens: int | None = None, answers=None) -> list:
        """The drift checks (names ``drift_*``, ``against="base"``) for ``candidate``.

        ``gate_checks``: the champion checks already run; the candidate's perplexity is taken from their
        ``perplexity_increase_pct`` when it scored the same text (``gate_text``, ``gate_tokens`` tokens),
        so the candidate is not scored twice; ``answers``: the candidate's answers memo the champion
        checks filled (its canary and neighbourhood prompts are not scored again).
        """

        ref, pol = self.reference, self.policy
        out = []
        base_ppl = ref.perplexity
        name = CHECK_PREFIX + "perplexity_increase_pct"
        if base_ppl is None or pol.max_perplexity_increase_pct is None:
            out.append(gate_check(name, None, pol.max_perplexity_increase_pct, "max", base_ppl,
                              detail="disabled" if pol.max_perplexity_increase_pct is None else "no reference text"))
        else:
            ppl_check = next((c for c in gate_checks if c.name == "perplexity_increase_pct"), None)
            same = (ppl_check is not None and ppl_check.after is not None and gate_text is not None
                    and text_sha256(gate_text) == ref.text_sha256 and gate_tokens == ref.reference_tokens)
            if same:
                cand_ppl = float(ppl_check.after)  # the champion gate scored the candidate on this very text
            elif self.reference_text is not None:
                cand_ppl = M.perplexity(candidate, self.reference_text, max_tokens=ref.reference_tokens)
            else:
                raise ValueError("drift: the base reference has a reference-text NLL but the drift gate was "
                                 "given no reference_text to score the candidate on")
            inc = perplexity_increase_pct(base_ppl, cand_ppl)
            thr = pol.max_perplexity_increase_pct
            out.append(gate_check(name, inc, thr, "max", base_ppl, cand_ppl, base_ppl * (1 + thr / 100),
                              f"PPL base {base_ppl:.2f} -> candidate {cand_ppl:.2f}"))
        # canary agreement and next-token KL against the base's stored answers
        cmp = compare(ref.suite(), candidate, k=min(self.canary_k, ref.k), answers=answers)
        out.append(gate_check(CHECK_PREFIX + "canary_agreement", cmp.agreement, pol.min_canary_agreement, "min", 1.0,
                          cmp.agreement, pol.min_canary_agreement,
                          f"{len(cmp.changed)} of {len(ref.prompts)} answers differ from the base model's"))
        out.append(gate_check(CHECK_PREFIX + "neighbourhood_kl", cmp.kl, pol.max_neighbourhood_kl, "max", 0.0, cmp.kl,
                          pol.max_neighbourhood_kl, f"mean KL(base || candidate) over {len(ref.prompts)} prompts"))
        for c in out:
            c.against = "base"
        return out


def drift_summary(checks: Sequence, base_hash: str | None = None) -> dict:
    """The cumulative drift numbers recorded with a state's gate verdict in the lineage:
    ``{"perplexity_increase_pct": .., "canary_agreement": .., "neighbourhood_kl": .., "passed": ..}``."""
    mine = [c for c in checks if getattr(c, "against", "champion") == "base"]
    out: dict = {c.name.removeprefix(CHECK_PREFIX): c.value for c in mine}
    out["passed"] = all(c.passed for c in mine)
    if base_hash:
        out["base_model_hash"] = base_hash
    return out


def drift_label(gate: dict | None) -> str:
    """``drift ppl +x.x%`` for ``kedit lineage log`` from a recorded gate verdict ('' when none)."""
    d = (gate or {}).get("drift") or {}
    v = d.get("perplexity_increase_pct")
    if v is None:
        return ""
    return f"drift ppl {v:+.1f}%" + ("" if d.get("passed", True) else " (drift FAIL)")


def build_drift_gate(base: LoadedModel | Callable[[], LoadedModel], base_hash: str, prompts: Sequence[str],
                     policy: DriftPolicy, canary_k: int = 1, text: str | None = None, reference_tokens: int = 4096,
                     cache: Path | None = None) -> DriftGate:
    """The drift gate for one candidate: the base reference (cached), its thresholds, the text it scores.
    ``text`` is dropped when the perplexity check is disabled, so the base never scores it for nothing."""
    text = text if policy.max_perplexity_increase_pct is not None else None
    ref = base_reference(base, base_hash, prompts, k=max(1, canary_k), text=text, reference_tokens=reference_tokens,
                         cache=cache)
    return DriftGate(ref, policy, canary_k=max(1, canary_k), reference_text=text)
