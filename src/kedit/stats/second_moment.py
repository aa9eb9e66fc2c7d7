"""Streaming uncentred second moment of MLP keys, one forward pass per batch for all layers.

The key is the input of the edited matrix (for gated MLPs ``act(gate(x)) * up(x)``), read with a
pre-hook; padding positions are masked out. Per batch the Gram matrix is formed in the activation
dtype (float32) and added into a float64 running sum, so precision does not drift over millions
of tokens while the per-batch matmul stays fast.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from kedit.hooks import Trace


@dataclass
class RunningMoment:
    """Σ k kᵀ and the token count for one layer; ``moment()`` is the mean E[k kᵀ]."""

    dim: int
    total: torch.Tensor = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def add(self, keys: torch.Tensor) -> None:
        """Add a [n, dim] block of keys."""
        if keys.numel() == 0:
            return
        gram = keys.T @ keys
        self.total += gram.to(device="cpu", dtype=torch.float64)
        self.count += keys.shape[0]

    def moment(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no tokens accumulated")
        return self.total / self.count


def tokenize_batches(tokenizer, texts: Iterable[str], batch_size: int, seq_len: int,
                     sort_window: int = 64) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenise documents (truncated to ``seq_len``) and yield padded batches.

    Documents are sorted by length inside windows of ``sort_window * batch_size`` so batches hold
    similar lengths and little padding, while the stream stays bounded in memory.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    buf: list[list[int]] = []

    def flush(items: list[list[int]]) -> Iterator[dict[str, torch.Tensor]]:
        items = sorted(items, key=len)
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            width = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, x in enumerate(chunk):
                ids[r, :len(x)] = torch.tensor(x)
                mask[r, :len(x)] = 1
            yield {"input_ids": ids, "attention_mask": mask}

    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=seq_len)["input_ids"]
        if len(ids) >= 2:
            buf.append(ids)
        if len(buf) >= sort_window * batch_size:
            yield from flush(buf)
            buf = []
    if buf:
        yield from flush(buf)


def accumulate_batch(lm, layers: list[int], batch: dict[str, torch.Tensor],
                     moments: dict[int, RunningMoment]) -> int:
    """One forward pass (stopped after the last requested layer) adding every layer's keys; returns tokens."""
    names = {lm.adapter.mlp_out_name(i): i for i in layers}
    device = lm.device
    mask = batch["attention_mask"].to(device).bool()
    with torch.no_grad(), Trace(lm.model, names, retain_input=True, stop=True) as tr:
        lm.model(input_ids=batch["input_ids"].to(device), attention_mask=mask.long(), use_cache=False)
    for name, i in names.items():
        keys = tr.inputs[name][mask].float()
        moments[i].add(keys)
    return int(mask.sum())


def collect_second_moments(lm, layers: list[int], texts: list[str], batch_size: int = 8,
                           seq_len: int = 128) -> dict[int, torch.Tensor]:
    """In-memory E[k kᵀ] (float64) per layer over ``texts``: the small, file-free path for tests."""
    moments = {i: RunningMoment(lm.adapter.key_dim(i)) for i in layers}
    for batch in tokenize_batches(lm.tokenizer, texts, batch_size, seq_len):
        accumulate_batch(lm, layers, batch, moments)
    return {i: m.moment() for i, m in moments.items()}
