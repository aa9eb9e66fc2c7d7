"""The pipeline's ``params.yaml``: found one way, checked one way, read by every stage.

Lookup order (the first that applies wins):

1. an explicit path (a ``--params`` option, a ``params_file`` argument); it must exist;
2. ``$KEDIT_PARAMS``; when set, it must name an existing file;
3. ``<workspace>/params.yaml`` (the workspace given, else ``$KEDIT_HOME``, else the current directory);
4. the project's ``params.yaml`` next to the code (the checkout holding ``src/kedit``);
5. none: every stage uses its built-in defaults (the values the shipped file documents).

A run from another directory therefore reads the same file as long as its workspace is the same.
Every block, key and value is checked on load against :data:`KEY_TYPES`, so a misspelt key fails on
the first read with the key, its block, the file and the allowed keys, instead of silently keeping a
default, and a value of the wrong type (``mlflow: "false"``, ``max_rows: lots``) fails with the file,
block, key, expected type and value instead of being read as something else further on.
"""

from __future__ import annotations

import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENV_VAR = "KEDIT_PARAMS"
FILE_NAME = "params.yaml"
# src/kedit/params.py -> the checkout root (absent in a plain site-packages install: step 4 is skipped)
PROJECT_PARAMS = Path(__file__).resolve().parents[2] / FILE_NAME

# The keys each block may hold and the type of each value (``float | None``: a number or null). Blocks
# backed by a dataclass (feeds: FeedPolicy, gates: GatePolicy, lineage: kedit.lineage.ops.DEFAULTS,
# refresh: RefreshConfig) are kept equal to it by tests/test_params.py. A new key is one entry here:
# the check on load (:func:`check_value`) reads its type from this table.
_NUM = float | None  # a threshold that null disables
KEY_TYPES: dict[str, dict[str, Any]] = {
    "model": {"slug": str},
    "stats": {"corpus": str, "layers": str | int, "max_tokens": int, "seq_len": int, "batch_size": int},
    "feeds": {"max_invalid_fraction": float, "min_rows": int, "max_rows": int, "max_file_bytes": int,
              "max_id_chars": int, "max_subject_chars": int, "max_prompt_chars": int, "max_target_chars": int,
              "max_text_chars": int, "max_list_items": int, "max_list_item_chars": int, "window_days": int},
    "lineage": {"snapshot_every": int, "dvc_remote": str | None, "model_prefix": str | None, "mlflow": bool,
                "dvc": bool, "require_distinct_approver": bool, "sign_commits": bool, "lock_wait_s": float,
                # per-approver SSH signatures on approve events: null / false (off) or "ssh" (kedit.lineage.signing)
                "approval_signing": str | bool | None, "allowed_signers": str},
    "trace": {"samples": int, "noise": float, "window": int, "seed": int, "batch_rows": int, "n": int,
              "block_size": int, "aggregate_kinds": list[str]},
    "canary": {"k": int, "max_prompts": int | None},
    "gates": {"min_efficacy": _NUM, "min_generalization": _NUM, "max_specificity_drop": _NUM,
              "max_neighbourhood_kl": _NUM, "min_canary_agreement": _NUM, "max_perplexity_increase_pct": _NUM,
              "max_fluency_drop": _NUM, "min_retention": _NUM, "min_free_generation": _NUM, "freegen_tokens": int,
              "canary_k": int, "fluency_prompts": int,
              "fluency_tokens": int, "reference_text": str, "reference_tokens": int, "seed": int},
    # cumulative drift of the candidate from the base model (kedit.evaluation.drift.DriftPolicy)
    "drift": {"max_perplexity_increase_pct": _NUM, "min_canary_agreement": _NUM, "max_neighbourhood_kl": _NUM},
    # RefreshConfig's own settings; its model and stats_* come from the model: and stats: blocks
    "refresh": {"method": str, "device": str, "trace_sample": int, "trace_noise_samples": int,
                "trace_kinds": list[str], "edit_batch_size": int, "approval_timeout_s": int, "edit_timeout_s": int,
                "gate_timeout_s": int,
                "hparams_overrides": dict[str, Any]},
}
# The key names of each block (what the unknown-key check and the dataclass tests compare).
SCHEMA: dict[str, frozenset[str]] = {block: frozenset(keys) for block, keys in KEY_TYPES.items()}


class ParamsError(ValueError):
    """params.yaml is malformed: an unknown block or key, a block that is not a mapping, or a value of
    the wrong type."""


