"""Per layer of Gemma 3 270M: how a change written at the down-projection output (where memoir's block
adds its output) reaches the residual stream through ``post_feedforward_layernorm`` (where v* computed
the change): the cosine between the change written and the change delivered, and the gain in norm.

Usage: python memoir_gemma_postnorm.py MODEL_DIR counterfact-dev.json
(MODEL_DIR: a workspace's models/gemma-3-270m). Prompts: the first 8 records' edit prompts; the
changes are random directions of 5%, 20% and 100% of the residual stream's norm at the last token.
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(model_dir: str, data: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [r["prompt"].format(r["subject"]) for r in json.load(open(data))[:8]]
    for li in (1, 2, 3, 4, 5, 8):
        layer = model.model.layers[li]
        cap: dict[str, torch.Tensor] = {}

        def keep(name: str, cap: dict = cap):
            return lambda mod, args, out: cap.__setitem__(name, (out[0] if isinstance(out, tuple) else out).detach())

        hooks = [layer.mlp.down_proj.register_forward_hook(keep("m")), layer.register_forward_hook(keep("h"))]
        norm = layer.post_feedforward_layernorm
        rows: dict[float, list[tuple[float, float]]] = {s: [] for s in (0.05, 0.2, 1.0)}
        for p in prompts:
            with torch.no_grad():
                model(**tok(p, return_tensors="pt"))
            x, h = cap["m"][0, -1], cap["h"][0, -1]
            for s, got in rows.items():
                d = torch.randn_like(h)
                d = d / d.norm() * h.norm() * s
                with torch.no_grad():
                    delivered = norm(x + d) - norm(x)
                got.append((float(torch.nn.functional.cosine_similarity(delivered, d, dim=0)),
                            float(delivered.norm() / d.norm())))
        for hk in hooks:
            hk.remove()
        print(f"layer {li}: norm weight max {float(norm.weight.max()):.1f}, |h| ~{float(h.norm()):.0f}; " + "; ".join(
            f"|change| = {s} |h|: cos {sum(c for c, _ in v) / len(v):.2f} gain {sum(g for _, g in v) / len(v):.2f}"
            for s, v in rows.items()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
