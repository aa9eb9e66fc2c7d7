"""Memoir on Gemma 3 270M: the same stored blocks read two ways.

(a) as the memory reads them: each block's output is added to the memory layer's down-projection output,
    which Gemma 3 then passes through ``post_feedforward_layernorm``;
(b) the same output added after ``post_feedforward_layernorm``, i.e. on the residual stream, where v*
    computed the change the block was fitted to.

Efficacy / generalization: the new object's log-probability above the true one's on each record's edit
prompt / paraphrase, after N sequential edits in batches of 10 (CounterFact dev records 0..N-1).

Usage: python memoir_gemma_read_after_norm.py WORKSPACE HPARAMS.yaml counterfact-dev.json [N]
(WORKSPACE holds models/gemma-3-270m; HPARAMS: e.g. docs/calibration/gemma-3-270m/hparams.yaml).
"""

import sys
import time

import torch

from kedit.bench.lifelong import load_counterfact
from kedit.editors.attach import detach
from kedit.editors.hparams import load_hparams
from kedit.editors.io import request_from_record
from kedit.editors.registry import get_editor
from kedit.evaluation.metrics import target_logprobs
from kedit.models.store import load_model
from kedit.workspace import Workspace


def main(workspace: str, hparams: str, data: str, n: int) -> None:
    torch.set_num_threads(1)
    ws = Workspace(workspace)
    lm = load_model("gemma-3-270m", ws)
    hp = load_hparams("memoir", lm, hparams)
    recs = load_counterfact(data, n, 0)
    reqs = [request_from_record(r) for r in recs]
    editor = get_editor("memoir", hp, cache_dir=ws.cache_dir)
    t, state = time.time(), None
    for i in range(0, n, 10):
        state = editor.compute(lm, reqs[i:i + 10], state, None).state
    print(f"edited {n} in {time.time() - t:.0f}s", flush=True)
    new, old = [r["target_new"] for r in recs], [r["ground_truth"] for r in recs]

    def score(tag: str) -> None:
        es = (target_logprobs(lm, [r["prompt"] for r in recs], new)
              > target_logprobs(lm, [r["prompt"] for r in recs], old)).float().mean().item()
        ps = (target_logprobs(lm, [r["rephrase_prompt"] for r in recs], new)
              > target_logprobs(lm, [r["rephrase_prompt"] for r in recs], old)).float().mean().item()
        print(f"{tag}: efficacy {es:.2f} generalization {ps:.2f} (n={n})", flush=True)

    score("unedited")
    att = editor.attach(lm, state)
    score("(a) block output added at the down-projection output")
    hook, extra = att.hook, att.extra
    detach(lm.model, "memoir")
    block = lm.model.model.layers[int(state.meta["layer"])]
    stash: dict[str, torch.Tensor] = {}

    def at_down(module, args, kwargs, output):
        stash["d"] = hook(module, args, kwargs, output) - output  # what the memory would add here
        return output

    def after_norm(module, args, output):
        return output + stash.pop("d").to(output.dtype)

    modules = dict(lm.model.named_modules())
    block.mlp.down_proj.register_forward_hook(at_down, with_kwargs=True)
    block.post_feedforward_layernorm.register_forward_hook(after_norm)
    for name, kind, fn in extra:
        reg = modules[name].register_forward_pre_hook if kind == "pre" else modules[name].register_forward_hook
        reg(fn, with_kwargs=True)
    score("(b) the same output added after post_feedforward_layernorm")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 20)
