"""Tokenisation for editing: prompt rows (request × prefix), the subject's last token in each, and
the target tokens (``" " + target`` after the prompt, as the metrics score it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kedit.editors.base import EditRequest


@dataclass
class PromptRows:
    """One row per (request, prefix): token ids, the subject's last-token index, the owning request and
    the subject's first-token index (``subj_first < subj_pos``: the subject spans several tokens)."""

    ids: list[list[int]]
    subj_pos: list[int]
    req: list[int]
    n_requests: int
    subj_first: list[int] = field(default_factory=list)


def _encode_with_offsets(tok, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    enc = tok(texts, return_offsets_mapping=True)
    return [list(x) for x in enc["input_ids"]], [list(map(tuple, o)) for o in enc["offset_mapping"]]


def last_token_before(offsets: list[tuple[int, int]], char_end: int, where: str) -> int:
    """Index of the last token that starts before ``char_end`` (the subject's last token)."""
    pos = -1
    for i, (s, e) in enumerate(offsets):
        if e == 0 and s == 0 and i > 0:
            continue  # special token after the text
        if s < char_end:
            pos = i
    if pos < 0:
        raise ValueError(f"{where}: subject not found in the tokenised prompt")
    return pos


def subject_rows(tok, requests: list[EditRequest], prefixes: list[str], template: str | None = None
                 ) -> PromptRows:
    """Rows ``prefix + prompt`` for every request and prefix (or ``template`` with the subject, e.g.
    ``"{} is a"`` for the KL prompts), with the subject's last token located by character offsets."""
    texts, starts, ends, owners = [], [], [], []
    for r_i, r in enumerate(requests):
        prompt = template if template is not None else r.prompt
        head = prompt.index("{}")
        body = prompt.replace("{}", r.subject, 1)
        for p in prefixes:
            texts.append(p + body)
            starts.append(len(p) + head + len(r.subject) - len(r.subject.lstrip()))
            ends.append(len(p) + head + len(r.subject))
            owners.append(r_i)
    ids, offs = _encode_with_offsets(tok, texts)
    where = [f"request {requests[r].id or requests[r].subject!r}" for r in owners]
    pos = [last_token_before(o, e, w) for o, e, w in zip(offs, ends, where)]
    first = [last_token_before(o, s + 1, w) for o, s, w in zip(offs, starts, where)]
    return PromptRows(ids=ids, subj_pos=pos, req=owners, n_requests=len(requests), subj_first=first)


def target_ids(tok, targets: list[str]) -> list[list[int]]:
    out = []
    for t in targets:
        ids = tok(" " + t.strip(), add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"target {t!r} tokenises to nothing")
        out.append(list(ids))
    return out


def pad_right(seqs: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """Right padding: with a causal model, real tokens never see the pads, so no mask is needed and
    positions stay 0..n-1 — the padded batch computes exactly what each row would alone."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device)


def shared_heads(seqs: list[list[int]], split: list[int], min_len: int = 4) -> list[int]:
    """For each row, how many of its leading tokens (at most ``split``) it shares with every other row
    that starts with the same ``min_len`` tokens (0: none). Rows written behind the same random
    prefix share it token for token, and a causal model gives shared leading tokens the same keys
    and values in every row, so they are computed once per group instead of once per row."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (s, p) in enumerate(zip(seqs, split)):
        if p >= min_len:
            groups.setdefault(tuple(s[:min_len]), []).append(i)
    head = [0] * len(seqs)
    for rows in groups.values():
        if len(rows) < 2:
            continue
        m = min(split[i] for i in rows)
        first = seqs[rows[0]]
        for i in rows[1:]:
            s = seqs[i]
            j = min_len
            while j < m and s[j] == first[j]:
                j += 1
            m = j
        for i in rows:
            head[i] = m
    return head
