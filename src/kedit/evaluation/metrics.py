"""Edit-quality metrics of docs/metrics.md as one module: target scoring, CounterFact efficacy /
generalization / specificity / magnitude / score, fluency (generation entropy), perplexity,
neighbourhood KL and canary agreement.

Everything is batched and padding-correct whatever the tokenizer's ``padding_side``: sequences are
padded here by hand (right padding with explicit position ids for scoring, left padding for
generation), so a prompt scores the same alone or in a batch. A tokenizer without a pad token uses
its eos token.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from kedit.models.scoring import (  # noqa: F401 (the scoring primitives, importable from here as before)
    encode_prompts,
    encode_targets,
    forward_logits,
    generate_tokens,
    greedy_tokens,
    left_pad,
    length_batches,
    next_token_logprobs,
    pad_id,
    right_pad,
    score_pairs,
    target_logprobs,
    teacher_forced,
)
from kedit.models.store import LoadedModel

# Shannon entropies of the 2-gram and 3-gram distributions are weighted 2/3 and 4/3 (ROME/MEMIT).
NGRAM_WEIGHTS = {2: 2 / 3, 3: 4 / 3}
_WORD_RE = re.compile(r"\w+|[^\w\s]")


# --- CounterFact -------------------------------------------------------------------------------
COUNTERFACT_FIELDS = ("case_id", "prompt", "target_new", "subject", "ground_truth", "rephrase_prompt",
                      "locality_prompt", "locality_ground_truth")
EFFICACY_FIELDS = ("case_id", "prompt", "target_new", "ground_truth")  # what efficacy alone reads


def check_fields(records: Sequence[dict], fields: Sequence[str], strings: Sequence[str], where: str,
                 kind: str = "", id_field: str | None = None) -> None:
    """Raise a clear error naming the record and field when a record is not a dict, lacks one of
    ``fields`` or has an empty / non-string value in one of ``strings``."""
    for k, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{where}[{k}]: expected a dict, got {type(r).__name__}")
        at = f"{where}[{k}]" + (f" ({id_field}={r.get(id_field)!r})" if id_field else "")
        missing = [f for f in fields if f not in r]
        if missing:
            raise ValueError(f"{at}: missing {kind}fields {missing}")
        for f in strings:
            if not isinstance(r[f], str) or not r[f].strip():
                raise ValueError(f"{at}: {kind}field {f!r} must be a non-empty string")


def check_counterfact(records: Sequence[dict], where: str = "records", efficacy_only: bool = False) -> None:
    """Raise a clear error naming the record and field if a flat CounterFact record is malformed
    (``efficacy_only``: only the fields efficacy reads are required)."""
    fields = EFFICACY_FIELDS if efficacy_only else COUNTERFACT_FIELDS
    check_fields(records, fields, fields[1:], where, id_field="case_id")


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 if any value is 0 (a metric at zero sinks the score, as in the papers)."""
    if not values:
        return float("nan")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a success rate (95% for z = 1.96). Per-record metrics are counts over
    few records: 92 of 100 is [0.85, 0.96], so a 0.95 target cannot be told apart from it. Reports
    print this so a difference of a record or two is not read as a result."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n and n > 0, got {successes} of {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class CounterFactResult:
    efficacy: float
    generalization: float
    specificity: float
    efficacy_magnitude: float
    score: float
    n: int
    ids: list = field(default_factory=list)
    efficacy_ok: list[bool] = field(default_factory=list)
    generalization_ok: list[bool] = field(default_factory=list)
    specificity_ok: list[bool] = field(default_factory=list)
    magnitude: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_counterfact(lm: LoadedModel, records: Sequence[dict], batch_size: int = 32) -> dict:
    """ES / PS / NS / EM / S of docs/metrics.md for flat CounterFact records, with per-record verdicts.

    All 6 (prompt, target) pairs of all records are scored together in length-sorted batches.
    Ties count as failures. Returns a dict (see :class:`CounterFactResult`); ``failed_ids`` lists the
    records whose edit did not take (efficacy failure).
    """
    check_counterfact(records)
    n = len(records)
    if n == 0:
        raise ValueError("evaluate_counterfact: no records")
    prompts, targets = [], []
    for r in records:
        prompts += [r["prompt"], r["prompt"], r["rephrase_prompt"], r["rephrase_prompt"],
                    r["locality_prompt"], r["locality_prompt"]]
        targets += [r["target_new"], r["ground_truth"], r["target_new"], r["ground_truth"],
                    r["locality_ground_truth"], r["target_new"]]
    sums, counts = score_pairs(lm, prompts, targets, batch_size)
    mean = (sums / counts).view(n, 6)
    total = sums.view(n, 6)
    return counterfact_result([r["case_id"] for r in records], (mean[:, 0] > mean[:, 1]).tolist(),
                              (mean[:, 2] > mean[:, 3]).tolist(), (mean[:, 4] > mean[:, 5]).tolist(),
                              (total[:, 0].exp() - total[:, 1].exp()).tolist())


