"""Benchmark: statistics collection vs plain inference on the same batches."""

from __future__ import annotations

import time

import torch

from kedit.stats.corpus import load_corpus
from kedit.stats.second_moment import RunningMoment, accumulate_batch, tokenize_batches


def measure_throughput(lm, layers: list[int], corpus: str = "wiki-summaries-en", max_tokens: int = 60_000,
                       seq_len: int = 256, batch_size: int = 16) -> dict:
    """Tokens/s of (a) a plain full forward pass, (b) a forward up to the last requested layer, and
    (c) statistics collection (forward stopped after the last layer + float64 accumulation)."""
    batches, n = [], 0
    for b in tokenize_batches(lm.tokenizer, load_corpus(corpus).texts(), batch_size, seq_len):
        batches.append(b)
        n += int(b["attention_mask"].sum())
        if n >= max_tokens:
            break

    def run(fn) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                fn(b)
        return time.perf_counter() - t

    def plain(b):
        lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    moments = {i: RunningMoment(lm.adapter.key_dim(i)) for i in layers}
    plain(batches[0])  # warm-up
    t_plain = run(plain)
    t_stats = run(lambda b: accumulate_batch(lm, layers, b, moments))
    return {"tokens": n, "layers": layers, "plain_forward_tok_s": round(n / t_plain, 1),
            "stats_tok_s": round(n / t_stats, 1), "ratio_stats_vs_plain": round(t_plain / t_stats, 3),
            "seconds_per_1M_tokens_stats": round(t_stats / n * 1e6, 1), "threads": torch.get_num_threads()}
