"""Unit tests of the refresh core and the approval deadline rules (no server, tiny models); the Prefect
client itself is tested in test_orchestration.py."""

from __future__ import annotations

import pytest

from kedit.models.scoring import predicts_targets
from kedit.orchestration import LocalStack, approval_timeout_of
from kedit.refresh import RefreshConfig, refresh_key, resolve_feed


def test_config_reads_params_and_rejects_unknown(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("model: {slug: other}\nstats: {max_tokens: 1234}\nrefresh: {method: memit, trace_sample: 3}\n")
    cfg = RefreshConfig.from_params(p, approval_timeout_s=60)
    assert (cfg.model, cfg.method, cfg.trace_sample, cfg.stats_max_tokens, cfg.approval_timeout_s) == \
        ("other", "memit", 3, 1234, 60)
    p.write_text("refresh: {bogus: 1}\n")
    with pytest.raises(ValueError, match="bogus"):
        RefreshConfig.from_params(p)


def test_refresh_key_is_content_addressed():
    cfg = RefreshConfig()
    a = refresh_key("f" * 64, None, cfg)
    assert a == refresh_key("f" * 64, None, RefreshConfig())
    assert a != refresh_key("f" * 64, "parent", cfg)
    assert a != refresh_key("e" * 64, None, cfg)
    assert a != refresh_key("f" * 64, None, RefreshConfig(method="memit"))


def test_resolve_feed(workspace):
    workspace.feeds_dir.mkdir(parents=True)
    (workspace.feeds_dir / "2026-11-22.jsonl").write_text("{}\n")
    assert resolve_feed(workspace, "2026-11-22").name == "2026-11-22.jsonl"
    with pytest.raises(FileNotFoundError, match="2026-11-23"):
        resolve_feed(workspace, "2026-11-23")


def test_ingest_step_and_feed_ingest_cli_agree(workspace, tiny_tokenizer, tmp_path, monkeypatch, capsys):
    """The nightly ingest step and `kedit feed ingest --no-op-check` are one code path: same champion,
    same drops (already applied), same quarantine (flip-flop), same accepted rows."""
    import json

    from kedit.cli import main
    from kedit.models.store import import_hf, load_model
    from kedit.refresh import ingest_step
    from tests.conftest import make_tiny_model
    from tests.test_feeds import champion_with_facts, lineage_feed

    src = tmp_path / "tiny-src"
    make_tiny_model("llama").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    import_hf(workspace, src, slug="tiny-llama")
    champion = champion_with_facts(workspace, load_model("tiny-llama", workspace))
    path = lineage_feed(workspace)
    (workspace.root / "params.yaml").write_text("model: {slug: tiny-llama}\nfeeds: {}\n")
    monkeypatch.chdir(workspace.root)
    monkeypatch.delenv("KEDIT_PARAMS", raising=False)
    nightly = ingest_step(workspace, str(path), RefreshConfig(model="tiny-llama"))
    assert nightly["champion"] == champion
    assert nightly["counts"]["quarantine_reasons"] == {"flip_flop": 1}
    assert nightly["counts"]["drop_reasons"].get("already_applied") == 1
    assert main(["-w", str(workspace.root), "feed", "ingest", str(path), "--no-op-check",
                 "--json", str(tmp_path / "cli.json")]) == 0, capsys.readouterr()
    cli = json.loads((tmp_path / "cli.json").read_text())
    assert cli["accepted"] == nightly["accepted"] and cli["counts"] == nightly["counts"]
    assert nightly["report_path"] == f"feeds/reports/{path.stem}.md"  # relative: the workspace can move
    assert nightly["feed"] == workspace.rel(path) and not nightly["feed"].startswith("/")
    # the refresh's parent MLflow run: its parameters and the feed's accepted rows as a dataset
    from kedit.refresh import RunLog

    runlog = RunLog(workspace, nightly["refresh_key"])
    parent = runlog.client.get_run(runlog.parent_id)
    assert parent.data.params["feed"] == path.name and parent.data.params["method"] == "memoir"
    assert parent.data.params["champion"] == champion
    (inp,) = parent.inputs.dataset_inputs
    assert inp.dataset.name == path.name and inp.dataset.digest == nightly["feed_sha256"][:36]
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "feed"
    assert json.loads(inp.dataset.source) == {"uri": f"kedit-workspace:/{nightly['feed']}"}
    assert json.loads(inp.dataset.profile)["num_rows"] == len(nightly["accepted"])


def test_predicts_targets_matches_greedy(tiny_lm):
    from kedit.evaluation.metrics import greedy_tokens

    prompt = "The Eiffel Tower is located in"
    first = greedy_tokens(tiny_lm, [prompt], k=3)[0].tolist()
    predicted = tiny_lm.tokenizer.decode(first).strip()
    rows = [{"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": predicted},
            {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": predicted + " zzz qq"}]
    got = predicts_targets(tiny_lm, rows)
    ids = tiny_lm.tokenizer(" " + predicted, add_special_tokens=False)["input_ids"]
    assert got[0] == (first[: len(ids)] == ids)
    assert got[1] is False


def _state(kind, ts, key=None, deadline=None):
    return {"type": kind, "timestamp": ts, "state_details": {"pause_key": key, "pause_timeout": deadline}}


def test_approval_timeout_is_read_from_the_state_history():
    """A run failed after its approval pause ran out (by the server's expiration service or by our sweep)
    is a timed-out approval; a resumed run, a run failed before its deadline or another pause is not."""
    run = _state("RUNNING", "2026-01-06T00:00:00Z")
    pause = _state("PAUSED", "2026-01-06T00:01:00Z", "approval-abcdef0123456789", "2026-01-06T00:01:05Z")
    late_fail = _state("FAILED", "2026-01-06T00:01:07.5+00:00")
    assert approval_timeout_of([run, pause, late_fail]) == "abcdef0123456789"
    assert approval_timeout_of([run, pause, _state("FAILED", "2026-01-06T00:01:03Z")]) is None  # before the deadline
    resumed = [run, pause, _state("SCHEDULED", "2026-01-06T00:01:02Z"), _state("RUNNING", "2026-01-06T00:01:03Z"),
               _state("FAILED", "2026-01-06T00:09:00Z")]
    assert approval_timeout_of(resumed) is None  # resumed, then failed for another reason
    other = _state("PAUSED", "2026-01-06T00:01:00Z", "manual-pause", "2026-01-06T00:01:05Z")
    assert approval_timeout_of([run, other, late_fail]) is None
    no_deadline = _state("PAUSED", "2026-01-06T00:01:00Z", "approval-abcdef0123456789", None)
    assert approval_timeout_of([run, no_deadline, late_fail]) is None
    assert approval_timeout_of([run, pause]) is None and approval_timeout_of([]) is None


def test_local_stack_environment_is_isolated(tmp_path):
    st = LocalStack(home=tmp_path / "h", project_dir=tmp_path, workspace=tmp_path / "w")
    env = st.env()
    assert env["PREFECT_API_URL"] == st.api_url and str(tmp_path / "h") in env["PREFECT_HOME"]
    assert env["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] == "false"
    assert env["KEDIT_HOME"] == str((tmp_path / "w").resolve())
    assert env["DO_NOT_TRACK"] == "1"


def test_canary_drops_prompts_about_edited_subjects(tiny_lm):
    from kedit.evaluation.canary import build_canary
    from kedit.evaluation.candidate import without_edited_subjects

    suite = build_canary(tiny_lm, prompts=["The capital of France is", "Water boils at", "Paris is a"], k=1)
    kept = without_edited_subjects(suite, [{"subject": "France", "target_true": "Paris"}])
    assert kept.prompts == ["Water boils at"]
    assert kept.greedy.shape[0] == 1 and kept.logprobs.shape[0] == 1
    assert without_edited_subjects(suite, [{"subject": "Mars"}]).prompts == suite.prompts
