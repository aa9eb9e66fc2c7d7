"""A lineage state's own perplexity and generation entropy under one gate's settings, kept by state id.

Every gate scores both sides on the same reference text and fluency prompts. Tonight's champion was
yesterday's candidate, scored then on the same settings, and a state's model never changes (its id is
its content), so the champion side is read from here instead of computed again; the candidate's scores
are written for the gate that will have it as parent. The key holds everything the two numbers depend
on (text hash, token count, prompts, tokens, seed, device, dtype); change any and the side is scored
again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kedit.atomic import sha256_json, write_json_atomic
from kedit.evaluation.drift import text_sha256

SCORE_NAMES = ("perplexity", "generation_entropy")


@dataclass(frozen=True)
class ScoreSettings:
    """What a side's perplexity and generation entropy depend on besides the model."""

    text_sha256: str | None
    reference_tokens: int
    fluency_prompts: tuple[str, ...]
    fluency_tokens: int
    seed: int
    device: str
    dtype: str

    def key(self) -> str:
        """The settings' SHA-256 (hex): equal keys, equal scores for one model."""
        return sha256_json(asdict(self))


def score_settings(text: str | None, reference_tokens: int, fluency_prompts: Sequence[str], fluency_tokens: int,
                   seed: int, device: str, dtype: str) -> ScoreSettings:
    return ScoreSettings(text_sha256(text), int(reference_tokens), tuple(fluency_prompts), int(fluency_tokens), int(seed),
                         str(device), str(dtype))


class SideScoreCache:
    """``<root>/<who>.json``: ``{settings key: {"perplexity": .., "generation_entropy": ..}}`` per model
    (``who``: a lineage state id, or ``base-<hash>`` for a base model). Writes are atomic."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, who: str) -> Path:
        if not who or "/" in who or who.startswith("."):
            raise ValueError(f"side scores: bad model name {who!r}")
        return self.root / f"{who}.json"

    def _read(self, who: str) -> dict:
        try:
            data = json.loads(self._path(who).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, who: str, key: str) -> dict[str, float] | None:
        """The stored scores of ``who`` under ``key`` (only the names with a number), or None."""
        got = self._read(who).get(key)
        if not isinstance(got, dict):
            return None
        out = {k: float(v) for k, v in got.items() if k in SCORE_NAMES and isinstance(v, (int, float))}
        return out or None

    def put(self, who: str, key: str, scores: dict[str, float | None]) -> None:
        """Add ``scores`` (None values left out) to what ``who`` holds under ``key``."""
        new = {k: float(v) for k, v in scores.items() if k in SCORE_NAMES and v is not None}
        if not new:
            return
        data = self._read(who)
        data[key] = {**(data.get(key) or {}), **new}
        path = self._path(who)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)