def evaluate_efficacy(lm: LoadedModel, records: Sequence[dict], batch_size: int = 32) -> dict:
    """ES alone (the edit prompt's two pairs of :func:`evaluate_counterfact`, the same verdicts): what
    retention asks of earlier edits, at a third of the scoring. Returns ``ids``, ``efficacy`` and
    ``efficacy_ok``; the records need only the fields efficacy reads."""
    check_counterfact(records, efficacy_only=True)
    if not records:
        raise ValueError("evaluate_efficacy: no records")
    prompts = [r["prompt"] for r in records for _ in (0, 1)]
    targets = [t for r in records for t in (r["target_new"], r["ground_truth"])]
    sums, counts = score_pairs(lm, prompts, targets, batch_size)
    mean = (sums / counts).view(len(records), 2)
    ok = (mean[:, 0] > mean[:, 1]).tolist()
    return {"ids": [r["case_id"] for r in records], "efficacy": sum(ok) / len(ok), "efficacy_ok": ok}


def counterfact_result(ids: list, es: list[bool], ps: list[bool], ns: list[bool], em: list[float]) -> dict:
    """:func:`evaluate_counterfact`'s result from its per-record verdicts and magnitudes (also how the
    results of consecutive record chunks join into the one over all of them)."""
    n = len(es)
    if n == 0 or not len(ids) == len(ps) == len(ns) == len(em) == n:
        raise ValueError(f"counterfact_result: {len(ids)} ids, {n}/{len(ps)}/{len(ns)}/{len(em)} ES/PS/NS/EM values")
    res = CounterFactResult(
        efficacy=sum(es) / n, generalization=sum(ps) / n, specificity=sum(ns) / n,
        efficacy_magnitude=sum(em) / n, score=0.0, n=n, ids=list(ids),
        efficacy_ok=es, generalization_ok=ps, specificity_ok=ns, magnitude=em,
    )
    res.score = harmonic_mean([res.efficacy, res.generalization, res.specificity])
    out = res.to_dict()
    out["failed_ids"] = [i for i, ok in zip(res.ids, es) if not ok]
    return out


