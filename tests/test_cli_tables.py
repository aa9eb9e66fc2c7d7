"""The CLI's tables come from rich.table: a header, columns aligned to their widest cell."""

from __future__ import annotations

from kedit.cli import main


def test_model_list_is_an_aligned_table(workspace, tiny_tokenizer, tmp_path, capsys):
    from kedit.models.store import import_hf
    from tests.conftest import make_tiny_model

    for slug in ("tiny-llama", "a-much-longer-tiny-llama-name"):
        src = tmp_path / f"src-{slug}"
        make_tiny_model("llama").save_pretrained(src)
        tiny_tokenizer.save_pretrained(src)
        import_hf(workspace, src, slug=slug)
    capsys.readouterr()
    assert main(["-w", str(workspace.root), "model", "list"]) == 0
    head, *rows = [line.rstrip() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert head.split() == ["slug", "type", "params", "dtype", "hash", "source"]
    assert sorted(r.split()[0] for r in rows) == ["a-much-longer-tiny-llama-name", "tiny-llama"]
    # every column starts where its heading does (params: right-aligned, ends where its heading ends)
    for col in ("type", "dtype", "hash"):
        assert {r[head.index(col):].split()[0] != "" for r in rows} == {True}
        assert {r[head.index(col) - 1] for r in rows} == {" "}
    end = head.index("params") + len("params")
    assert all(r[:end].endswith("M") and r[end] == " " for r in rows)


def test_gate_checks_table_keeps_one_line_per_check(capsys):
    from kedit.cli.tables import print_gate_checks

    print_gate_checks([
        {"name": "efficacy", "value": 0.5, "threshold": 0.8, "direction": "min", "passed": False,
         "skipped": False, "detail": "3 of 6 edits took [brackets kept]"},
        {"name": "drift_perplexity_increase_pct", "value": None, "threshold": None, "skipped": True,
         "detail": "disabled"}])
    lines = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    assert lines[1].split(None, 4) == ["FAIL", "efficacy", "0.5", ">=", "0.8 3 of 6 edits took [brackets kept]"]
    assert lines[2].split() == ["skip", "drift_perplexity_increase_pct", "-", "-", "disabled"]
    assert lines[1].index("0.5") + 3 == lines[2].index("-") + 1  # the value column is right-aligned
