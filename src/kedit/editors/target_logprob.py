"""Log-probabilities of given target tokens from final hidden states, without a ``[rows, vocab]`` tensor.

v* needs, at each target position, ``log p(target) = z_target - logsumexp(z)`` and its gradient
``W_target - E_p[W]`` (``z = W h + b`` the logits). Both are sums over the vocabulary, so they are computed
in one pass over vocabulary chunks with a running maximum (as flash attention does for its softmax):
each chunk's logits ``[rows, chunk]`` are made, folded into the running log-sum-exp and the running
``Σ exp(z - max) W`` and dropped. Nothing of vocabulary size is kept for the backward pass, and the log-
softmax's own passes over ``[rows, vocab]`` (forward, and its gradient) are gone: the same two matrix
products per step as before (the logits, and the softmax-weighted unembedding), exact up to the order
of floating-point sums. Why: over Gemma 3's 262,144-token vocabulary a v* step of 100 requests made and
walked several ``[1,200, 262,144]`` float32 tensors (1.3 GB each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# logits elements per chunk (rows x vocabulary columns): 4M float32 = 16 MB
CHUNK_ELEMENTS = 4 * 1024 * 1024


class _TargetLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                chunk: int, want_grad: bool):
        rows, vocab = h.shape[0], weight.shape[0]
        hw = h.to(weight.dtype)
        m = torch.full((rows,), float("-inf"), device=h.device)
        s = torch.zeros(rows, device=h.device)
        acc = torch.zeros(rows, weight.shape[1], device=h.device) if want_grad else None
        for c0 in range(0, vocab, chunk):
            wc = weight[c0: c0 + chunk]
            z = F.linear(hw, wc, None if bias is None else bias[c0: c0 + chunk]).float()
            m_new = torch.maximum(m, z.max(dim=1).values)
            scale = torch.exp(m - m_new)
            e = torch.exp(z - m_new[:, None])
            s = s * scale + e.sum(dim=1)
            if want_grad:
                acc = acc * scale[:, None] + (e.to(weight.dtype) @ wc).float()
            m = m_new
        lse = m + torch.log(s)
        w_t = weight.index_select(0, labels)
        z_t = (hw.float() * w_t.float()).sum(dim=1)
        if bias is not None:
            z_t = z_t + bias.index_select(0, labels).float()
        if want_grad:
            ctx.save_for_backward(w_t.float() - acc / s[:, None])  # d log p / d h
        ctx.h_dtype = h.dtype
        return z_t - lse, z_t >= m  # log p(target); whether the target is (tied for) the top logit

    @staticmethod
    def backward(ctx, grad_logp, _grad_top):
        (dh,) = ctx.saved_tensors
        return (grad_logp[:, None] * dh).to(ctx.h_dtype), None, None, None, None, None


def target_logprobs(lm, x: torch.Tensor, labels: torch.Tensor, chunk: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(labels[i]) after final hidden state x[i], whether labels[i] is the top token)`` for
    states ``x`` [rows, d] (before the final norm): float32 [rows] and bool [rows]. Differentiable in
    ``x`` (the unembedding is frozen). The unembedding weight is read as the module holds it (a bfloat16
    copy under ``matmul_weights_in`` stays bfloat16, its products accumulate in float32)."""
    un = lm.adapter.unembed
    weight, bias = un.weight, getattr(un, "bias", None)
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    if cap or not isinstance(un, torch.nn.Linear):  # logits that are not a plain W h + b: the full product
        logits = un(lm.adapter.final_norm(x)).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        logp = torch.log_softmax(logits, dim=-1)
        tgt = logp.gather(1, labels[:, None]).squeeze(1)
        return tgt, tgt >= logp.max(dim=-1).values
    h = lm.adapter.final_norm(x)
    if chunk is None:
        chunk = max(1024, CHUNK_ELEMENTS // max(1, h.shape[0]))
    return _TargetLogProb.apply(h, weight, bias, labels, chunk, torch.is_grad_enabled() and h.requires_grad)
