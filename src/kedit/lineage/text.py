"""Free text in lineage records (``--by``, ``--comment``, ``--reason``): refused when it holds control
characters, and escaped wherever it is printed.

A name or reason is printed by ``kedit lineage log`` on an operator's terminal; an escape sequence in
it (``\\x1b]...``, a cursor move, a bidi override) could rewrite what the screen shows about who did
what. New records refuse such characters (the error names the field and the position); records
written before this check are shown with the characters escaped (``\\x1b``), never raw.
"""

from __future__ import annotations

import unicodedata

# Bidirectional overrides and isolates: not control characters (category Cf), but they reorder text.
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


def _unsafe(ch: str, allow_newlines: bool) -> bool:
    if allow_newlines and ch in "\n\t":
        return False
    return unicodedata.category(ch) == "Cc" or ch in _BIDI


def check_text(field: str, value: str | None, allow_newlines: bool = False) -> None:
    """Raise ValueError naming ``field`` and the position of the first control character in ``value``."""
    if not value:
        return
    for i, ch in enumerate(str(value)):
        if _unsafe(ch, allow_newlines):
            raise ValueError(f"{field}: control character {ch.encode('unicode_escape').decode()} at position {i} "
                             f"of '{escape_text(str(value))}'; lineage records take printable text only"
                             + (" (newlines and tabs allowed)" if allow_newlines else ""))


def escape_text(value: object) -> str:
    """``value`` as text with every control / bidi character written as its escape (``\\x1b``, ``\\u202e``)."""
    s = "" if value is None else str(value)
    if not any(_unsafe(ch, False) for ch in s):
        return s
    return "".join(ch.encode("unicode_escape").decode() if _unsafe(ch, False) else ch for ch in s)
