"""E[k kᵀ] of the MLP keys at word-internal positions (the next token continues the current word or
name: it starts with a letter or digit and this one ends with one), layers 4-8, over the statistics
corpus; and how much of it, of all keys and of the edit keys falls in the null space.

Usage: KEDIT_HOME=WS python docs/bench/scripts/word_internal_stats.py 200000 OUT.safetensors [EDIT_DIR]
"""

import sys

import torch
from safetensors.torch import load_file, save_file

from kedit.editors.linalg import nullspace_basis
from kedit.hooks import Trace
from kedit.models.store import load_model
from kedit.stats.collect import load_stats, stats_dir
from kedit.stats.corpus import load_corpus
from kedit.stats.second_moment import RunningMoment, tokenize_batches
from kedit.workspace import Workspace

torch.set_num_threads(1)
ws = Workspace.default()
lm = load_model("smollm2-135m", ws)
layers = [4, 5, 6, 7, 8]
tok = lm.tokenizer
text = [tok.decode([i]) for i in range(len(tok))]
starts_word_char = torch.tensor([bool(s) and s[0].isalnum() for s in text])
ends_word_char = torch.tensor([bool(s) and s[-1].isalnum() for s in text])
moments = {i: RunningMoment(lm.adapter.key_dim(i)) for i in layers}
names = {lm.adapter.mlp_out_name(i): i for i in layers}
tokens = inside = 0
for batch in tokenize_batches(tok, load_corpus("wiki-summaries-en").texts(), 16, 256):
    if tokens >= int(sys.argv[1]):
        break
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    pick = torch.zeros_like(mask)
    pick[:, :-1] = mask[:, 1:] & starts_word_char[ids[:, 1:]] & ends_word_char[ids[:, :-1]]
    with torch.no_grad(), Trace(lm.model, names, retain_input=True, stop=True) as tr:
        lm.model(input_ids=ids, attention_mask=mask.long(), use_cache=False)
    for name, i in names.items():
        moments[i].add(tr.inputs[name][pick].float())
    tokens += int(mask.sum())
    inside += int(pick.sum())
print(f"tokens {tokens}, word-internal {inside} ({inside / tokens:.3f})")
internal = {f"layer.{i}": m.moment().contiguous() for i, m in moments.items()}
save_file(internal, sys.argv[2])
general = load_stats(stats_dir(ws, lm.slug, "wiki-summaries-en"), layers).mom2
edits = load_file(f"{sys.argv[3]}/state.safetensors") if len(sys.argv) > 3 else {}
for i in layers:
    C = general[i].double()
    U = nullspace_basis(C, 0.75, "relative_mean")

    def share(M: torch.Tensor, U: torch.Tensor = U) -> float:
        return float(torch.trace(U.T @ M @ U) / torch.trace(M))

    line = (f"L{i}: null space {U.shape[1]} dims; its share of the key energy: all tokens {share(C):.3f}, "
            f"word-internal {share(internal[f'layer.{i}'].double()):.3f}")
    if edits:
        line += f", edit keys {share(edits[f'cache_c.L{i}'].double()):.3f}"
    print(line + f"; word-internal / all key energy {float(torch.trace(internal[f'layer.{i}']) / torch.trace(C)):.2f}")
