"""`kedit trace`, `kedit trace aggregate`, `kedit canary build`, `kedit gate` end to end on tiny store models."""

from __future__ import annotations

import json

import pytest
import torch

from kedit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def store(tmp_path, tiny_tokenizer, tiny_model_factory):
    """A workspace with a tiny model 'tiny' and a badly damaged copy 'tiny-bad' in the store."""
    from kedit.models.store import import_hf
    from kedit.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    for slug, damage in (("tiny", 0.0), ("tiny-bad", 50.0)):
        m = tiny_model_factory("llama", seed=0)
        if damage:
            w = m.model.layers[1].mlp.down_proj.weight
            with torch.no_grad():
                w += damage * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
        src = tmp_path / f"src-{slug}"
        m.save_pretrained(src)
        tiny_tokenizer.save_pretrained(src)
        import_hf(ws, src, slug=slug)
    params = tmp_path / "params.yaml"
    params.write_text("gates:\n  fluency_prompts: 2\n  fluency_tokens: 8\n  reference_tokens: 256\n"
                      "canary:\n  k: 2\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("The Eiffel Tower is located in Paris, the capital of France. Rome is the capital of Italy.")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# test prompts\nThe capital of France is\nRome is\nThe quick brown fox\nMessi plays\n")
    return ws, params, ref, prompts, tmp_path


def test_trace_cli(store, capsys):
    ws, params, _, _, tmp = store
    rc = main(["-w", str(ws.root), "trace", "--model", "tiny", "--prompt", "{} is located in",
               "--subject", "The Eiffel Tower", "--samples", "2", "--window", "2", "--params", str(params),
               "--out", str(tmp / "tr")])
    assert rc == 0
    data = json.loads((tmp / "tr" / "trace.json").read_text())
    assert len(data["effects"]["mlp"]) == len(data["tokens"]) and (tmp / "tr" / "trace.png").exists()
    assert main(["-w", str(ws.root), "trace", "--model", "tiny", "--prompt", "x"]) == 2


def test_trace_aggregate_cli_writes_layers(store, tiny_tokenizer):
    ws, params, _, _, tmp = store
    from kedit.evaluation.metrics import next_token_logprobs
    from kedit.models.store import load_model

    lm = load_model("tiny", ws)
    prompts = [("The Eiffel Tower is located in", "The Eiffel Tower"), ("Rome is the capital of", "Rome"),
               ("Messi plays for", "Messi"), ("Danielle Darrieux speaks", "Danielle Darrieux")]
    am = next_token_logprobs(lm, [p for p, _ in prompts]).argmax(-1).tolist()
    facts = [{"case_id": i, "prompt": p, "subject": s, "ground_truth": tiny_tokenizer.decode([a]).strip() or "x"}
             for i, ((p, s), a) in enumerate(zip(prompts, am))]
    (tmp / "facts.json").write_text(json.dumps(facts))
    hp = tmp / "tiny.yaml"
    hp.write_text("defaults:\n  layers: [9]\n  v_lr: 0.5\n")
    rc = main(["-w", str(ws.root), "trace", "aggregate", "--model", "tiny", "--facts", str(tmp / "facts.json"),
               "--n", "2", "--samples", "2", "--window", "2", "--block-size", "2", "--params", str(params),
               "--write", "--hparams", str(hp), "--out", str(tmp / "agg")])
    assert rc == 0
    agg = json.loads((tmp / "agg" / "aggregate.json").read_text())
    import yaml

    assert yaml.safe_load(hp.read_text())["defaults"] == {"layers": agg["recommended_layers"], "v_lr": 0.5}


def test_canary_build_and_gate_cli(store, capsys):
    ws, params, ref, prompts, tmp = store
    base = ["-w", str(ws.root)]
    assert main(base + ["canary", "build", "--model", "tiny", "--prompts", str(prompts), "--params", str(params)]) == 0
    suite = json.loads((ws.root / "canary" / "tiny" / "canary.json").read_text())
    assert suite["n"] == 4 and suite["k"] == 2
    gate = base + ["gate", "--champion", "tiny", "--params", str(params), "--reference", str(ref)]
    assert main(gate + ["--candidate", "tiny", "--out", str(tmp / "g-ok")]) == 0
    assert json.loads((tmp / "g-ok" / "gate.json").read_text())["passed"] is True
    assert main(gate + ["--candidate", "tiny-bad", "--out", str(tmp / "g-bad")]) == 1
    bad = json.loads((tmp / "g-bad" / "gate.json").read_text())
    assert bad["passed"] is False
    assert not {c["name"]: c for c in bad["checks"]}["canary_agreement"]["passed"]
    assert (tmp / "g-bad" / "gate.md").exists() and (tmp / "g-bad" / "gate.png").exists()
