"""One model's greedy answers and next-token distributions per prompt, each computed once.

A gate asks the candidate about overlapping prompt sets: the canary suite, the new edits'
neighbourhood prompts (next-token KL), and the drift check's base suite (the canary prompts again plus
those neighbourhoods). :class:`ModelAnswers` scores each prompt once, in batches of the prompts not
yet seen, and answers every later request from what it holds. Greedy decoding and next-token scoring
do not depend on the batch a prompt is scored in (tested), so the numbers are what separate calls give.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kedit.models.scoring import greedy_tokens, next_token_logprobs


class ModelAnswers:
    """Memo of ``lm``'s first ``k`` greedy tokens and next-token log-probabilities, keyed by prompt."""

    def __init__(self, lm, batch_size: int = 32) -> None:
        self.lm = lm
        self.batch_size = batch_size
        self._greedy: dict[int, dict[str, torch.Tensor]] = {}  # k -> prompt -> [k] token ids
        self._logprobs: dict[str, torch.Tensor] = {}  # prompt -> [V]
        self.computed = {"greedy": 0, "logprobs": 0}  # prompts scored (not answered from the memo)

    def greedy(self, prompts: Sequence[str], k: int) -> torch.Tensor:
        """``[n, k]`` greedy token ids, one row per prompt in order."""
        if not prompts:
            raise ValueError("answers: no prompts")
        held = self._greedy.setdefault(k, {})
        missing = list(dict.fromkeys(p for p in prompts if p not in held))
        if missing:
            got = greedy_tokens(self.lm, missing, k=k, batch_size=self.batch_size)
            held.update(zip(missing, got))
            self.computed["greedy"] += len(missing)
        return torch.stack([held[p] for p in prompts])

    def logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[n, V]`` next-token log-probabilities, one row per prompt in order."""
        if not prompts:
            raise ValueError("answers: no prompts")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._logprobs))
        if missing:
            got = next_token_logprobs(self.lm, missing, batch_size=self.batch_size)
            self._logprobs.update(zip(missing, got))
            self.computed["logprobs"] += len(missing)
        return torch.stack([self._logprobs[p] for p in prompts])
