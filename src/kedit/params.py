"""The pipeline's ``params.yaml``: found one way, checked one way, read by every stage.

Lookup order (the first that applies wins):

1. an explicit path (a ``--params`` option, a ``params_file`` argument); it must exist;
2. ``$KEDIT_PARAMS``; when set, it must name an existing file;
3. ``<workspace>/params.yaml`` (the workspace given, else ``$KEDIT_HOME``, else the current directory);
4. the project's ``params.yaml`` next to the code (the checkout holding ``src/kedit``);
5. none: every stage uses its built-in defaults (the values the shipped file documents).

A run from another directory therefore reads the same file as long as its workspace is the same.
Every block and key is checked on load against :data:`SCHEMA`, so a misspelt key fails on the first
read with the key, its block, the file and the allowed keys, instead of silently keeping a default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENV_VAR = "KEDIT_PARAMS"
FILE_NAME = "params.yaml"
# src/kedit/params.py -> the checkout root (absent in a plain site-packages install: step 4 is skipped)
PROJECT_PARAMS = Path(__file__).resolve().parents[2] / FILE_NAME

# The keys each block may hold. Blocks backed by a dataclass (feeds: FeedPolicy, gates: GatePolicy,
# lineage: kedit.lineage.ops.DEFAULTS, refresh: RefreshConfig) are kept equal to it by tests/test_params.py.
SCHEMA: dict[str, frozenset[str]] = {
    "model": frozenset({"slug"}),
    "stats": frozenset({"corpus", "layers", "max_tokens", "seq_len", "batch_size"}),
    "feeds": frozenset({"max_invalid_fraction", "min_rows", "max_rows", "max_file_bytes", "max_id_chars",
                        "max_subject_chars", "max_prompt_chars", "max_target_chars", "max_text_chars",
                        "max_list_items", "max_list_item_chars", "window_days"}),
    "lineage": frozenset({"snapshot_every", "dvc_remote", "model_prefix", "mlflow", "dvc"}),
    "trace": frozenset({"samples", "noise", "window", "seed", "batch_rows", "n", "block_size",
                        "aggregate_kinds"}),
    "canary": frozenset({"k", "max_prompts"}),
    "gates": frozenset({"min_efficacy", "min_generalization", "max_specificity_drop", "max_neighbourhood_kl",
                        "min_canary_agreement", "max_perplexity_increase_pct", "max_fluency_drop",
                        "min_retention", "min_free_generation", "freegen_tokens", "canary_k", "fluency_prompts",
                        "fluency_tokens", "reference_text",
                        "reference_tokens", "seed"}),
    # cumulative drift of the candidate from the base model (kedit.evaluation.drift.DriftPolicy)
    "drift": frozenset({"max_perplexity_increase_pct", "min_canary_agreement", "max_neighbourhood_kl"}),
    # RefreshConfig's own settings; its model and stats_* come from the model: and stats: blocks
    "refresh": frozenset({"method", "device", "trace_sample", "trace_noise_samples", "edit_batch_size",
                          "approval_timeout_s", "hparams_overrides"}),
}


class ParamsError(ValueError):
    """params.yaml is malformed: an unknown block or key, or a block that is not a mapping."""


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
        for key in block:
            if key not in SCHEMA[name]:
                raise ParamsError(f"{where}: unknown key {key!r} in block {name!r}; allowed keys: "
                                  f"{', '.join(sorted(SCHEMA[name]))}")
        out[name] = dict(block)
    return out


def _workspace_root(workspace: Any) -> Path:
    if workspace is None:
        from kedit.workspace import Workspace

        return Workspace.default().root
    return Path(getattr(workspace, "root", workspace)).resolve()
