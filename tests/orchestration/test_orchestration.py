"""The Prefect adapter (``kedit.orchestration``) and the tasks' cache policies.

The approval tests run against a real Prefect server (``prefect_test_harness``, one per module: ~10 s):
a real paused flow run resumed with a verdict, real state histories for the timeout sweep. Retries are
checked against a small HTTP server that answers 503 the way a Prefect server on a locked SQLite does.
"""

from __future__ import annotations

import ast
import datetime as dt
import http.server
import importlib.util
import json
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from kedit.cli import main
from kedit.orchestration import PrefectAPIError, PrefectRuns, expire_overdue, free_port, state_type

ROOT = Path(__file__).resolve().parents[2]


# -- the core stays free of Prefect --------------------------------------------------------------------

def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at module level?) for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, id(node) in top))
    return out


def test_core_modules_never_import_prefect_or_the_adapter():
    """Only kedit.orchestration uses Prefect; the CLI reaches it inside its commands, nothing else does."""
    src = ROOT / "src" / "kedit"
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).as_posix()
        if rel.startswith("orchestration/"):
            continue
        for mod, top_level in _imports(path):
            uses = mod == "prefect" or mod.startswith("prefect.") or mod.startswith("kedit.orchestration")
            if rel.startswith("cli/") and mod.startswith("kedit.orchestration"):
                assert not top_level, f"{rel} imports {mod} at module level (import it inside the command)"
            else:
                assert not uses, f"{rel} imports {mod}"


def test_prefect_yaml_names_the_installed_prefect():
    import prefect
    import yaml

    declared = yaml.safe_load((ROOT / "prefect.yaml").read_text())["prefect-version"]
    assert str(declared) == prefect.__version__, "update prefect-version in prefect.yaml"


# -- errors and retries of Prefect's client ---------------------------------------------------------------

def test_no_api_or_no_server_is_a_clear_error(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(PrefectAPIError, match="PREFECT_API_URL"):
            PrefectRuns()
        assert main(["nightly", "status"]) == 2
    assert "kedit nightly: error: no Prefect API: set PREFECT_API_URL" in capsys.readouterr().err
    runs = PrefectRuns(f"http://127.0.0.1:{free_port()}/api")
    assert runs.healthy() is False
    with pytest.raises(PrefectAPIError, match="unreachable"):
        runs.awaiting_approval()


def test_client_retries_what_the_server_marks_retryable():
    """Prefect answers 503 when its SQLite database is locked; Prefect's client retries those
    (PREFECT_CLIENT_MAX_RETRIES times) and not a 404, and the error names the status."""
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    answers = {"flaky": [503, 503, 404], "down": [503] * 10, "missing": [404, 503]}
    seen: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.rstrip("/").split("/")[-1]  # /api/deployments/name/<flow>/<name>
            k = seen[name] = seen.get(name, 0) + 1
            code = answers[name][k - 1]
            body = json.dumps({"detail": "Deployment not found."} if code == 404 else
                              {"exception_message": "database is locked"}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if code == 503:
                self.send_header("Retry-After", "0")  # no wait in a test (Prefect backs off 2^n s otherwise)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        runs = PrefectRuns(f"http://127.0.0.1:{srv.server_address[1]}/api")
        with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 3}):
            with pytest.raises(PrefectAPIError, match="not found"):
                runs.run_deployment("f/flaky")
            assert seen["flaky"] == 3  # two 503s retried, then the answer
            with pytest.raises(PrefectAPIError, match="HTTP 503 .*database is locked"):
                runs.run_deployment("f/down")
            assert seen["down"] == 4  # 1 + 3 retries
            with pytest.raises(PrefectAPIError, match="not found"):
                runs.run_deployment("f/missing")
            assert seen["missing"] == 1  # a 404 is not retried
    finally:
        srv.shutdown()


# -- against a real Prefect server --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("results")}):
            yield PrefectRuns()


@pytest.fixture(scope="module")
def deployment(server):
    with server.client("setup") as c:
        flow_id = c.create_flow_from_name("kedit-test-flow")
        c.create_deployment(flow_id, name="nightly")
    return "kedit-test-flow/nightly"


def _paused_run(runs: PrefectRuns, deployment: str, ref: str, deadline: dt.datetime) -> str:
    """A run of the deployment put into the state a nightly run waits in (no worker runs it)."""
    from prefect.states import Paused

    fr = runs.run_deployment(deployment, {})
    with runs.client("setup") as c:
        c.set_flow_run_state(fr.id, Paused(pause_expiration_time=deadline, pause_key=f"approval-{ref}"), force=True)
    return str(fr.id)


