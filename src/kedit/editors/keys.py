"""Prefix-averaged keys and values at the subject's last token, for all requests and layers in one
batched pass (the r-ROME fix: the same averaged key everywhere the algorithms use a key)."""

from __future__ import annotations

import torch

from kedit.editors.prompts import PromptRows, pad_right, shared_heads
from kedit.editors.runner import BlockSlice, SharedHeadSlice, capture_blocks, capture_shared
from kedit.hooks import Trace


def average_by_request(x: torch.Tensor, req: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of rows ``x`` [rows, d] grouped by owning request -> [n, d] (float64)."""
    out = torch.zeros(n, x.shape[1], dtype=torch.float64, device=x.device)
    out.index_add_(0, req, x.to(torch.float64))
    counts = torch.bincount(req, minlength=n).clamp_min(1).to(out)
    return out / counts[:, None]


class SubjectStates:
    """Hidden states entering block ``first`` for every (request, prefix) row, truncated after the
    subject (later tokens cannot influence it); :meth:`read` replays blocks ``first..last`` with the
    model's *current* weights and returns averaged keys and the block-``last`` output."""

    def __init__(self, lm, rows: PromptRows, first: int, last: int) -> None:
        trunc = [ids[: p + 1] for ids, p in zip(rows.ids, rows.subj_pos)]
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        head = shared_heads(trunc, rows.subj_pos) if first > 0 else [0] * len(trunc)
        self.req = torch.tensor(rows.req, device=lm.device)
        self.n = rows.n_requests
        self.n_rows = len(trunc)
        self.first, self.last = first, last
        self.slice: BlockSlice | SharedHeadSlice
        if any(head):  # rows behind the same prefix: its tokens run once per read, not once per row
            self.slice = capture_shared(lm, trunc, head, first, last + 1, pad)
            self.pos = torch.tensor([p - m for p, m in zip(rows.subj_pos, head)], device=lm.device)
        else:
            self.slice = capture_blocks(lm, pad_right(trunc, pad, lm.device), first, last + 1)
            self.pos = torch.tensor(rows.subj_pos, device=lm.device)
        self._entries: dict = {}

    def read(self, lm, key_layers: list[int], begin: int | None = None, per_row: bool = False
             ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """``({layer: K [d_key, n] float64}, z [d_out, n] float64)`` with the current weights, averaged
        over each request's prompt contexts (``per_row``: one column per context row instead).

        ``begin``: replay only from this block, reusing the states entering it from an earlier read;
        valid when no weight below ``begin`` changed since that read (MEMIT edits layers in ascending
        order, so each read can start at the layer edited last)."""
        if begin is not None and begin not in self._entries:
            raise ValueError(f"no cached states entering block {begin}: read from the start first")
        names = {i: lm.adapter.mlp_out_name(i) for i in key_layers}
        if any(i < (self.first if begin is None else begin) for i in key_layers):
            raise ValueError(f"keys of layers {key_layers} are below the replay start {begin}")
        ar = torch.arange(self.n_rows, device=self.pos.device)
        with torch.no_grad(), Trace(lm.model, list(names.values()), retain_input=True) as tr:
            h = self.slice.run(lm, None if begin is None else self._entries[begin], begin=begin,
                               entries=self._entries)
        if per_row:
            keys = {i: tr.inputs[nm][ar, self.pos].to(torch.float64).T.contiguous() for i, nm in names.items()}
            return keys, h[ar, self.pos].to(torch.float64).T.contiguous()
        keys = {i: average_by_request(tr.inputs[nm][ar, self.pos], self.req, self.n).T.contiguous()
                for i, nm in names.items()}
        z = average_by_request(h[ar, self.pos], self.req, self.n).T.contiguous()
        return keys, z
