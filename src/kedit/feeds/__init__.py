"""Daily fact-change feeds: read, validate (Great Expectations), quarantine, normalise, deduplicate.

GX is imported lazily (about 2.5 s), only when a feed is actually validated.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ingest_for_champion": "champion",
    "IngestResult": "ingest", "ingest_feed": "ingest", "to_edit_requests": "ingest", "write_report": "ingest",
    "FeedFormatError": "reader", "read_feed": "reader",
    "FEED_FIELDS": "schema", "REQUIRED_FIELDS": "schema", "FeedPolicy": "schema", "feed_schema": "schema",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"kedit.feeds.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'kedit.feeds' has no attribute {name!r}")
