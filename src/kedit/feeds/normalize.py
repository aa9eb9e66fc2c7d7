"""Canonical form of a valid feed row: NFC text, single spaces, no leading/trailing space on targets,
observed_at in UTC. Applied after validation, so every value here is already a clean string."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from kedit.feeds.expectations import parse_time
from kedit.feeds.schema import FEED_FIELDS, LIST_FIELDS

_WS = re.compile(r"\s+")


def normalize_text(value: str) -> str:
    """NFC, whitespace runs -> one space, stripped (so ' Paris' and 'Paris ' both become 'Paris')."""
    return _WS.sub(" ", unicodedata.normalize("NFC", value)).strip()


def normalize_list(values: list[str] | None) -> list[str]:
    """Normalised items, blanks and repeats removed, order kept."""
    out: list[str] = []
    for v in values or []:
        v = normalize_text(v)
        if v and v not in out:
            out.append(v)
    return out


def render(prompt: str, subject: str) -> str:
    """The prompt with the subject filled in (prompts hold exactly one '{}' and no other brace)."""
    return prompt.format(subject)


def normalize_row(row: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Return the canonical row (feed fields only) and any problems found while normalising."""
    out: dict[str, Any] = {}
    for c in FEED_FIELDS:
        v = row.get(c)
        if c in LIST_FIELDS:
            out[c] = normalize_list(v)
        else:
            out[c] = None if v is None else normalize_text(v)
    problems = []
    t = parse_time(out["observed_at"])
    if t is not None:
        out["observed_at"] = t.isoformat().replace("+00:00", "Z")
    if out["target_true"] is not None and out["target_new"] == out["target_true"]:
        problems.append("targets_differ: target_new equals target_true after normalisation (not a change)")
    text = render(out["prompt"], out["subject"])
    if out["subject"] not in text or not text.replace(out["subject"], "", 1).strip():
        problems.append(f"prompt_renders: prompt.format(subject) = {text!r} does not read as a prompt "
                        "about the subject")
    return out, problems