def test_trigger_is_idempotent_per_key(server, deployment):
    a = server.run_deployment(deployment, {}, idempotency_key="kedit-test-key")
    b = server.run_deployment(deployment, {}, idempotency_key="kedit-test-key")
    assert a.id == b.id  # what a retried POST gets back: the run the first attempt created
    assert server.run_deployment(deployment, {}).id != server.run_deployment(deployment, {}).id
    with pytest.raises(PrefectAPIError, match="not found"):
        server.run_deployment("kedit-test-flow/no-such-deployment")


def test_a_paused_run_resumes_with_the_verdict(server, capsys):
    """A real flow pauses for an ``Approval`` input; `kedit reject` finds it by state prefix and resumes it."""
    from prefect import flow
    from prefect.flow_runs import pause_flow_run

    from flows.nightly import Approval

    ref = uuid.uuid4().hex[:16]

    @flow(name="kedit-test-approval")
    def waits() -> dict:
        got = pause_flow_run(wait_for_input=Approval, timeout=120, poll_interval=1, key=f"approval-{ref}")
        return got.model_dump()

    out: dict = {}
    th = threading.Thread(target=lambda: out.update(result=waits()), daemon=True)
    th.start()
    deadline = time.monotonic() + 60
    while not (waiting := server.awaiting_approval(ref)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(waiting) == 1 and waiting[0].state_ref == ref and waiting[0].waiting
    assert dt.timedelta(seconds=60) < waiting[0].deadline - dt.datetime.now(dt.UTC) <= dt.timedelta(seconds=120)
    assert main(["nightly", "status"]) == 0
    assert f"{waiting[0].id}  waiting on state {ref[:12]}" in capsys.readouterr().out
    assert main(["approve", "ffffffffffff", "--by", "tester"]) == 2
    assert "no refresh is waiting for approval of 'ffffffffffff'" in capsys.readouterr().err
    assert main(["reject", ref[:12], "--by", "tester", "--comment", "not today"]) == 0
    assert f"rejected state {ref[:12]} (flow run {waiting[0].name}) by tester" in capsys.readouterr().out
    th.join(60)
    assert out["result"] == {"approve": False, "approver": "tester", "comment": "not today"}
    assert state_type(server.flow_run(waiting[0].id)) == "COMPLETED"


def test_timed_out_approvals_are_rejected_once(server, deployment, workspace, stored_lm, run_batches, tmp_path):
    """A run past its approval deadline cannot be approved; the sweep records the rejection in the
    lineage once and leaves the run Failed, whether or not the server's expiration service got there first."""
    from kedit.lineage import ops
    from kedit.lineage.registry import TAG_REVIEW, TAG_REVIEWER, ModelRegistry, Tracking
    from kedit.lineage.store import LineageStore

    store = LineageStore(workspace.lineage_dir)
    (state,) = run_batches(store, stored_lm(), 1)
    ops.register_candidate(workspace, store, state.id, params={**ops.DEFAULTS, "dvc": False})
    reg = ModelRegistry(Tracking(workspace), "tiny-llama")
    assert reg.alias("candidate").tags["kedit.state_id"] == state.id
    ref = state.id[:16]
    run_id = _paused_run(server, deployment, ref, dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5))
    late = [r for r in server.timed_out_approvals() if r.id == run_id]
    assert len(late) == 1 and late[0].state_ref == ref
    with pytest.raises(PrefectAPIError, match="timed out"):
        server.decide(ref, True, "late-reviewer")

    # another workspace's sweep on the same server leaves the run alone
    assert expire_overdue(server, LineageStore(tmp_path / "other" / "lineage")) == []
    assert expire_overdue(server, store, ws=workspace) == [state.id]
    assert state_type(server.flow_run(run_id)) == "FAILED"
    # the MLflow version says so and is no longer the candidate
    v = reg.version_of(state.id)
    assert (v.tags[TAG_REVIEW], v.tags[TAG_REVIEWER]) == ("rejected", "kedit-timeout") and reg.alias("candidate") is None
    # now found through its state history (pause, then failed past the deadline), and not rejected twice
    assert [r.id for r in server.timed_out_approvals() if r.state_ref == ref] == [run_id]
    assert expire_overdue(server, store, ws=workspace) == []
    rejects = [e for e in store.events() if e.type == "reject" and e.state == state.id]
    assert len(rejects) == 1 and rejects[0].by == "kedit-timeout"
    assert store.champion() is None