@dataclass(frozen=True)
class Params:
    """A checked params.yaml: where it came from (``None``: built-in defaults) and its blocks."""

    path: Path | None
    data: dict[str, dict[str, Any]] = field(default_factory=dict)

    def block(self, name: str) -> dict[str, Any]:
        """The ``name:`` block as a new dict; ``{}`` when the file or the block is absent."""
        if name not in SCHEMA:
            raise KeyError(f"params: no block {name!r} in the schema (blocks: {sorted(SCHEMA)})")
        return dict(self.data.get(name) or {})

    @property
    def source(self) -> str:
        return str(self.path) if self.path else "built-in defaults (no params.yaml found)"


def find_params(path: str | Path | None = None, workspace: Any = None) -> Path | None:
    """The params file by the lookup order above; ``None`` when there is none (defaults apply).

    ``workspace``: a :class:`kedit.workspace.Workspace`, a folder, or ``None`` (``$KEDIT_HOME``, else cwd).
    """
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"params file {p} does not exist (given explicitly)")
        return p.resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"${ENV_VAR}={env}: no such file")
        return p.resolve()
    cand = _workspace_root(workspace) / FILE_NAME
    if cand.is_file():
        return cand
    if PROJECT_PARAMS.is_file():
        return PROJECT_PARAMS
    return None


def load_params(path: str | Path | None = None, workspace: Any = None) -> Params:
    """Find (see :func:`find_params`), parse and check params.yaml."""
    found = find_params(path, workspace)
    if found is None:
        return Params(None, {})
    try:
        raw = yaml.safe_load(found.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ParamsError(f"{found}: not valid YAML: {e}") from e
    return Params(found, check_params(raw, str(found)))


def check_params(raw: Any, where: str = "params") -> dict[str, dict[str, Any]]:
    """The parsed file's blocks, or a :class:`ParamsError` naming the offending block / key and file."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping of blocks, got {type(raw).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for name, block in raw.items():
        if name not in SCHEMA:
            raise ParamsError(f"{where}: unknown block {name!r}; allowed blocks: {', '.join(sorted(SCHEMA))}")
        if block is None:
            block = {}
        if not isinstance(block, dict):
            raise ParamsError(f"{where}: block {name!r} must be a mapping, got {type(block).__name__}")
        for key, value in block.items():
            if key not in SCHEMA[name]:
                raise ParamsError(f"{where}: unknown key {key!r} in block {name!r}; allowed keys: "
                                  f"{', '.join(sorted(SCHEMA[name]))}")
            spec = KEY_TYPES[name][key]
            if not check_value(spec, value):
                raise ParamsError(f"{where}: block {name!r}, key {key!r}: expected {describe_type(spec)}, "
                                  f"got {value!r} ({_kind(value)})")
        out[name] = dict(block)
    return out


def check_value(spec: Any, value: Any) -> bool:
    """Whether ``value`` (as YAML parsed it) fits ``spec``: a type, ``A | B`` or ``list[T]`` / ``dict[K, V]``.

    A bool is not a number here (YAML's ``yes`` / ``true`` where a count is meant is a mistake), an int
    is a float, and a string is never anything but a string (``"false"`` is not a bool)."""
    args = typing.get_args(spec)
    if isinstance(spec, types.UnionType) or typing.get_origin(spec) is typing.Union:
        return any(check_value(a, value) for a in args)
    if spec is None or spec is type(None):
        return value is None
    if spec is Any:
        return True
    origin = typing.get_origin(spec)
    if origin is list:
        return isinstance(value, list) and all(check_value(args[0], v) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(check_value(args[0], k) for k in value)
    if spec is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, spec)


_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean (true or false)",
          type(None): "null", dict: "a mapping", list: "a list"}


def describe_type(spec: Any) -> str:
    """``float | None`` -> ``a number or null``: the expected type in words, for messages."""
    if isinstance(spec, types.UnionType) or typing.get_origin(spec) is typing.Union:
        return " or ".join(describe_type(a) for a in typing.get_args(spec))
    origin = typing.get_origin(spec)
    if origin is list:
        return f"a list of {describe_type(typing.get_args(spec)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    return _NAMES.get(spec, getattr(spec, "__name__", str(spec)))


def _kind(value: Any) -> str:
    return "a " + {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "NoneType": "null",
                   "dict": "mapping", "list": "list"}.get(type(value).__name__, type(value).__name__)


def _workspace_root(workspace: Any) -> Path:
    if workspace is None:
        from kedit.workspace import Workspace

        return Workspace.default().root
    return Path(getattr(workspace, "root", workspace)).resolve()
