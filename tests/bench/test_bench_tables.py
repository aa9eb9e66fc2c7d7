"""Benchmark tables generated from reports: settings comparison, markdown fallback, the README block,
and the committed docs being what the generator writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kedit.bench.tables import (
    BenchRow,
    load_rows,
    parse_results_md,
    relative_change,
    render_readme_table,
    replace_between_markers,
    settings_diff,
    write_tables,
)

ROOT = Path(__file__).resolve().parents[2]

REPORT_MD = """# Lifelong editing: memoir on smollm2-135m

1000 CounterFact records from `counterfact-dev.json` (offset 0), batches of 100, all metrics after the last batch.

| run | efficacy | generalization | specificity | EM | S | fluency (x100) | greedy entropy (x100) | perplexity | NKL | canary agreement | s/edit | added bytes/edit |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| unedited | 0.296 | 0.303 | 0.682 | -0.018 | 0.368 | 611.9 | 499.3 | 14.39 | – | – | – | – |
| memoir T1000 B100 | 1.000 | 0.902 | 0.683 | 0.932 | 0.840 | 606.3 (-0.9%) | 460.7 (-7.7%) | 14.51 (+0.8%) | 0.0755 | 0.985 | 0.86 | 22,758 |
"""


def test_relative_change_and_settings_diff_match_direct_computation():
    assert relative_change(15.0, 12.0) == pytest.approx(0.25)
    assert relative_change(None, 12.0) is None and relative_change(1.0, 0) is None
    run = {"v_lr": 2, "layers": [4, 5], "mm_k": 64}
    shipped = {"v_lr": 2.0, "layers": [4, 5], "mm_k": 32, "mm_warm_start": True}
    # equal numbers of another type are the same; a key the run lacks counts as different
    assert settings_diff(run, shipped) == {"mm_k": (64, 32), "mm_warm_start": (None, True)}


def test_parse_results_md_reads_both_rows_and_the_reports_own_changes():
    rep = parse_results_md(REPORT_MD)
    assert rep["config"] == {"method": "memoir", "model": "smollm2-135m", "dataset": "counterfact",
                             "edits": 1000, "batch": 100}
    assert rep["baseline"]["efficacy"] == 0.296 and rep["edited"]["generalization"] == 0.902
    assert rep["edited"]["nkl"] == 0.0755 and rep["baseline"]["nkl"] is None
    assert rep["edited"]["perplexity_change"] == pytest.approx(0.008)
    with pytest.raises(ValueError, match="not a lifelong report"):
        parse_results_md("# something else\n")


def _write_report(folder: Path, hparams: dict, efficacy: float) -> None:
    folder.mkdir(parents=True)
    base = {"efficacy": 0.3, "generalization": 0.3, "specificity": 0.7, "perplexity": 10.0, "fluency": 600.0}
    edited = {**base, "efficacy": efficacy, "perplexity": 10.5, "seconds_per_edit": 1.25, "device": "cpu"}
    cfg = {"model": "tiny", "method": "memoir", "dataset": "counterfact", "edits": 100, "batch": 10,
           "threads": 2, "hparams": hparams, "overrides": {}, "created": "2026-12-07"}
    (folder / "results.json").write_text(json.dumps({"config": cfg, "baseline": base, "edited": edited}))


def test_rows_say_which_runs_used_the_shipped_settings(tmp_path):
    hp = tmp_path / "hparams"
    hp.mkdir()
    (hp / "tiny.yaml").write_text("defaults:\n  v_lr: 2.0\n  why: {v_lr: a note}\nmemoir:\n  mm_k: 64\n")
    _write_report(tmp_path / "bench" / "a-shipped", {"v_lr": 2.0, "mm_k": 64, "extra": 1}, 1.0)
    _write_report(tmp_path / "bench" / "b-old", {"v_lr": 0.5, "mm_k": 64}, 0.9)
    (tmp_path / "bench" / "sweep").mkdir()
    (tmp_path / "bench" / "sweep" / "results.json").write_text(json.dumps({"settings": []}))
    rows = load_rows(tmp_path / "bench", hparams_dir=hp)
    assert [r.report for r in rows] == ["a-shipped", "b-old"]  # the sweep is not a lifelong report
    assert rows[0].shipped and rows[0].date == "2026-12-07"
    assert rows[1].settings_diff == {"v_lr": (0.5, 2.0)}
    table = render_readme_table(rows)
    assert "a-shipped" in table and "b-old" not in table
    assert "+5.0%" in table  # perplexity 10 -> 10.5
    assert rows[0].command == ("kedit bench lifelong --model tiny --method memoir --edits 100 --batch 10 "
                               "--threads 2 --out docs/bench/a-shipped")


def test_readme_block_is_replaced_between_markers_and_check_writes_nothing(tmp_path):
    from kedit.bench.tables import README_END, README_START

    hp = tmp_path / "hparams"
    hp.mkdir()
    (hp / "tiny.yaml").write_text("defaults: {}\n")
    _write_report(tmp_path / "docs" / "bench" / "run", {"v_lr": 1.0}, 1.0)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold table\n{README_END}\nafter\n")
    bench_md = tmp_path / "docs" / "benchmarks.md"
    changed = write_tables(tmp_path / "docs" / "bench", bench_md, readme, hparams_dir=hp, check=True)
    assert set(changed) == {bench_md, readme} and not bench_md.exists() and "old table" in readme.read_text()
    write_tables(tmp_path / "docs" / "bench", bench_md, readme, hparams_dir=hp)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert "(docs/bench/run/results.md)" in text and "(bench/run/results.md)" in bench_md.read_text()
    assert write_tables(tmp_path / "docs" / "bench", bench_md, readme, hparams_dir=hp, check=True) == []
    with pytest.raises(ValueError, match="markers"):
        replace_between_markers("no markers here", "x")


def test_committed_benchmark_tables_are_generated_from_the_reports():
    """docs/benchmarks.md and the README's table are exactly what `kedit bench tables` writes."""
    changed = write_tables(ROOT / "docs" / "bench", ROOT / "docs" / "benchmarks.md", ROOT / "README.md", check=True)
    assert changed == [], f"run `kedit bench tables` to regenerate: {changed}"


