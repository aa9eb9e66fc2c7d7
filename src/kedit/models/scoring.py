"""Scoring a causal LM: the primitives every metric, gate and check is built from.

Tokenisation and padding (right padding with explicit position ids for scoring, left padding for
generation, so a prompt scores the same alone or in a batch; a tokenizer without a pad token uses its
eos token), teacher-forced target log-probabilities, next-token distributions, greedy and sampled
generation, and the two feed-row checks built on greedy decoding (:func:`predicts_targets`,
:func:`greedy_answers`). Metrics (:mod:`kedit.evaluation.metrics`) and the lineage's model checks
sit on top of these; this module depends on the loaded model only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from kedit.models.store import LoadedModel

# Upper bound on one batch's logits (elements) so the 49k-vocab models stay within a few hundred MB.
MAX_LOGIT_ELEMENTS = 64 * 1024 * 1024


# --- tokenisation and padding ------------------------------------------------------------------
def pad_id(tokenizer) -> int:
    """The pad token id, falling back to eos (many causal-LM tokenizers have no pad token)."""
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    if pid is None:
        raise ValueError(f"{type(tokenizer).__name__}: tokenizer has neither a pad nor an eos token")
    return int(pid)


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt (special tokens as the tokenizer adds them, e.g. a BOS)."""
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} is {type(p).__name__}, expected str")
        ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {i} ({p!r}) has no tokens; a target needs a non-empty prompt")
        out.append(list(ids))
    return out


def encode_targets(tokenizer, targets: Sequence[str]) -> list[list[int]]:
    """Token ids of ``" " + target`` without special tokens (the target follows the prompt)."""
    out = []
    for i, t in enumerate(targets):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"target {i} ({t!r}) is empty; every target needs at least one token")
        out.append(list(tokenizer(" " + t.strip(), add_special_tokens=False)["input_ids"]))
    return out