def test_wait_returns_on_a_pause_or_a_final_state(server, deployment):
    from prefect.states import Completed

    run_id = _paused_run(server, deployment, "0" * 16, dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    seen = []
    assert state_type(server.wait(run_id, ("PAUSED",), timeout=10, poll=0.2, on_poll=seen.append)) == "PAUSED"
    assert seen and seen[-1].name

    def finish():
        time.sleep(1)
        with server.client("finish") as c:
            c.set_flow_run_state(uuid.UUID(run_id), Completed(), force=True)

    threading.Thread(target=finish, daemon=True).start()
    t0 = time.monotonic()
    assert state_type(server.wait(run_id, timeout=30)) == "COMPLETED"  # Prefect's wait_for_flow_run
    assert time.monotonic() - t0 < 25
    fr = server.run_deployment(deployment, {})
    with pytest.raises(TimeoutError):
        server.wait(fr.id, timeout=1)


# -- cache policies ---------------------------------------------------------------------------------------

TASK_SRC = '''
from prefect import task
from tasks.cache import content_keyed

@task(cache_policy=content_keyed("edit", "ingest.refresh_key"))
def edit(workspace, ingest):
    return {body}
'''


def _task_from_source(tmp_path: Path, name: str, body: str):
    path = tmp_path / f"{name}.py"
    path.write_text(TASK_SRC.format(body=body))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.edit


def _key(task, **inputs) -> str:
    # what Prefect hands a policy: the task run's context (TASK_SOURCE reads its task) and the inputs
    return task.cache_policy.compute_key(task_ctx=SimpleNamespace(task=task), inputs=inputs, flow_parameters={})


def test_cache_key_follows_content_and_task_source(tmp_path):
    a = _task_from_source(tmp_path, "edit_a", "ingest['refresh_key']")
    a_again = _task_from_source(tmp_path, "edit_a_again", "ingest['refresh_key']")
    b = _task_from_source(tmp_path, "edit_b", "ingest['refresh_key'] + '!'")
    ing = {"refresh_key": "k1", "report_path": "/x/reports/k1"}
    key = _key(a, workspace="/ws1", ingest=ing)
    assert key == _key(a_again, workspace="/ws1", ingest=ing)  # same source, same content
    assert key == _key(a, workspace="/elsewhere", ingest={**ing, "report_path": "/y"})  # not content
    assert key != _key(a, workspace="/ws1", ingest={**ing, "refresh_key": "k2"})  # other content
    assert key != _key(b, workspace="/ws1", ingest=ing)  # changed task source
    with pytest.raises(KeyError, match="ingest.refresh_key"):
        _key(a, workspace="/ws1", ingest={})


def test_ingest_key_follows_feed_bytes_and_champion(workspace):
    from tasks import refresh as t

    workspace.feeds_dir.mkdir(parents=True)
    feed = workspace.feeds_dir / "2026-01-05.jsonl"
    feed.write_text('{"id": 1}\n')
    inputs = {"workspace": str(workspace.root), "feed": "2026-01-05", "cfg": {"method": "alphaedit"}}
    key = _key(t.ingest, **inputs)
    assert key == _key(t.ingest, **inputs)
    assert key != _key(t.ingest, **{**inputs, "cfg": {"method": "memit"}})
    feed.write_text('{"id": 2}\n')  # the same name, new bytes
    k2 = _key(t.ingest, **inputs)
    assert k2 != key
    workspace.lineage_dir.mkdir(parents=True, exist_ok=True)
    (workspace.lineage_dir / "CHAMPION").write_text("abc\n")  # a stale convenience copy is not the champion:
    assert _key(t.ingest, **inputs) == k2  # the key follows the lineage events (test_lineage_promotion)


def test_prefect_reuses_a_content_keyed_result(server, tmp_path):
    """In a real flow run the second call with the same content (another workspace path) is cached."""
    from prefect import flow, task

    from tasks.cache import content_keyed

    calls = []

    @task(cache_policy=content_keyed("test", "ingest.refresh_key"), persist_result=True, result_serializer="json")
    def work(workspace: str, ingest: dict) -> str:
        calls.append(workspace)
        return workspace

    @flow
    def twice() -> list:
        key = uuid.uuid4().hex
        return [work(str(tmp_path / "a"), {"refresh_key": key}), work(str(tmp_path / "b"), {"refresh_key": key}),
                work(str(tmp_path / "c"), {"refresh_key": key + "x"})]

    a, b, c = twice()
    assert b == a and c == str(tmp_path / "c")
    assert calls == [str(tmp_path / "a"), str(tmp_path / "c")]


def test_every_flow_and_task_persists_json_results():
    """Persisted results are JSON everywhere: a pickled result runs code when a client reads it back."""
    import importlib

    from prefect import Flow
    from prefect.tasks import Task

    found = []
    for pkg in ("flows", "tasks"):
        for path in sorted((ROOT / pkg).glob("*.py")):
            if path.stem.startswith("_"):
                continue
            mod = importlib.import_module(f"{pkg}.{path.stem}")
            for name, obj in vars(mod).items():
                if isinstance(obj, Flow | Task) and obj.__module__ == mod.__name__:
                    found.append((f"{pkg}.{path.stem}.{name}", obj.persist_result, obj.result_serializer))
    assert {n.split(".")[1] for n, *_ in found} >= {"promote", "rollback", "stats", "trace", "nightly", "ops"}
    assert [f for f in found if f[1:] != (True, "json")] == []


def test_nightly_run_is_named_by_its_feed_date_and_leaves_the_facts_as_a_table(server, tmp_path, monkeypatch):
    """A real nightly run on a feed rejected as a whole (no model work): its name says the feed's date;
    the ingest task leaves the feed's accepted facts as a table artifact."""
    from flows.nightly import nightly_refresh, run_name

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = tmp_path / "ws"
    (ws / "feeds").mkdir(parents=True)
    (ws / "feeds" / "2026-11-22.jsonl").write_text(json.dumps(  # a prompt without "{}": quarantined
        {"id": "x1", "subject": "Eiffel Tower", "prompt": "no braces", "target_new": "Rome", "source": "t",
         "observed_at": "2025-06-01T08:00:00Z"}) + "\n")
    # what PREFECT_LOGGING_EXTRA_LOGGERS=kedit (prefect.yaml) does when Prefect sets up logging: the API
    # handler on kedit's logger (the level is tasks/'s part); undone after the run
    import logging

    from prefect.logging.handlers import APILogHandler, PrefectConsoleHandler

    # Prefect's console handlers write to the stream of whichever test first set up Prefect's logging,
    # which pytest has closed by now: point them at this test's stream for the run
    for name in ["", *logging.root.manager.loggerDict]:
        for h in getattr(logging.getLogger(name), "handlers", []):
            if isinstance(h, PrefectConsoleHandler):
                monkeypatch.setattr(h.console, "file", sys.stderr)

    # only the API handler: prefect.extra's console handler holds the stream of whichever test set up
    # Prefect's logging, which pytest has closed by now
    kedit_log = logging.getLogger("kedit")
    extra = [h for h in logging.getLogger("prefect.extra").handlers if isinstance(h, APILogHandler)]
    assert extra, "Prefect's logging set-up gives prefect.extra an API handler"
    for h in extra:
        kedit_log.addHandler(h)
    try:
        out = nightly_refresh(feed="2026-11-22", workspace=str(ws))
    finally:
        for h in extra:
            kedit_log.removeHandler(h)
    assert out["outcome"] == "feed-rejected"
    with server.client("test") as c:
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterKey,
            LogFilter,
            LogFilterFlowRunId,
        )

        runs = [r for r in c.read_flow_runs() if r.name == "nightly-2026-11-22"]
        assert len(runs) == 1 and runs[0].parameters["feed"] == "2026-11-22"
        time.sleep(3)  # the API log handler ships logs in batches
        logs = [x.message for x in c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[runs[0].id])))]
        assert any("ingest: started" in m for m in logs) and any("ingest: done" in m for m in logs), logs
        (art,) = [a for a in c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["feed-facts"])))
                  if a.flow_run_id == runs[0].id]
    assert art.type == "table" and "2026-11-22.jsonl" in art.description and "0 of 1 rows" in art.description
    assert run_name("today").startswith("nightly-2") and run_name("/x/feeds/2026-01-02.csv") == "nightly-2026-01-02"


