"""Progress of long steps: lines in the workspace's progress file that `kedit nightly demo` echoes."""

from __future__ import annotations

import pytest

from kedit.progress import ProgressTail, StepProgress, progress_path, reported, ticker


def test_ticker_reports_each_tenth_and_the_end():
    lines = []
    tick = ticker(lines.append, 100, "work", unit="rows", every_s=1e9)
    for done in range(0, 101):
        tick(done)
    assert len(lines) == 10 and lines[-1].startswith("work: 100/100 rows (100%)")
    assert lines[0].startswith("work: 10/100 rows (10%)") and "left" in lines[0]


def test_steps_report_start_end_and_failure(workspace):
    tail = ProgressTail(workspace.root)

    @reported("edit")
    def ok(ws, x):
        return x + 1

    @reported("gate")
    def bad(ws):
        raise ValueError("no canary prompts")

    assert ok(workspace, 1) == 2
    with pytest.raises(ValueError):
        bad(workspace)
    got = [line.split(" ", 1)[1] for line in tail.new_lines()]  # drop the HH:MM:SS stamp
    assert got[0] == "edit: started" and got[1].startswith("edit: done in ")
    assert got[2] == "gate: started" and got[3].startswith("gate: failed after") and "no canary prompts" in got[3]
    assert tail.new_lines() == []  # only what was appended since


def test_tail_waits_for_a_whole_line(workspace):
    tail = ProgressTail(workspace.root)
    path = progress_path(workspace.root)
    StepProgress(workspace.root, "trace")("layer 3")
    with open(path, "a") as fh:
        fh.write("12:00:00 trace: half a li")
    assert [x.split(" ", 1)[1] for x in tail.new_lines()] == ["trace: layer 3"]
    with open(path, "a") as fh:
        fh.write("ne\n")
    assert tail.new_lines() == ["12:00:00 trace: half a line"]


def test_statistics_collection_reports_progress(tiny_lm, workspace, tmp_path, capsys, tiny_text):
    from kedit.stats.collect import compute_stats

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(tiny_text * 3))
    tail = ProgressTail(workspace.root)
    b = compute_stats(tiny_lm, [1, 2], workspace, str(corpus), max_tokens=300, seq_len=32, batch_size=2,
                      progress=True)
    lines = [x.split(" ", 1)[1] for x in tail.new_lines()]
    assert lines[0].startswith("stats: E[k kT] of tiny-llama layers 1-2 over c: collecting 300 tokens")
    assert any("tokens (" in x and "%)" in x for x in lines[1:-1])
    assert lines[-1].startswith(f"stats: E[k kT] of tiny-llama layers 1-2 over c: {b.n_tokens:,} tokens in")
    # outside a terminal the same lines go to stderr (no live bar that a log cannot show)
    err = capsys.readouterr().err
    assert "collecting 300 tokens" in err and "stats:" in err
