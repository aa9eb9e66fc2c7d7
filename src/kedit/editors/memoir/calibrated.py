"""The memory's settings are measured per model: a team's imported model without them is refused.

The memory's layer, k and read thresholds do not transfer between models (SmolLM2's on Gemma 3 270M
read neighbourhood prompts as the edited subject), and ``default.yaml`` has no ``memoir`` block. A
store model whose settings file has none is refused with the command that measures them
(``kedit calibrate``, docs/calibration.md); settings built in code (no file) and in-memory models
(tests) are the caller's choice and pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kedit.editors.hparams import MODEL_HPARAMS, EditHparams, model_store_dir
from kedit.editors.memoir.state import METHOD


class UncalibratedModel(ValueError):
    """The model has no memoir settings of its own: run ``kedit calibrate --model M``."""


def has_memoir_block(file: str | Path) -> bool:
    """Whether an hparams file carries a ``memoir`` block (settings measured for the memory)."""
    data = yaml.safe_load(Path(file).read_bytes()) or {}
    return isinstance(data, dict) and isinstance(data.get(METHOD), dict)


def require_calibrated(lm: Any, hp: EditHparams) -> None:
    """Refuse ``hp`` for ``lm`` when ``lm`` is a store model and ``hp`` was read from a file with no
    memoir block; the message names the command that writes the model's own file."""
    if model_store_dir(lm) is None or not hp.source or has_memoir_block(hp.source):
        return
    slug = getattr(lm, "slug", "M")
    raise UncalibratedModel(
        f"model {slug!r} has no memoir settings ({hp.source} has no memoir block): the memory's layer, k and "
        f"read thresholds are measured per model. Run `kedit calibrate --model {slug}` (a few minutes; "
        f"writes models/{slug}/{MODEL_HPARAMS} in the workspace), or pass --hparams FILE with a memoir block")