# --- next-token distributions, KL, canary agreement -----------------------------------------------
def kl_rows(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per-row KL(P_before || P_after) from log-probabilities ``[n, V]`` (nats)."""
    if before.shape != after.shape:
        raise ValueError(f"KL: shapes differ, before {tuple(before.shape)} vs after {tuple(after.shape)}")
    b, a = before.double(), after.double()
    p = b.exp()
    # 0 * log 0 = 0: where P_before is zero the term vanishes whatever P_after is
    terms = torch.where(p > 0, p * (b - a), torch.zeros_like(p))
    return terms.sum(-1).clamp_min(0.0)


def neighbourhood_kl(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean KL(P_before || P_after) over prompts, from next-token log-probabilities ``[n, V]``."""
    return float(kl_rows(before, after).mean())


def canary_agreement(before_tokens: torch.Tensor, after_tokens: torch.Tensor, k: int | None = None) -> float:
    """Fraction of canary prompts whose first ``k`` greedy tokens (default all stored) are unchanged."""
    if before_tokens.shape[0] != after_tokens.shape[0]:
        raise ValueError(f"canary: {before_tokens.shape[0]} stored prompts vs {after_tokens.shape[0]} candidate")
    if before_tokens.shape[0] == 0:
        raise ValueError("canary: empty suite")
    if before_tokens.dim() == 1:
        before_tokens, after_tokens = before_tokens[:, None], after_tokens[:, None]
    k = k or before_tokens.shape[1]
    same = (before_tokens[:, :k] == after_tokens[:, :k]).all(dim=1)
    return float(same.double().mean())


# --- generation and fluency --------------------------------------------------------------------
# docs/metrics.md's fluency (GE): 100 new tokens per prompt, top-k sampling with k = 5 from a fixed seed.
FLUENCY_TOKENS = 100
FLUENCY_TOP_K = 5
FLUENCY_SEED = 0


def word_tokens(text: str) -> list[str]:
    """Words and punctuation marks (each mark its own token), the units of the n-gram entropy."""
    return _WORD_RE.findall(text)


def ngram_counts(words: Sequence[str], n: int) -> Counter:
    """Frequencies of the ``n``-grams (consecutive word tuples) of ``words``."""
    return Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))


def shannon_entropy_bits(counts: Counter) -> float:
    """Shannon entropy (log base 2) of the frequency distribution ``counts``; 0 when empty."""
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def weighted_ngram_entropy(words: Sequence[str], weights: dict[int, float] | None = None) -> float:
    """docs/metrics.md's per-text entropy: mean over n of ``weight_n * H(n-grams)``, i.e.
    ``(2/3 * H2 + 4/3 * H3) / 2`` for the default weights (bits, not x100)."""
    weights = weights or NGRAM_WEIGHTS
    return sum(w * shannon_entropy_bits(ngram_counts(words, n)) for n, w in weights.items()) / len(weights)


def ngram_entropy(text: str, weights: dict[int, float] | None = None) -> float:
    """:func:`weighted_ngram_entropy` of the word tokens of ``text``."""
    return weighted_ngram_entropy(word_tokens(text), weights)


def mean_entropy_x100(texts: Sequence[str]) -> float:
    """The reported figure: 100 x the mean over texts of :func:`ngram_entropy`."""
    if not texts:
        raise ValueError("entropy: no texts")
    return 100.0 * sum(ngram_entropy(t) for t in texts) / len(texts)


def _decode(lm: LoadedModel, new: torch.Tensor) -> list[str]:
    return [lm.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in new]


def sampled_continuations(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = FLUENCY_TOKENS,
                          top_k: int = FLUENCY_TOP_K, seed: int = FLUENCY_SEED) -> list[str]:
    """The text of ``max_new_tokens`` top-k-sampled tokens after each prompt (without the prompt), all
    prompts in one left-padded ``generate`` call from ``seed``: the same list gives the same texts."""
    return _decode(lm, generate_tokens(lm, prompts, max_new_tokens, do_sample=True, top_k=top_k, seed=seed,
                                 batch_size=None))


def greedy_continuations(lm: LoadedModel, prompts: Sequence[str],
                         max_new_tokens: int = FLUENCY_TOKENS) -> list[str]:
    """The text of the ``max_new_tokens`` greedy tokens after each prompt (without the prompt)."""
    return _decode(lm, generate_tokens(lm, prompts, max_new_tokens, do_sample=False, batch_size=None))


