"""The prompt list shipped with kedit (``kedit/data/canary_prompts.txt``): general-knowledge prompts
the canary suite and the fluency gate ask, and that T-Patcher's general memory reads.

A base module (package data only), so an editor and the evaluation read the same list without
the editor importing the evaluation layer."""

from __future__ import annotations

from importlib import resources

SHIPPED = "canary_prompts.txt"


def shipped_prompts() -> list[str]:
    """The prompt list shipped with kedit (``kedit/data/canary_prompts.txt``), comments dropped."""
    text = resources.files("kedit").joinpath("data", SHIPPED).read_text(encoding="utf-8")
    return parse_prompt_lines(text)


def parse_prompt_lines(text: str) -> list[str]:
    out, seen = [], set()
    for line in text.splitlines():
        p = line.strip()
        if p and not p.startswith("#") and p not in seen:
            seen.add(p)
            out.append(p)
    return out