def right_pad(seqs: Sequence[Sequence[int]], pad: int, device=None) -> tuple[torch.Tensor, ...]:
    """``(input_ids, attention_mask, position_ids)`` with right padding; positions count from 0."""
    n, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((n, T), pad, dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    pos = torch.arange(T).unsqueeze(0).expand(n, T).clone()
    return ids.to(device), mask.to(device), pos.to(device)


def left_pad(seqs: Sequence[Sequence[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with left padding, as batched generation needs."""
    n, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((n, T), pad, dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
    return ids.to(device), mask.to(device)


def length_batches(order: list[int], lengths: list[int], batch_size: int, vocab: int) -> list[list[int]]:
    """Split ``order`` into batches of at most ``batch_size`` whose logits stay under the memory cap."""
    out, cur, cur_max = [], [], 0
    for i in order:
        m = max(cur_max, lengths[i])
        if cur and (len(cur) >= batch_size or (len(cur) + 1) * m * vocab > MAX_LOGIT_ELEMENTS):
            out.append(cur)
            cur, m = [], lengths[i]
        cur.append(i)
        cur_max = m
    if cur:
        out.append(cur)
    return out


def forward_logits(lm: LoadedModel, ids, mask, pos) -> torch.Tensor:
    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return out.logits.float()


def logits_at(lm: LoadedModel, ids, mask, pos, keep: torch.Tensor) -> torch.Tensor:
    """Logits at the ``True`` positions of ``keep`` (``[b, L]`` bool), flattened row by row to
    ``[keep.sum(), V]`` float32.

    Scoring needs a handful of positions per sequence; projecting only those onto the vocabulary
    (transformers' ``logits_to_keep`` mask) skips most of the unembedding and the log-softmax (on
    SmolLM2-135M the 576 x 49,152 unembedding is about a fifth of the multiply-adds per token). Models whose
    forward lacks ``logits_to_keep`` get the full logits, indexed the same way."""
    keep = keep.to(ids.device)
    if lm.takes_logits_to_keep:
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                       logits_to_keep=keep)
        return out.logits.reshape(-1, out.logits.shape[-1]).float()
    return forward_logits(lm, ids, mask, pos)[keep]


# --- target scoring ----------------------------------------------------------------------------
def teacher_forced(lm: LoadedModel, prompts: Sequence[str], targets: Sequence[str], batch_size: int
                    ) -> tuple[list[list[int]], Iterator[tuple[torch.Tensor, list[tuple[int, slice]]]]]:
    """Teacher-forced passes over ``(prompt, " " + target)`` pairs: each pair's target token ids, and per
    length-sorted batch (little padding) the logits that predict target tokens, ``[n_tokens, V]``, with
    ``(pair, rows)`` where ``logits[rows]`` predict the pair's target tokens in order (the logits at
    position j predict token j+1; no other position is projected onto the vocabulary).
    Run it under ``torch.no_grad()``."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    tok = lm.tokenizer
    p_ids, t_ids = encode_prompts(tok, prompts), encode_targets(tok, targets)
    seqs = [p + t for p, t in zip(p_ids, t_ids)]
    lengths = [len(s) for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: (lengths[i], i))
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    pad = pad_id(tok)

    def passes() -> Iterator[tuple[torch.Tensor, list[tuple[int, slice]]]]:
        for batch in length_batches(order, lengths, batch_size, vocab):
            ids, mask, pos = right_pad([seqs[i] for i in batch], pad, lm.device)
            keep = torch.zeros(ids.shape, dtype=torch.bool)
            rows, start = [], 0
            for row, i in enumerate(batch):
                first = len(p_ids[i]) - 1
                keep[row, first: first + len(t_ids[i])] = True
                rows.append((i, slice(start, start + len(t_ids[i]))))
                start += len(t_ids[i])
            yield logits_at(lm, ids, mask, pos, keep), rows

    return t_ids, passes()


def score_pairs(lm: LoadedModel, prompts: Sequence[str], targets: Sequence[str],
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed target log-probs and target token counts, ``[n]`` each, in few batched passes
    (results in input order)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    n = len(prompts)
    if n == 0:
        return torch.zeros(0), torch.zeros(0)
    with torch.no_grad():
        t_ids, passes = teacher_forced(lm, prompts, targets, batch_size)
        sums = torch.zeros(n, dtype=torch.float64)
        counts = torch.tensor([len(t) for t in t_ids], dtype=torch.float64)
        for logits, rows in passes:
            logp = torch.log_softmax(logits, dim=-1)
            for i, at in rows:
                preds = logp[at]
                tgt = torch.tensor(t_ids[i], device=preds.device)
                sums[i] = preds.gather(1, tgt[:, None]).sum().double().cpu()
    return sums, counts


def target_logprobs(lm: LoadedModel, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32,
                    reduce: str = "mean") -> torch.Tensor:
    """Teacher-forced log-probability of the tokens of ``" " + target`` after each prompt, ``[n]``.

    ``reduce="mean"`` is docs/metrics.md's score (mean per-token log-prob); ``"sum"`` the sequence log-prob.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    sums, counts = score_pairs(lm, prompts, targets, batch_size)
    return (sums / counts if reduce == "mean" else sums).float()


def next_token_logprobs(lm: LoadedModel, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Log-probabilities of the next token after each prompt, ``[n, V]`` float32 on CPU."""
    if not prompts:
        raise ValueError("next_token_logprobs: no prompts")
    seqs = encode_prompts(lm.tokenizer, prompts)
    lengths = [len(s) for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: (lengths[i], i))
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    out = torch.empty(len(seqs), vocab, dtype=torch.float32)
    pad = pad_id(lm.tokenizer)
    with torch.no_grad():
        for batch in length_batches(order, lengths, batch_size, vocab):
            ids, mask, pos = right_pad([seqs[i] for i in batch], pad, lm.device)
            keep = torch.zeros(ids.shape, dtype=torch.bool)
            keep[torch.arange(len(batch)), torch.tensor([lengths[i] - 1 for i in batch])] = True
            rows = logits_at(lm, ids, mask, pos, keep)  # one per sequence, in batch order
            out[torch.tensor(batch)] = torch.log_softmax(rows, dim=-1).cpu()
    return out


def greedy_tokens(lm: LoadedModel, prompts: Sequence[str], k: int = 1, batch_size: int = 32,
                  by_length: bool = False) -> torch.Tensor:
    """The first ``k`` greedy tokens after each prompt, ``[n, k]`` (batched, left-padded, no EOS stop;
    ``by_length``: batches of similar lengths, see :func:`generate_tokens`)."""
    return generate_tokens(lm, prompts, k, do_sample=False, batch_size=batch_size, by_length=by_length)


def generate_tokens(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int, do_sample: bool,
                    top_k: int = 5, seed: int = 0, batch_size: int | None = 16, by_length: bool = False
                    ) -> torch.Tensor:
    """New tokens ``[n, max_new_tokens]`` in the prompts' order; exactly that many per prompt (EOS does
    not stop it).

    Prompts are left-padded and generated ``batch_size`` at a time (``None``: all in one call), in the
    given order or, with ``by_length``, sorted by token count (ties in input order) so that a batch
    carries little padding: for many prompts of mixed lengths (free generation over a benchmark's
    records) that is most of the padded positions saved. Sampling is plain top-k (temperature 1, no
    top-p, no repetition penalty, whatever the model's generation config says) from ``seed``; the draws
    depend on the batch, so a fixed prompt list, batch size and order give the same tokens every time.
    The caller's random stream is left as it was."""
    if max_new_tokens < 1:
        raise ValueError(f"generation: max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"generation: batch_size must be at least 1 (or None: one batch), got {batch_size}")
    if not prompts:
        raise ValueError("generation: no prompts")
    seqs = encode_prompts(lm.tokenizer, prompts)
    pad = pad_id(lm.tokenizer)
    out = torch.empty(len(seqs), max_new_tokens, dtype=torch.long)
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=pad,
                  do_sample=do_sample, repetition_penalty=1.0, no_repeat_ngram_size=0)
    if do_sample:
        kwargs.update(top_k=top_k, top_p=1.0, temperature=1.0, min_p=None, typical_p=1.0)
    else:
        kwargs.update(top_k=None, top_p=None, temperature=None)
    step = batch_size or len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i)) if by_length else list(range(len(seqs)))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(order), step):
            chunk = order[start: start + step]
            ids, mask = left_pad([seqs[i] for i in chunk], pad, lm.device)
            gen = lm.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            out[torch.tensor(chunk)] = gen[:, ids.shape[1]:].cpu()
    return out


# --- feed-row checks on greedy decoding ----------------------------------------------------------
def predicts_targets(lm: LoadedModel, rows: Sequence[dict[str, Any]]) -> list[bool]:
    """Which rows the model already answers with ``target_new`` under greedy decoding (one batch)."""
    if not rows:
        return []
    prompts = [r["prompt"].format(r["subject"]) for r in rows]
    targets = encode_targets(lm.tokenizer, [r["target_new"] for r in rows])
    k = max(len(t) for t in targets)
    got = greedy_tokens(lm, prompts, k=k)
    return [got[i, : len(t)].tolist() == t for i, t in enumerate(targets)]


def greedy_answers(lm: LoadedModel, prompts: Sequence[str], k: int = 4) -> list[str]:
    """The model's short greedy answer to each prompt: the first word of a ``k``-token continuation."""
    if not prompts:
        return []
    toks = greedy_tokens(lm, list(prompts), k=k)
    out = []
    for row in toks.tolist():
        text = lm.tokenizer.decode(row, skip_special_tokens=True)
        m = re.search(r"[\w][\w'.-]*", text)
        out.append(m.group(0).rstrip(".") if m else (text.strip() or "?"))
    return out


def greedy_continuations_text(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 6) -> dict[str, str]:
    """Each prompt's greedy continuation of ``max_new_tokens`` tokens, decoded, keyed by the prompt."""
    toks = greedy_tokens(lm, list(prompts), k=max_new_tokens)
    return {p: lm.tokenizer.decode(t, skip_special_tokens=True) for p, t in zip(prompts, toks.tolist())}
