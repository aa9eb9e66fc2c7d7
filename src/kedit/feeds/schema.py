"""The feed row format, its limits (a :class:`FeedPolicy` read from ``params.yaml``) and its JSON Schema.

A feed row is one fact change. The JSON Schema is generated from the policy so the limits live in
one place; ``src/kedit/data/feed.schema.json`` is the copy for the default policy (a test keeps
them equal).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

REQUIRED_FIELDS = ("id", "subject", "prompt", "target_new", "source", "observed_at")
OPTIONAL_FIELDS = ("target_true", "relation", "paraphrases", "neighbors")
FEED_FIELDS = REQUIRED_FIELDS[:4] + ("target_true", "relation", "paraphrases", "neighbors", "source", "observed_at")
STRING_FIELDS = ("id", "subject", "prompt", "target_new", "target_true", "relation", "source", "observed_at")
LIST_FIELDS = ("paraphrases", "neighbors")

# C0 and C1 control characters (tab and newline included): never legitimate inside a fact.
CONTROL_CHARS = r"[\x00-\x1f\x7f-\x9f]"
# Characters that change how text displays or compares without being visible: bidi embeddings,
# overrides, isolates and marks (U+202A-U+202E, U+2066-U+2069, U+200E/U+200F, U+061C), zero-width
# space/joiners and word joiners (U+200B-U+200D, U+2060-U+2064), the BOM inside text (U+FEFF),
# interlinear annotation (U+FFF9-U+FFFB) and tag characters (U+E0000-U+E007F, invisible ASCII copies).
# A fact carrying one can read differently to a reviewer than to the model.
INVISIBLE_RANGES = ((0x061C, 0x061C), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x2064),
                    (0x2066, 0x2069), (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFB), (0xE0000, 0xE007F))
INVISIBLE_CHARS = "[" + "".join(f"\\u{a:04x}" + (f"-\\u{b:04x}" if b > a else "") if b <= 0xFFFF
                                else f"\\U{a:08x}-\\U{b:08x}" for a, b in INVISIBLE_RANGES) + "]"
# U+FFFD REPLACEMENT CHARACTER: what a decoder leaves for bytes it could not read, i.e. the text went
# through the wrong encoding before it reached the feed (the original characters are lost).
ENCODING_DAMAGE = "[\\ufffd]"
# Neither kind of character may appear in a string value. The JSON Schema pattern leaves out the tag
# characters: an ECMA-262 pattern without the ``u`` flag cannot name code points above U+FFFF (the suite
# checks them).
_BANNED = ("\\x00-\\x1f\\x7f-\\x9f" + INVISIBLE_CHARS[1:-1].replace("\\U000e0000-\\U000e007f", "")
           + ENCODING_DAMAGE[1:-1])
# Ids name files downstream (a traced fact's folder): no path separator, and not "." or "..".
PATH_SAFE_ID = r"^(?!\.\.?$)[^/\\]+$"
# Exactly one "{}" and no other brace, so ``prompt.format(subject)`` is safe and unambiguous.
ONE_SLOT = r"^[^{}]*\{\}[^{}]*$"


@dataclass(frozen=True)
class FeedPolicy:
    """Limits a feed must respect. Row-level violations quarantine the row; a feed whose invalid
    fraction exceeds ``max_invalid_fraction`` (or whose size/row count is out of range) fails whole."""

    max_invalid_fraction: float = 0.2
    min_rows: int = 1
    max_rows: int = 5000
    max_file_bytes: int = 10_000_000
    max_id_chars: int = 128
    max_subject_chars: int = 200
    max_prompt_chars: int = 300
    max_target_chars: int = 100
    max_text_chars: int = 200  # relation, source, observed_at
    max_list_items: int = 10
    max_list_item_chars: int = 300
    window_days: int = 30  # a fact changed back and forth within this many days is quarantined

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_invalid_fraction <= 1.0:
            raise ValueError(f"feeds.max_invalid_fraction must be in [0, 1], got {self.max_invalid_fraction}")
        if self.min_rows < 0 or self.max_rows < max(1, self.min_rows):
            raise ValueError(f"feeds: need 0 <= min_rows <= max_rows, got {self.min_rows}, {self.max_rows}")
        for f in fields(self):
            if f.name.startswith("max_") and f.name != "max_invalid_fraction" and getattr(self, f.name) < 1:
                raise ValueError(f"feeds.{f.name} must be >= 1, got {getattr(self, f.name)}")

    @classmethod
    def from_params(cls, params: dict[str, Any] | str | Path | None = None) -> FeedPolicy:
        """Build from the ``feeds:`` block of params.yaml (a path or the parsed dict); unknown keys are errors."""
        if params is None:
            return cls()
        if isinstance(params, (str, Path)):
            from kedit.params import load_params

            params = {"feeds": load_params(params).block("feeds")}
        block = params.get("feeds", params) if isinstance(params, dict) else None
        if not isinstance(block, dict):
            raise ValueError("feeds: expected a mapping of policy values")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(block) - known)
        if unknown:
            raise ValueError(f"feeds: unknown policy key(s) {unknown}; known: {sorted(known)}")
        return cls(**block)

    def max_chars(self, column: str) -> int:
        return {"id": self.max_id_chars, "subject": self.max_subject_chars, "prompt": self.max_prompt_chars,
                "target_new": self.max_target_chars, "target_true": self.max_target_chars}.get(
                    column, self.max_text_chars)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _string(max_len: int, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_len,
            "pattern": f"^[^{_BANNED}]*[^\\s{_BANNED}][^{_BANNED}]*$", **extra}


def list_schema(policy: FeedPolicy) -> dict[str, Any]:
    """Schema of ``paraphrases`` / ``neighbors``: a short list of short, clean, non-blank strings."""
    return {"type": "array", "maxItems": policy.max_list_items, "items": _string(policy.max_list_item_chars)}


def feed_schema(policy: FeedPolicy | None = None) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of one feed row under ``policy`` (default limits if None)."""
    p = policy or FeedPolicy()
    props: dict[str, Any] = {
        "id": {"allOf": [_string(p.max_id_chars), {"pattern": PATH_SAFE_ID}],
               "description": "Unique id of the fact change within the feed (no '/' or '\\', not '.' or '..')"},
        "subject": _string(p.max_subject_chars, description="Entity whose fact changes, e.g. 'Eiffel Tower'"),
        "prompt": _string(p.max_prompt_chars, description="Template with exactly one '{}' for the subject"),
        "target_new": _string(p.max_target_chars, description="New object, no leading space"),
        "target_true": {"anyOf": [_string(p.max_target_chars), {"type": "null"}],
                        "description": "Current (old) object, optional; must differ from target_new"},
        "relation": {"anyOf": [_string(p.max_text_chars), {"type": "null"}],
                     "description": "Relation id or name, optional (e.g. 'P36' or 'capital')"},
        "paraphrases": {"anyOf": [list_schema(p), {"type": "null"}],
                        "description": "Other phrasings of the fact (full text, subject included)"},
        "neighbors": {"anyOf": [list_schema(p), {"type": "null"}],
                      "description": "Prompts about other subjects whose answers must not change"},
        "source": _string(p.max_text_chars, description="Where the change came from"),
        "observed_at": _string(p.max_text_chars, format="date-time",
                               description="ISO 8601 time the change was observed; not in the future"),
    }
    props["prompt"]["pattern"] = f"^[^{{}}{_BANNED}]*\\{{\\}}[^{{}}{_BANNED}]*$"
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://kedit.dev/schemas/feed-row.json",
        "title": "kedit fact-change feed row",
        "description": "One fact change per row of a daily feed (feeds/YYYY-MM-DD.jsonl, .csv or .parquet).",
        "type": "object",
        "required": list(REQUIRED_FIELDS),
        "properties": props,
        "additionalProperties": True,
    }


def shipped_schema() -> dict[str, Any]:
    """The JSON Schema file shipped with the package (default policy)."""
    return json.loads(resources.files("kedit").joinpath("data", "feed.schema.json").read_text(encoding="utf-8"))
