"""Cache policies of the nightly tasks: the key of a step is the content its result depends on (feed
sha256, champion, config; or the refresh key / state id derived from them) plus the task's source code.

The content part lets a suspended run that resumes from the top, or a re-run of the same feed, reuse
finished work instead of editing again. Prefect's ``INPUTS`` would not do: the inputs also carry the
workspace path and whole result records, so the same work under another path would miss the cache, and a
feed rewritten in place under the same name would hit it. The source part (Prefect's ``TASK_SOURCE``)
makes a changed task miss the cache instead of returning what the old code computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy

from kedit import refresh
from kedit.atomic import sha256_file, sha256_json
from kedit.workspace import Workspace


@dataclass
class ContentKey(CachePolicy):
    """Key from named values of the task inputs: ``fields`` are dotted paths, e.g. ``ingest.refresh_key``."""

    step: str = ""
    fields: tuple[str, ...] = ()

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str:
        return f"{self.step}-" + sha256_json([input_at(inputs, f, self.step) for f in self.fields])[:32]


@dataclass
class FeedKey(CachePolicy):
    """Key of feed ingestion: the feed file's bytes, the champion it is applied to, and the config.

    ``champion_of`` reads the current champion of a workspace (``"base"`` when none).
    """

    champion_of: Callable[[Workspace], str] | None = None

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str:
        if self.champion_of is None:
            raise ValueError("FeedKey needs champion_of")
        ws = Workspace.default(input_at(inputs, "workspace", "ingest"))
        path = refresh.resolve_feed(ws, input_at(inputs, "feed", "ingest"))
        return "ingest-" + sha256_json([sha256_file(path), self.champion_of(ws), input_at(inputs, "cfg", "ingest")])[:32]


def content_keyed(step: str, *fields: str) -> CachePolicy:
    """The policy of a step keyed by ``fields`` of its inputs, and by its source."""
    return ContentKey(step=step, fields=fields) + TASK_SOURCE


def feed_keyed(champion_of: Callable[[Workspace], str]) -> CachePolicy:
    return FeedKey(champion_of=champion_of) + TASK_SOURCE


def input_at(inputs: dict[str, Any], path: str, step: str) -> Any:
    """The value at a dotted path of the task inputs; a clear error when a record lacks it."""
    value: Any = inputs
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"cache key of {step!r}: the task inputs have no {path!r}")
        value = value[part]
    return value
