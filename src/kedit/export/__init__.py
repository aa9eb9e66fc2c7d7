"""Exported model directories of edit states whose editor *added* parameters (T-Patcher, memory).

A weight editor's state is a plain HuggingFace directory. An added-capacity state also needs its
extra computation, so the directory ships its own code (``configuration_kedit_added.py`` /
``modeling_kedit_added.py``, from :mod:`kedit.export.remote`, importing only torch and transformers)
and ``auto_map`` in ``config.json``: ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
loads the base architecture's class subclassed with the added tensors (saved beside the base weights
as ``kedit_added.*``) and the same forward hook kedit attaches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kedit.editors.base import EditorState

REMOTE_DIR = Path(__file__).parent / "remote"
CONFIG_FILE, MODELING_FILE = "configuration_kedit_added.py", "modeling_kedit_added.py"
MODEL_TYPE = "kedit_added"
PREFIX = "kedit_added."


@dataclass
class AddedParameters:
    """What an exported directory adds to the base model: ``spec`` (config.kedit_added) and tensors."""

    spec: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def added_parameters(lm, state: EditorState | None) -> AddedParameters | None:
    """The state's added tensors and where they act; None for a state that adds nothing (weight
    editors, the base model, an added-capacity state with no entries yet)."""
    if state is None:
        return None
    from kedit.editors.registry import SPECS

    spec = SPECS.get(state.method)
    added = None if spec is None or spec.export is None else spec.export(lm, state)
    return None if added is None else AddedParameters(*added)


def _remote_source(name: str, marker: str, value: str) -> str:
    """A shipped module's text with its base-class line set to ``value`` (refused if the line moved)."""
    src = (REMOTE_DIR / name).read_text()
    line = next((ln for ln in src.splitlines() if ln.startswith(f"{marker} = ")), None)
    if line is None:
        raise RuntimeError(f"{REMOTE_DIR / name} has no '{marker} = ...' line to set")
    return src.replace(line, f'{marker} = "{value}"  # the edited model\'s base architecture', 1)


def save_with_added(lm, added: AddedParameters, out: Path) -> None:
    """``save_pretrained`` of ``lm`` plus the added tensors, the shipped code and ``auto_map``."""
    import transformers

    model_cls, config_cls = type(lm.model).__name__, type(lm.model.config).__name__
    for name in (model_cls, config_cls):
        if not hasattr(transformers, name):
            raise ValueError(f"export: transformers has no top-level {name}, so the shipped code cannot "
                             f"subclass it")
    state_dict = {**lm.model.state_dict(),
                  **{PREFIX + n: t.detach().to("cpu").contiguous() for n, t in added.tensors.items()}}
    lm.model.save_pretrained(out, state_dict=state_dict)
    (out / CONFIG_FILE).write_text(_remote_source(CONFIG_FILE, "BASE_CONFIG_CLASS", config_cls))
    (out / MODELING_FILE).write_text(_remote_source(MODELING_FILE, "BASE_MODEL_CLASS", model_cls))
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(model_type=MODEL_TYPE, architectures=["KeditAddedForCausalLM"], kedit_added=added.spec,
               auto_map={"AutoConfig": "configuration_kedit_added.KeditAddedConfig",
                         "AutoModelForCausalLM": "modeling_kedit_added.KeditAddedForCausalLM"})
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
