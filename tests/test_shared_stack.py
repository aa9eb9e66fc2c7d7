"""Two workspaces standing for two machines, sharing nothing but the services, on real servers: PostgreSQL
(the Prefect and MLflow databases and the lineage lock), an S3 store (moto, MLflow artifacts through the
MLflow server's proxy and the DVC remote), an MLflow tracking server and a bare git repository. The
executable form of infra/docker-compose.yml's topology (kedit.orchestration.services).

Workspace A edits (a tiny random Llama) and registers; B, a different folder that never sees A's
files (A is moved away), approves, promotes and rolls back, and loads the champion through MLflow,
bit-identical to A's state; A pulls and sees B's decisions. Two writers at once take turns (a
PostgreSQL advisory lock); a worker killed mid-edit leaves every service as it was and the lock free;
a service that is down is named and nothing changes.

CI installs the services (Makefile `stack-services`), so the test runs there; elsewhere it is skipped
with the reason when they cannot be installed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "shared_stack_worker.py"
MODEL = "kedit-tiny-llama"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    from kedit.orchestration.services import SharedServices, missing_tools

    missing = missing_tools()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the shared-services test; missing: {missing} (make stack-services)")
        pytest.skip(f"shared services not installed here: {missing} (`make stack-services` installs them)")
    svc = SharedServices(tmp_path_factory.mktemp("services"))
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    from tests.conftest import make_tiny_model, make_tokenizer

    src = tmp_path_factory.mktemp("tiny-src")
    make_tiny_model("llama").save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    return src


@pytest.fixture
def shared_env(services, monkeypatch):
    for k, v in services.worker_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("KEDIT_PARAMS", raising=False)
    return {**os.environ}


@pytest.fixture(scope="module")
def machine_a(services, tiny_src, tmp_path_factory):
    """Workspace A after the gpu worker's edit: its state is published (git + DVC on S3). -> (folder, id)"""
    env = {**os.environ, **services.worker_env()}
    env.pop("KEDIT_PARAMS", None)
    a_dir = tmp_path_factory.mktemp("machine-a") / "ws"
    return a_dir, finish(worker(env, "edit", str(a_dir), str(tiny_src), "1"))["state"]


def worker(env: dict, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, **kw)


def finish(p: subprocess.Popen, timeout: float = 240) -> dict:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"worker failed ({p.returncode}):\n{err[-4000:]}"
    return json.loads(out.strip().splitlines()[-1])


def remote_head(services) -> str:
    return subprocess.run(["git", "--git-dir", str(services.git_remote), "rev-parse", "main"],
                          capture_output=True, text=True).stdout.strip()


def model_digest(model) -> dict[str, str]:
    from kedit.atomic import sha256_tensor

    return {k: sha256_tensor(v) for k, v in model.state_dict().items()}


