"""The nightly computes only what its editor needs: key statistics for the weight editors only (the
refresh's edit step, the demo's dvc stages); `kedit --help` names the editors as they are; the refresh
benchmark's workspace and feed."""

from __future__ import annotations

import json

import pytest
import yaml

from kedit.config import RefreshConfig
from kedit.editors.hparams import METHODS


@pytest.mark.parametrize(("method", "reads"), [("memoir", False), ("tpatcher", False), ("alphaedit", True),
                                               ("memit", True), ("rome", True)])
def test_only_weight_editors_read_key_statistics(method, reads):
    assert RefreshConfig(method=method).reads_key_statistics is reads


def test_every_method_is_decided():
    assert {m for m in METHODS if not RefreshConfig(method=m).reads_key_statistics} == {"memoir", "tpatcher"}


def test_demo_runs_the_statistics_stage_only_for_an_editor_that_reads_them():
    from kedit.cli.nightly import repro_stages

    stages, what = repro_stages(RefreshConfig(method="memoir"))
    assert stages == ["import"] and "no key statistics: memoir reads none" in what
    stages, what = repro_stages(RefreshConfig(method="alphaedit"))
    assert stages == [] and "key statistics" in what and "no key statistics" not in what


def test_the_import_stage_the_demo_names_exists_in_dvc_yaml():
    from pathlib import Path

    stages = yaml.safe_load((Path(__file__).resolve().parents[2] / "dvc.yaml").read_text())["stages"]
    assert "import" in stages and "stats" in stages


def test_help_names_every_editor_and_the_nightly_default():
    from kedit.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    for name in ("memoir (sparse residual memory; the nightly default)", "AlphaEdit", "MEMIT", "ROME", "T-Patcher"):
        assert name in text
    assert RefreshConfig().method == "memoir"  # the default the help names


def test_bench_feed_takes_the_sample_feed_then_counterfact(tmp_path):
    from kedit.bench.refresh import feed_rows

    cf = [{"case_id": i, "prompt": f"Subject{i} plays the", "subject": f"Subject{i}", "target_new": "piano",
           "ground_truth": "guitar", "rephrase_prompt": f"Subject{i} is good at",
           "locality_prompt": "John plays the"} for i in range(40)]
    cf.insert(3, {**cf[0]})  # a repeated subject is taken once
    (tmp_path / "cf.json").write_text(json.dumps(cf))
    rows = feed_rows(45, tmp_path / "cf.json")
    assert len(rows) == 45 and rows[0]["id"] == "sample-001" and rows[30]["id"] == "cf-0"
    assert len({r["subject"] for r in rows}) == 45
    assert len(feed_rows(5)) == 5
    with pytest.raises(ValueError, match="gives only"):
        feed_rows(100, tmp_path / "cf.json")
    with pytest.raises(FileNotFoundError, match="give --data"):
        feed_rows(31, tmp_path / "missing.json")


def test_bench_workspace_links_the_model_and_applies_overrides(tmp_path):
    from kedit.bench.refresh import RefreshBenchConfig, prepare_workspace
    from kedit.workspace import Workspace

    src = Workspace(tmp_path / "src")
    model = src.model_dir("smollm2-135m")
    model.mkdir(parents=True)
    (model / "kedit_manifest.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"refresh": {"method": "memoir", "trace_sample": 1}}))
    cfg = RefreshBenchConfig(facts=3, params=str(tmp_path / "params.yaml"),
                             overrides={"refresh.trace_sample": 0, "refresh.method": "rome"})
    ws = prepare_workspace(tmp_path / "bench", src, cfg, tmp_path)
    params = yaml.safe_load((ws.root / "params.yaml").read_text())
    assert params["refresh"] == {"method": "rome", "trace_sample": 0} and params["model"]["slug"] == "smollm2-135m"
    assert (ws.model_dir("smollm2-135m") / "model.safetensors").stat().st_ino == (model / "model.safetensors").stat().st_ino
    assert len((ws.feeds_dir / "2026-01-05.jsonl").read_text().splitlines()) == 3
    ws = prepare_workspace(tmp_path / "bench", src, RefreshBenchConfig(facts=2, nights=3), tmp_path)
    nights = [[json.loads(r)["id"] for r in (ws.feeds_dir / f"2026-01-0{d}.jsonl").read_text().splitlines()]
              for d in (5, 6, 7)]
    assert nights == [["sample-001", "sample-002"], ["sample-003", "sample-004"], ["sample-005", "sample-006"]]
    prepare_workspace(tmp_path / "bench", src, cfg, tmp_path)  # its own earlier workspace is replaced
    (tmp_path / "other").mkdir()
    with pytest.raises(FileExistsError, match="not a bench workspace"):
        prepare_workspace(tmp_path / "other", src, cfg, tmp_path)
    with pytest.raises(ValueError, match="BLOCK.KEY"):
        prepare_workspace(tmp_path / "bench", src, RefreshBenchConfig(facts=1, overrides={"method": "rome"}), tmp_path)
    with pytest.raises(FileNotFoundError, match="not imported"):
        prepare_workspace(tmp_path / "bench", Workspace(tmp_path / "empty"), cfg, tmp_path)


def test_the_refresh_traces_the_mlp_effects_it_reads_unless_told_more(tmp_path):
    assert RefreshConfig().trace_kinds == ["mlp"]
    p = tmp_path / "params.yaml"
    p.write_text("refresh: {trace_kinds: [mlp, attn, hidden]}\n")
    assert RefreshConfig.from_params(p).trace_kinds == ["mlp", "attn", "hidden"]
    for bad in (["mlp", "ffn"], [], "mlp"):
        with pytest.raises(ValueError, match="refresh.trace_kinds: expected a non-empty list"):
            RefreshConfig(trace_kinds=bad)


def test_refresh_bench_report_is_a_table_per_night_and_a_plot_and_reads_back(tmp_path):
    from kedit.bench.refresh import RefreshBench, StepTime, write_report

    steps = [StepTime(0, "ingest", 13.0, "99 accepted"), StepTime(0, "edit", 90.5), StepTime(0, "gate", 130.0),
             StepTime(1, "ingest", 5.5), StepTime(1, "edit", 70.25), StepTime(1, "gate", 120.0)]
    bench = RefreshBench(config={"facts": 100, "nights": 2, "model": "m", "overrides": {"refresh.trace_sample": 0}},
                         method="memoir", reads_key_statistics=False, n_facts=100, steps=steps,
                         night_seconds=[233.5, 195.75], outcomes=["promoted", "promoted"], state_ids=["a", "b"],
                         device="cpu (2 threads)", load_average=[1.9, 1.8, 1.7], when="2026-12-07T15:00:00Z")
    paths = write_report(bench, tmp_path / "out")
    assert [p.name for p in paths] == ["results.json", "results.md", "steps.png"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| night | ingest | edit | gate | total | outcome |" in md
    assert "| 1 | 13.0 | 90.5 | 130.0 | **233.5** | promoted |" in md
    assert "| 2 | 5.5 | 70.2 | 120.0 | **195.8** | promoted |" in md
    assert "--facts 100 --nights 2 --model m" in md and "refresh.trace_sample=0" in md
    assert "- night 1 ingest: 99 accepted" in md
    assert (tmp_path / "out" / "steps.png").read_bytes()[:4] == b"\x89PNG"
    back = RefreshBench.from_dict(json.loads((tmp_path / "out" / "results.json").read_text()))
    assert back == bench and back.seconds(1, "edit") == 70.25 and back.seconds(1, "trace") is None
