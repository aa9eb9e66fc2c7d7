"""Reports people read: the lifelong curve's error bars, console output that copy-pastes, --help."""

from __future__ import annotations

import pytest

from kedit.evaluation.metrics import wilson_interval


def curve_result(n_points: int = 4, with_ppl: bool = True) -> dict:
    curve = []
    for i in range(1, n_points + 1):
        p = {"edits": 10 * i, "efficacy": 1.0 - 0.1 * (i % 2), "generalization": 0.8, "specificity": 0.65}
        if with_ppl:
            p["perplexity"] = 10.0 + 0.1 * i
        curve.append(p)
    return {"curve": curve, "config": {"method": "alphaedit", "model": "tiny", "batch": 10},
            "baseline": {"efficacy": 0.24, "generalization": 0.25, "specificity": 0.71, "perplexity": 10.0}}


def test_curve_error_bars_are_the_reports_wilson_intervals():
    from kedit.bench.lifelong import curve_intervals

    res = curve_result()
    got = curve_intervals(res, "efficacy")
    assert got == [wilson_interval(round(p["efficacy"] * p["edits"]), p["edits"]) for p in res["curve"]]
    assert got[1] == wilson_interval(20, 20) and got[0] == wilson_interval(9, 10)


@pytest.mark.parametrize("with_ppl", [True, False])
def test_curve_plot_draws_error_bars_and_labelled_baselines(tmp_path, monkeypatch, with_ppl):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kedit.bench.lifelong import plot_curve

    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    plot_curve(curve_result(with_ppl=with_ppl), tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    fig = figs[-1]
    ax = fig.axes[0]
    assert len(ax.containers) == 3 and all(c.has_yerr for c in ax.containers)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "efficacy, unedited: 0.24" in labels and "generalization, unedited: 0.25" in labels
    styles = {line.get_label(): str(line._unscaled_dash_pattern) for line in ax.lines if "unedited" in line.get_label()}
    assert len(set(styles.values())) == 3  # each baseline its own dash pattern, not only its colour
    assert ax.get_xlabel() == "records edited so far"
    assert ("perplexity change, % (right axis)" in labels) == with_ppl


def test_console_does_not_wrap_outside_a_terminal(monkeypatch):
    import io

    from kedit.console import make_console

    monkeypatch.delenv("COLUMNS", raising=False)
    buf = io.StringIO()
    con = make_console(file=buf)
    cmd = "PREFECT_API_URL=http://127.0.0.1:4200/api kedit approve 3f9c2a7b1d04 --by alice " + "--comment 'x' " * 10
    con.print(f"A reviewer would now run:\n  [bold]{cmd}[/bold]")
    lines = buf.getvalue().splitlines()
    assert lines[1].strip() == cmd.strip() and len(lines) == 2


def test_top_level_help_reads_as_a_sentence(capsys):
    from kedit.cli import build_parser

    parser = build_parser()
    desc = parser.description
    assert desc[0].isalpha() and desc.endswith(".") and "``" not in desc and "<group>" not in desc
    assert "kedit keeps a language model's facts up to date" in " ".join(parser.format_help().split())