def test_edit_in_a_decide_in_b_champion_loads_bit_identical(services, shared_env, machine_a, tmp_path):
    import mlflow

    from kedit.lineage import ops
    from kedit.lineage.access import load_state_model
    from kedit.lineage.registry import TAG_STATE
    from kedit.workspace import Workspace

    # A: the gpu worker's machine edited (fixture), its state is published; now it registers it
    (a_dir, sid), b_dir = machine_a, tmp_path / "machine-b" / "ws"
    a = Workspace(a_dir)
    with ops.section(a, "register", ops.lineage_params(a)):
        mv = ops.register_candidate(a, ops.open_store(a), sid)
    assert mv.tags[TAG_STATE] == sid and str(mv.source).startswith("models:/")
    lm_a, _ = load_state_model(a, "tiny-llama", sid)
    want = model_digest(lm_a.model)
    away = a_dir.with_name("away")
    a_dir.rename(away)  # nothing of A's folder is reachable from here on

    # B: a fresh folder; it gets the lineage from the shared services only
    b = Workspace(b_dir)
    params = ops.lineage_params(b)
    with ops.section(b, "approve", params):
        store = ops.open_store(b, params)
        assert store.get(sid).id == sid
        ops.approve(store, sid, by="reviewer-b", comment="checked on machine B")
        out = ops.promote(b, store, sid, by="reviewer-b", params=params)
    assert out["champion"] == sid and store.champion() == sid

    client = mlflow.MlflowClient(services.mlflow_url)
    champ = client.get_model_version_by_alias(MODEL, "champion")
    assert champ.tags[TAG_STATE] == sid
    loaded = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert model_digest(loaded.unwrap_python_model().lm.model) == want  # bit-identical to A's state
    # artifacts went through the server's proxy: clients only ever see mlflow-artifacts:/ URIs
    run = client.get_run(champ.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri

    # B rolls back to the base model through the Prefect rollback deployment, run by a cpu worker whose
    # workspace is B, on a Prefect server whose database is the shared PostgreSQL
    from kedit.orchestration import LocalStack, state_type

    stack = LocalStack(home=tmp_path / "prefect", project_dir=ROOT, workspace=b_dir,
                       database_url=services.prefect_db_url)
    try:
        api = stack.start_server()
        stack.create_pools()
        stack.deploy()
        stack.start_workers(("cpu",))
        run = api.run_deployment("rollback/rollback", {"state": "base", "by": "reviewer-b",
                                                       "reason": "test rollback", "workspace": str(b_dir)})
        fr = api.wait(run.id, timeout=600)
        assert state_type(fr) == "COMPLETED", (tmp_path / "prefect" / "worker-cpu.log").read_text()[-5000:]
    finally:
        stack.stop()
    import psycopg2

    with psycopg2.connect(services.pg.url("prefect")) as con, con.cursor() as cur:
        cur.execute("SELECT count(*) FROM flow_run WHERE id = %s", (str(run.id),))
        assert cur.fetchone()[0] == 1  # the run is in PostgreSQL, not in a SQLite file
    assert ops.open_store(b, params).champion() is None
    assert client.get_model_version_by_alias(MODEL, "champion").tags[TAG_STATE] == "base"
    assert "kedit/state/base" in subprocess.run(["git", "--git-dir", str(services.git_remote), "tag"],
                                                capture_output=True, text=True).stdout

    # A comes back and pulls: it sees B's approval, promotion and rollback
    away.rename(a_dir)
    from kedit.lineage.shared import Shared, pull

    assert pull(a, Shared.from_env())
    evs = [(e.type, e.by) for e in ops.open_store(a).events()]
    assert ("approve", "reviewer-b") in evs and ("promote", "reviewer-b") in evs and ("rollback", "reviewer-b") in evs
    assert ops.open_store(a).champion() is None
    assert ops.divergences(a, ops.open_store(a)) == []


def test_two_writers_at_once_take_turns(services, shared_env, machine_a, tmp_path):
    from kedit.lineage import ops
    from kedit.workspace import Workspace

    sid = machine_a[1]
    before = remote_head(services)
    procs = [worker(shared_env, "gate", str(tmp_path / name), sid, name, "3") for name in ("d", "e")]
    runs = sorted((finish(p) for p in procs), key=lambda r: r["entered"])
    first, second = runs
    assert second["entered"] >= first["left"], f"the two sections overlapped: {runs}"
    assert second["events_seen"] == first["events_seen"] + 1  # the second saw the first's event
    ws = Workspace(tmp_path / "d")
    from kedit.lineage.shared import Shared, pull

    pull(ws, Shared.from_env())
    gates = [e for e in ops.open_store(ws).events() if e.type == "gate" and e.by in ("d", "e")]
    assert sorted(e.by for e in gates) == ["d", "e"] and len({e.seq for e in gates}) == 2
    log = subprocess.run(["git", "--git-dir", str(services.git_remote), "log", "--format=%s", f"{before}..main"],
                         capture_output=True, text=True).stdout.splitlines()
    assert sorted(log) == ["kedit: gate by d", "kedit: gate by e"]  # linear history, one commit each


def test_worker_killed_mid_edit_leaves_the_services_as_they_were(services, shared_env, tiny_src, tmp_path):
    import mlflow

    from kedit.lineage.shared import LineageLock

    before = remote_head(services)
    versions = len(mlflow.MlflowClient(services.mlflow_url).search_model_versions(f"name='{MODEL}'"))
    env = {**shared_env, "KEDIT_TEST_PAUSE_AT": "publish"}  # after dvc push, before the git push
    p = worker(env, "edit", str(tmp_path / "f"), str(tiny_src), "3")
    deadline = time.monotonic() + 180
    line = ""
    while "paused at 'publish'" not in line:
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()[-3000:]
        line = p.stderr.readline()
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert remote_head(services) == before  # the shared lineage did not move
    assert len(mlflow.MlflowClient(services.mlflow_url).search_model_versions(f"name='{MODEL}'")) == versions
    t0 = time.monotonic()
    with LineageLock(services.lock_url, op="after the kill").held(wait_s=10):  # the lock died with the worker
        assert time.monotonic() - t0 < 10


def test_a_service_that_is_down_is_named_and_nothing_changes(services, shared_env, machine_a, tmp_path):
    from kedit.lineage import ops
    from kedit.lineage.shared import Shared, pull
    from kedit.lineage.state import LineageError
    from kedit.workspace import Workspace

    ws, sid = Workspace(tmp_path / "g"), machine_a[1]
    pull(ws, Shared.from_env())  # this machine's copy of the lineage, while everything is up
    params = ops.lineage_params(ws)
    store = ops.open_store(ws, params)
    head, events = remote_head(services), len(store.events())
    for service, named in (("s3", "S3 object store"), ("mlflow", "MLflow tracking server"),
                           ("postgres", "PostgreSQL")):
        services.stop_service(service)
        with pytest.raises(LineageError, match=named):
            ops.rollback(ws, store, "base", by="ops", reason="outage", params=params, force=True)
        with pytest.raises(LineageError, match=named):
            ops.promote(ws, store, sid, by="ops", params=params, override="outage test")
        assert len(ops.open_store(ws, params).events()) == events and remote_head(services) == head