def generation_entropy(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = FLUENCY_TOKENS,
                       top_k: int = FLUENCY_TOP_K, seed: int = FLUENCY_SEED) -> float:
    """Fluency (GE) exactly as docs/metrics.md defines it, x100: per prompt, ``max_new_tokens`` (100) new
    tokens by top-k sampling (k = 5) from a fixed seed; the n-gram entropy of that generated text
    (words and punctuation; 2- and 3-grams, log2, weights 2/3 and 4/3, averaged); mean over prompts."""
    return mean_entropy_x100(sampled_continuations(lm, prompts, max_new_tokens, top_k, seed))


def greedy_entropy(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = FLUENCY_TOKENS) -> float:
    """The same n-gram entropy x100 on greedy continuations: no sampling noise to mask repetition, so it
    falls sooner than :func:`generation_entropy` when edits make the model repeat itself."""
    return mean_entropy_x100(greedy_continuations(lm, prompts, max_new_tokens))


# --- perplexity --------------------------------------------------------------------------------
def token_nlls(lm: LoadedModel, text: str, max_tokens: int = 20000, window: int = 512,
               batch_size: int = 4) -> torch.Tensor:
    """Per-token NLL (nats, float64, in text order) of the first ``max_tokens`` tokens of ``text``, read
    in non-overlapping windows of ``window`` tokens (clipped to the model's context); the first token of
    each window is context only. :func:`perplexity` is ``exp`` of their mean; analyses use them as they are."""
    if not text or not text.strip():
        raise ValueError("perplexity: empty reference text")
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    ctx = getattr(lm.model.config, "max_position_embeddings", None) or getattr(lm.model.config, "n_positions", window)
    window = max(2, min(window, int(ctx)))
    chunks = [ids[i: i + window] for i in range(0, len(ids), window)]
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise ValueError(f"perplexity: reference text has {len(ids)} token(s); need at least 2")
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    lengths = [len(c) for c in chunks]
    out: dict[int, torch.Tensor] = {}
    pad = pad_id(lm.tokenizer)
    with torch.no_grad():
        for batch in length_batches(list(range(len(chunks))), lengths, batch_size, vocab):
            inp, mask, pos = right_pad([chunks[i] for i in batch], pad, lm.device)
            logp = torch.log_softmax(forward_logits(lm, inp, mask, pos), dim=-1)
            tgt_lp = logp[:, :-1].gather(2, inp[:, 1:, None]).squeeze(2)
            for row, i in enumerate(batch):
                out[i] = -tgt_lp[row, : lengths[i] - 1].double().cpu()
    return torch.cat([out[i] for i in range(len(chunks))])


def perplexity(lm: LoadedModel, text: str, max_tokens: int = 20000, window: int = 512,
               batch_size: int = 4) -> float:
    """Token-level perplexity: ``exp`` of the mean of :func:`token_nlls`."""
    return math.exp(float(token_nlls(lm, text, max_tokens, window, batch_size).mean()))


