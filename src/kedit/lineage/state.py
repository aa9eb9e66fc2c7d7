"""The edit-state record: one applied edit batch, identified by the hash of its content.

Everything that determines the edited weights and the editor's state (parent, base model, feed,
editor, hyperparameters, per-tensor hashes of the deltas and of the weights after the batch) goes
into the content hash. Approval, gate verdicts, promotion and rollback happen later and are
appended as events (see :mod:`kedit.lineage.store`), so a record never changes once written.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kedit.atomic import sha256_json

SCHEMA = 1
STATE_FILE = "state.json"
DELTAS_FILE = "deltas.safetensors"
EDITOR_TENSORS_FILE = "editor_state.safetensors"
EDITOR_META_FILE = "editor_meta.json"
SNAPSHOT_FILE = "snapshot.safetensors"
# How the base model (no edit state) is written wherever a record is text: the CHAMPION file, MLflow
# tags, the git tag, CLI arguments. In Python it is ``None`` (``LineageStore.champion()``).
BASE = "base"


def label(state_id: str | None) -> str:
    """A state id as text records write it: the id itself, or ``base`` for the base model."""
    return state_id if state_id else BASE

# Fields whose values define the state; the id is the sha256 of these in canonical JSON.
CONTENT_FIELDS = ("schema", "parent", "base_model_hash", "base_model_slug", "feed", "method", "hparams",
                  "deltas", "editor_state", "tensor_sha256", "base_sha256", "evaluation", "predictions",
                  "n_edits")


class LineageError(ValueError):
    """A lineage store problem a user can act on (unknown id, lock held, wrong base model)."""


class LineageCorruptError(LineageError):
    """Stored data does not match its recorded hash; the message names the file."""


@dataclass(frozen=True)
class EditState:
    """One edit state. ``deltas`` / ``editor_state`` hold per-tensor {shape, dtype, sha256, norm};
    ``tensor_sha256`` the hash of every tensor edited on the path from the base model to this state,
    after this batch; ``base_sha256`` the same tensors' hashes in the base model."""

    id: str
    parent: str | None
    base_model_hash: str
    base_model_slug: str
    feed: dict[str, Any]
    method: str
    hparams: dict[str, Any]
    deltas: dict[str, dict[str, Any]]
    editor_state: dict[str, Any]
    tensor_sha256: dict[str, str]
    base_sha256: dict[str, str]
    evaluation: dict[str, Any] | None = None
    predictions: dict[str, str] | None = None
    n_edits: int = 0
    schema: int = SCHEMA
    # Bookkeeping, not content: where and when it was written.
    depth: int = 1
    seq: int = 0
    created_at: str = ""
    snapshot: bool = False
    files: dict[str, str] = field(default_factory=dict)

    @property
    def short(self) -> str:
        return self.id[:12]

    def content(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in CONTENT_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def compute_id(content: dict[str, Any]) -> str:
        return sha256_json(content)

    @classmethod
    def from_file(cls, path: Path) -> EditState:
        """Parse and check a state.json: plain JSON only, and the id must match the content."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LineageCorruptError(f"{path}: unreadable state manifest ({exc})") from exc
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            raise LineageCorruptError(f"{path}: not a kedit edit-state manifest of schema {SCHEMA}")
        known = set(cls.__dataclass_fields__)
        missing = [k for k in ("id", *CONTENT_FIELDS) if k not in raw]
        if missing:
            raise LineageCorruptError(f"{path}: state manifest lacks fields {missing}")
        state = cls(**{k: v for k, v in raw.items() if k in known})
        actual = cls.compute_id(state.content())
        if actual != state.id:
            raise LineageCorruptError(f"{path}: content hash {actual[:12]} does not match the recorded id "
                                      f"{state.id[:12]} (the manifest was modified)")
        if Path(path).parent.name != state.id:
            raise LineageCorruptError(f"{path}: stored under {Path(path).parent.name!r} but its id is {state.id}")
        return state


@dataclass(frozen=True)
class Event:
    """Something that happened to a state after it was written: promote, rollback, approve, gate.

    ``by`` is what the caller says (free text); ``actor`` is who the writing process ran as (see
    :mod:`kedit.lineage.identity`): its OS account, the configured ``$KEDIT_IDENTITY``, host and pid.
    """

    seq: int
    type: str
    state: str | None
    by: str
    at: str
    comment: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    actor: dict[str, Any] = field(default_factory=dict)
    # the hash chain (kedit.lineage.chain): the previous event's digest and this one's; None before the chain
    prev: str | None = None
    digest: str | None = None
    # an approver's SSH signature over the event's chained content (kedit.lineage.signing); None: unsigned
    signature: dict[str, Any] | None = None
    file: str = field(default="", compare=False)  # the file it was read from (not written)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("file")
        if self.digest is None:  # written before the chain: as it was
            d.pop("prev"), d.pop("digest")
        if self.signature is None:
            d.pop("signature")
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any], file: str = "") -> Event:
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw and k != "file"}, file=file)

    @classmethod
    def from_file(cls, path: Path) -> Event:
        return cls.from_dict(read_event_json(path), Path(path).name)


def read_event_json(path: Path) -> dict[str, Any]:
    """An event file's JSON object, or LineageCorruptError naming the file."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LineageCorruptError(f"{path}: unreadable event ({exc})") from exc
    missing = [k for k in ("seq", "type", "state", "by", "at") if not isinstance(raw, dict) or k not in raw]
    if missing or not isinstance(raw.get("seq"), int):
        raise LineageCorruptError(f"{path}: not a lineage event (missing or bad fields {missing or ['seq']})")
    return raw