def test_approval_form_shows_the_gate_report(tmp_path):
    from flows.nightly import Approval, approval_form

    gate = tmp_path / "reports" / "k1" / "gate"
    gate.mkdir(parents=True)
    (gate / "gate.md").write_text("# Promotion gate: PASSED\n\n| check | value |\n")
    form = approval_form(str(tmp_path), "abcdef0123456789" * 4, {"report_dir": "reports/k1/gate"})
    assert issubclass(form, Approval)
    assert "Approve candidate `abcdef012345`" in form._description and "# Promotion gate: PASSED" in form._description
    assert form(approve=True, approver="alice").comment == ""


def test_edit_and_gate_tasks_run_under_the_configured_timeouts():
    """refresh.edit_timeout_s / gate_timeout_s (params.yaml) become the Prefect tasks' timeouts."""
    from flows.edit import timed_tasks
    from kedit.refresh import RefreshConfig

    edit, gate = timed_tasks(RefreshConfig(edit_timeout_s=11, gate_timeout_s=22).to_dict())
    assert (edit.name, edit.timeout_seconds, gate.name, gate.timeout_seconds) == ("apply-edits", 11, "evaluate-and-gate", 22)
    edit, gate = timed_tasks(RefreshConfig.from_params(ROOT / "params.yaml").to_dict())
    assert edit.timeout_seconds == 14400 and gate.timeout_seconds == 7200