# --- zsRE: token-level accuracy under teacher forcing --------------------------------------------
def target_token_predictions(lm: LoadedModel, prompts: Sequence[str], targets: Sequence[str],
                             batch_size: int = 32) -> tuple[list[list[int]], list[list[int]]]:
    """The argmax token the model predicts at each position of ``" " + target`` after its prompt (teacher
    forcing: position i sees the prompt and the true target tokens before i), and the target's token ids.

    One forward pass per length-sorted batch of pairs; lists come back in input order."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        return [], []
    preds: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        t_ids, passes = teacher_forced(lm, prompts, targets, batch_size)
        for logits, rows in passes:
            top = logits.argmax(dim=-1).cpu()
            for i, at in rows:
                preds[i] = top[at].tolist()
    return preds, t_ids


def token_accuracy(predicted: Sequence[int], target: Sequence[int]) -> float:
    """Fraction of positions where the predicted token equals the target token (zsRE's reliability /
    generalization per record, and its locality with the unedited model's predictions as the target)."""
    if len(predicted) != len(target) or not target:
        raise ValueError(f"token_accuracy: need equal non-empty lengths, got {len(predicted)} and {len(target)}")
    return sum(int(p == t) for p, t in zip(predicted, target)) / len(target)


ZSRE_FIELDS = ("subject", "src", "rephrase", "alt", "loc", "loc_ans")


def check_zsre(records: Sequence[dict], where: str = "records") -> None:
    """Raise a clear error naming the record and field if a zsRE record is malformed."""
    check_fields(records, ZSRE_FIELDS, ZSRE_FIELDS, where, kind="zsRE ")


def zsre_locality_predictions(lm: LoadedModel, records: Sequence[dict], batch_size: int = 32) -> list[list[int]]:
    """The model's argmax predictions over ``loc_ans`` after ``loc`` (teacher forcing): what an edited
    model's locality is measured against, taken from the unedited model."""
    return target_token_predictions(lm, [r["loc"] for r in records], [r["loc_ans"] for r in records],
                                    batch_size)[0]


def evaluate_zsre(lm: LoadedModel, records: Sequence[dict], loc_before: Sequence[Sequence[int]] | None = None,
                  batch_size: int = 32, ids: Sequence | None = None) -> dict:
    """zsRE's metrics as in MEND / ROME / MEMIT / EasyEdit, each a mean over records of a per-record
    token-level accuracy under teacher forcing:

    - **reliability**: fraction of the tokens of ``" " + alt`` after ``src`` that are the argmax prediction;
    - **generalization**: the same on ``rephrase``;
    - **locality**: fraction of the positions of ``" " + loc_ans`` after ``loc`` whose argmax prediction
      equals the unedited model's (``loc_before``, from :func:`zsre_locality_predictions`); 1.0 when
      ``loc_before`` is None (the model compared with itself).

    All three prompt sets are scored together in length-sorted batches. ``failed_ids`` lists the records
    whose reliability is below 1 (some token of the new answer is not the argmax)."""
    check_zsre(records)
    n = len(records)
    if n == 0:
        raise ValueError("evaluate_zsre: no records")
    if loc_before is not None and len(loc_before) != n:
        raise ValueError(f"evaluate_zsre: {len(loc_before)} locality references for {n} records")
    prompts = [r["src"] for r in records] + [r["rephrase"] for r in records] + [r["loc"] for r in records]
    targets = [r["alt"] for r in records] * 2 + [r["loc_ans"] for r in records]
    preds, t_ids = target_token_predictions(lm, prompts, targets, batch_size)
    rel = [token_accuracy(preds[i], t_ids[i]) for i in range(n)]
    gen = [token_accuracy(preds[n + i], t_ids[n + i]) for i in range(n)]
    loc_now = preds[2 * n:]
    ref = loc_now if loc_before is None else loc_before
    loc = [token_accuracy(loc_now[i], ref[i]) for i in range(n)]
    return zsre_result(list(range(n)) if ids is None else list(ids), rel, gen, loc, loc_now)


def zsre_result(ids: list, rel: list[float], gen: list[float], loc: list[float], loc_now: list) -> dict:
    """:func:`evaluate_zsre`'s result from its per-record accuracies and locality predictions (also how
    the results of consecutive record chunks join into the one over all of them)."""
    n = len(rel)
    if n == 0 or not len(ids) == len(gen) == len(loc) == len(loc_now) == n:
        raise ValueError(f"zsre_result: {len(ids)} ids, {n}/{len(gen)}/{len(loc)}/{len(loc_now)} per-record values")
    return {"reliability": sum(rel) / n, "generalization": sum(gen) / n, "locality": sum(loc) / n, "n": n,
            "ids": ids, "reliability_per_record": rel, "generalization_per_record": gen,
            "locality_per_record": loc, "locality_predictions": loc_now,
            "failed_ids": [i for i, a in zip(ids, rel) if a < 1.0]}