def test_bench_row_command_names_the_data_set_and_overrides():
    row = BenchRow(report="z", model="m", method="memoir", dataset="zsre", edits=998, batch=100, unedited={},
                   edited={}, overrides={"v_stop_nll": 0.1}, skip_invalid=True, threads=1)
    assert row.command == ("kedit bench lifelong --model m --method memoir --dataset zsre --skip-invalid "
                           "--edits 998 --batch 100 --threads 1 --set v_stop_nll=0.1 --out docs/bench/z")


def test_bench_row_command_carries_the_evaluation_options_set_away_from_the_defaults():
    from kedit.bench.tables import eval_options

    cfg = {"ppl_tokens": 10_000, "fluency_prompts": 10, "freegen_tokens": 8, "eval_every": 5, "curve_records": 20}
    opts = eval_options(cfg)
    assert opts == {"--fluency-prompts": 10, "--eval-every": 5, "--curve-records": 20}
    assert eval_options({}) == {}  # reports from before the options record none
    row = BenchRow(report="g", model="m", method="memoir", dataset="counterfact", edits=100, batch=10, unedited={},
                   edited={}, threads=1, eval_options=opts)
    assert row.command == ("kedit bench lifelong --model m --method memoir --edits 100 --batch 10 --threads 1 "
                           "--fluency-prompts 10 --eval-every 5 --curve-records 20 --out docs/bench/g")


def test_free_generation_scores_sit_beside_es_ps_ns_and_read_from_markdown_reports():
    from kedit.bench.tables import freegen_cell, metric_cells

    gen = {"gen_efficacy": 1.0, "gen_generalization": 0.424, "gen_specificity": 0.97}
    row = BenchRow(report="g", model="m", method="memoir", dataset="counterfact", edits=10, batch=10,
                   unedited={}, edited={"efficacy": 1.0, **gen})
    assert freegen_cell(row) == "1.00 / 0.42 / 0.97"
    assert metric_cells(row)[3] == "1.00 / 0.42 / 0.97"  # after ES, PS, NS
    older = BenchRow(report="o", model="m", method="memoir", dataset="counterfact", edits=10, batch=10,
                     unedited={}, edited={"gen_efficacy": 1.0})
    assert freegen_cell(older) == "–"  # a run that did not measure all three
    zsre = BenchRow(report="z", model="m", method="memoir", dataset="zsre", edits=10, batch=10, unedited={},
                    edited=gen)
    assert len(metric_cells(zsre)) == len(metric_cells(row)) - 1  # zsRE tables have no free-generation column
    md = REPORT_MD.replace("| S |", "| S | ES gen | PS gen | NS gen |").replace(
        "|---|---|---|---|---|---|", "|---|---|---|---|---|---|---|---|---|").replace(
        "| 0.368 |", "| 0.368 | 0.000 | 0.000 | 1.000 |").replace("| 0.840 |", "| 0.840 | 0.990 | 0.350 | 0.990 |")
    rep = parse_results_md(md)
    assert rep["edited"]["gen_generalization"] == 0.35 and rep["baseline"]["gen_specificity"] == 1.0
