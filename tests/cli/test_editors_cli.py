"""`kedit edit` / `kedit predict` / `kedit generate` on a tiny model imported into a temp store."""

import json

from kedit.cli import main


def test_edit_then_predict_and_generate(tiny_tokenizer, workspace, tmp_path, capsys, tiny_model_factory,
                                        tiny_text):
    from kedit.editors.io import load_deltas, load_state
    from kedit.models.store import import_hf

    src = tmp_path / "tiny-src"
    tiny_model_factory("llama").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    import_hf(workspace, src, slug="tiny")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny_text * 10))
    reqs = tmp_path / "reqs.jsonl"
    reqs.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome", "id": "e1"},
        {"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano", "id": "e2"},
    ]))
    out = tmp_path / "edit1"
    common = ["-w", str(workspace.root)]
    rc = main(common + ["edit", "--model", "tiny", "--method", "alphaedit", "--requests", str(reqs), "--out", str(out),
                        "--batch", "1", "--stats-corpus", str(corpus), "--stats-tokens", "2000",
                        "--set", "layers=[1, 2]", "--set", "n_prefixes=1", "--set", "prefix_len=3",
                        "--set", "v_steps=2"])
    assert rc == 0
    deltas = load_deltas(out)
    assert set(deltas) == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    state = load_state(out)
    assert state.method == "alphaedit" and state.meta["n_edits"] == 2 and state.meta["n_batches"] == 2
    result = json.loads((out / "result.json").read_text())
    assert len(result["diagnostics"]) == 2 and result["hparams"]["layers"] == [1, 2]
    capsys.readouterr()
    assert main(common + ["predict", "--model", "tiny", "--edits", str(out), "--json", "--target", "Rome",
                          "The Eiffel Tower is located in"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["prompt"] == "The Eiffel Tower is located in" and "Rome" in rows[0]["targets"]
    assert main(common + ["generate", "--model", "tiny", "--edits", str(out), "--max-new-tokens", "3", "Rome is"]) == 0
    assert capsys.readouterr().out.startswith("Rome is")
    assert main(common + ["edit", "--model", "tiny", "--requests", str(tmp_path / "missing.jsonl"),
                          "--out", str(out)]) == 2
