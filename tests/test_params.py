"""params.yaml is found one way (kedit.params) and checked on load; every reader uses it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kedit import params as P
from kedit.evaluation.gates import GatePolicy
from kedit.feeds.schema import FeedPolicy
from kedit.lineage.ops import DEFAULTS as LINEAGE_DEFAULTS
from kedit.lineage.ops import lineage_params
from kedit.refresh import RefreshConfig
from kedit.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No $KEDIT_PARAMS / $KEDIT_HOME, and a cwd with no params.yaml."""
    monkeypatch.delenv("KEDIT_PARAMS", raising=False)
    monkeypatch.delenv("KEDIT_HOME", raising=False)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_lookup_order(clean_env, tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    # 4. nothing else: the project's file next to the code
    assert P.find_params(workspace=ws) == P.PROJECT_PARAMS == ROOT / "params.yaml"
    # 3. the workspace's file beats the project's
    ws_file = _write(ws.root / "params.yaml", "model: {slug: from-ws}\n")
    assert P.find_params(workspace=ws) == ws_file
    assert RefreshConfig.from_params(workspace=ws).model == "from-ws"
    # ... and the default workspace is $KEDIT_HOME, else the current directory
    assert P.find_params() == P.PROJECT_PARAMS
    monkeypatch.setenv("KEDIT_HOME", str(ws.root))
    assert P.find_params() == ws_file
    monkeypatch.delenv("KEDIT_HOME")
    # 2. $KEDIT_PARAMS beats the workspace; set to a missing file it is an error, not a fallback
    env_file = _write(tmp_path / "env.yaml", "model: {slug: from-env}\n")
    monkeypatch.setenv("KEDIT_PARAMS", str(env_file))
    assert P.find_params(workspace=ws) == env_file
    assert RefreshConfig.from_params(workspace=ws).model == "from-env"
    monkeypatch.setenv("KEDIT_PARAMS", str(tmp_path / "missing.yaml"))
    with pytest.raises(FileNotFoundError, match="KEDIT_PARAMS"):
        P.find_params(workspace=ws)
    # 1. an explicit path beats everything; a missing explicit file is an error
    arg_file = _write(tmp_path / "arg.yaml", "model: {slug: from-arg}\n")
    assert P.find_params(arg_file, workspace=ws) == arg_file
    assert RefreshConfig.from_params(arg_file, ws).model == "from-arg"
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        GatePolicy.from_params(tmp_path / "missing.yaml")


def test_no_file_means_builtin_defaults(clean_env, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "PROJECT_PARAMS", tmp_path / "no-checkout" / "params.yaml")
    params = P.load_params(workspace=tmp_path)
    assert params.path is None and params.block("gates") == {}
    assert GatePolicy.from_params(workspace=tmp_path) == GatePolicy()
    assert RefreshConfig.from_params(workspace=tmp_path) == RefreshConfig()


def test_every_reader_uses_the_same_file(clean_env, tmp_path):
    ws = Workspace(tmp_path / "ws")
    _write(ws.root / "params.yaml", "lineage: {snapshot_every: 7}\ngates: {min_efficacy: 0.5}\n"
                                    "feeds: {max_rows: 9}\nrefresh: {edit_batch_size: 3}\n")
    assert lineage_params(ws)["snapshot_every"] == 7
    assert GatePolicy.from_params(workspace=ws).min_efficacy == 0.5
    assert RefreshConfig.from_params(workspace=ws).edit_batch_size == 3
    from kedit.cli import feed as feed_cli
    from kedit.cli import main

    class Args:
        params = None
        workspace = str(ws.root)

    assert feed_cli._policy(Args()).max_rows == 9
    assert main(["-w", str(ws.root), "feed", "schema"]) == 0


def test_a_run_from_another_directory_reads_the_same_file(tmp_path):
    """A fresh interpreter whose cwd holds an unrelated params.yaml still reads the workspace's."""
    ws = tmp_path / "ws"
    _write(ws / "params.yaml", "refresh: {edit_batch_size: 4, method: memit}\n")
    other = tmp_path / "other"
    _write(other / "params.yaml", "refresh: {edit_batch_size: 99}\n")
    code = ("from kedit.refresh import RefreshConfig; from kedit.lineage.ops import lineage_params;"
            "from kedit.workspace import Workspace; c = RefreshConfig.from_params();"
            "print(c.edit_batch_size, c.method, lineage_params(Workspace.default())['snapshot_every'])")
    env = {**os.environ, "KEDIT_HOME": str(ws), "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    env.pop("KEDIT_PARAMS", None)
    out = {}
    for cwd in (ROOT, other, tmp_path):
        out[cwd] = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                                  check=True).stdout.split()
    assert list(out.values()) == [["4", "memit", "20"]] * 3


def test_unknown_key_names_key_block_file_and_allowed(clean_env, tmp_path):
    p = _write(tmp_path / "params.yaml", "refresh:\n  method: memit\n  edit_batch_sise: 5\n")
    with pytest.raises(P.ParamsError) as err:
        RefreshConfig.from_params(p)
    msg = str(err.value)
    assert "'edit_batch_sise'" in msg and "'refresh'" in msg and str(p) in msg and "edit_batch_size" in msg
    # every reader fails the same way, whichever block it reads
    with pytest.raises(P.ParamsError, match="edit_batch_sise"):
        GatePolicy.from_params(p)
    with pytest.raises(P.ParamsError, match="edit_batch_sise"):
        lineage_params(Workspace(tmp_path), p)
    with pytest.raises(P.ParamsError, match="edit_batch_sise"):
        FeedPolicy.from_params(p)
    _write(p, "gate:\n  min_efficacy: 0.5\n")
    with pytest.raises(P.ParamsError, match="unknown block 'gate'.*gates"):
        P.load_params(p)
    _write(p, "lineage: [1, 2]\n")
    with pytest.raises(P.ParamsError, match="block 'lineage' must be a mapping"):
        P.load_params(p)
    _write(p, "model: {slug: [unclosed\n")
    with pytest.raises(P.ParamsError, match="not valid YAML"):
        P.load_params(p)


def test_refresh_config_reads_the_refresh_block(tmp_path):
    p = _write(tmp_path / "params.yaml", "model: {slug: other}\nstats: {max_tokens: 1234}\n"
                                         "refresh: {method: memit, edit_batch_size: 4, hparams_overrides: {L2: 3}}\n")
    cfg = RefreshConfig.from_params(p, approval_timeout_s=60, device=None)
    assert (cfg.model, cfg.method, cfg.edit_batch_size, cfg.stats_max_tokens, cfg.approval_timeout_s, cfg.device) \
        == ("other", "memit", 4, 1234, 60, "cpu")
    assert cfg.hparams_overrides == {"L2": 3}
    # the model and statistics have one home each (model:, stats:), not a second one in refresh:
    _write(p, "refresh: {model: other}\n")
    with pytest.raises(P.ParamsError, match="'model' in block 'refresh'"):
        RefreshConfig.from_params(p)


def test_shipped_file_documents_every_refresh_setting_at_its_default():
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(data["refresh"]) == P.SCHEMA["refresh"]
    assert RefreshConfig.from_params(ROOT / "params.yaml") == RefreshConfig()
    P.check_params(data, "params.yaml")  # the shipped file passes its own schema


def test_schema_matches_the_dataclasses():
    """The schema lists exactly what each block's reader takes, so neither can drift from the other."""
    names = lambda cls: {f.name for f in dataclasses.fields(cls)}  # noqa: E731
    assert P.SCHEMA["gates"] == names(GatePolicy)
    assert P.SCHEMA["feeds"] == names(FeedPolicy)
    assert P.SCHEMA["lineage"] == set(LINEAGE_DEFAULTS)
    own = {n for n in names(RefreshConfig) if n != "model" and not n.startswith("stats_")}
    assert P.SCHEMA["refresh"] == own
    assert {f"stats_{k}" for k in ("corpus", "max_tokens", "seq_len", "batch_size")} <= names(RefreshConfig)


@pytest.mark.parametrize("block,key,text,expected", [
    ("feeds", "max_rows", '"lots"', "an integer"),
    ("lineage", "mlflow", '"false"', "a boolean"),  # a string "false" is not off: it used to read as on
    ("lineage", "snapshot_every", "twenty", "an integer"),
    ("lineage", "dvc", "1", "a boolean"),
    ("gates", "min_efficacy", "true", "a number or null"),
    ("trace", "aggregate_kinds", "[mlp, 3]", "a list of strings"),
    ("refresh", "hparams_overrides", "[L2]", "a mapping"),
])
def test_wrong_value_type_names_file_block_key_type_and_value(clean_env, tmp_path, block, key, text, expected):
    p = _write(tmp_path / "params.yaml", f"{block}:\n  {key}: {text}\n")
    value = yaml.safe_load(text)
    with pytest.raises(P.ParamsError) as err:
        P.load_params(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}: block {block!r}, key {key!r}: expected {expected}")
    assert f"got {value!r}" in msg
    # the readers fail the same way, before any of them turns the value into something else
    with pytest.raises(P.ParamsError, match=key):
        lineage_params(Workspace(tmp_path), p)


def test_values_of_the_right_type_pass(clean_env, tmp_path):
    p = _write(tmp_path / "params.yaml", "gates: {min_efficacy: null, max_fluency_drop: 30, reference_text: x}\n"
                                         "feeds: {max_invalid_fraction: 0}\nlineage: {dvc_remote: null, mlflow: false}\n"
                                         "stats: {layers: 5}\ncanary: {max_prompts: null}\n")
    params = P.load_params(p)
    assert params.block("lineage") == {"dvc_remote": None, "mlflow": False}
    assert GatePolicy.from_params(p).max_fluency_drop == 30


def test_every_schema_key_has_a_type_its_default_fits():
    """The types come from one table; each dataclass default (what an absent key means) passes it."""
    assert set(P.SCHEMA) == set(P.KEY_TYPES)
    own_refresh = {k: v for k, v in dataclasses.asdict(RefreshConfig()).items() if k in P.SCHEMA["refresh"]}
    defaults = {"gates": dataclasses.asdict(GatePolicy()), "feeds": dataclasses.asdict(FeedPolicy()),
                "lineage": dict(LINEAGE_DEFAULTS), "refresh": own_refresh}
    assert P.check_params(defaults, "defaults") == defaults
