"""The Great Expectations suite for a feed, run in an ephemeral context (no files, progress bars off).

Each expectation carries a short ``check`` name and a human message in its ``meta``; row-level
failures map back to DataFrame positions (``unexpected_index_list``), which become the quarantine
reasons. A few checks need a value GX cannot compute from one column (does ``observed_at`` parse?
is a list column a list of clean strings?), so :func:`build_frame` adds helper columns (prefixed
``_``) and the suite checks those. GX is imported inside :func:`run_suite` only (~2.5 s).
"""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kedit.feeds.schema import (
    CONTROL_CHARS,
    ENCODING_DAMAGE,
    FEED_FIELDS,
    INVISIBLE_CHARS,
    LIST_FIELDS,
    ONE_SLOT,
    PATH_SAFE_ID,
    REQUIRED_FIELDS,
    STRING_FIELDS,
    FeedPolicy,
    list_schema,
)

ROW, TABLE, UNIQUE = "row", "table", "unique"  # how a failure is handled (UNIQUE: resolved by dedup)


@dataclass
class CheckResult:
    """Outcome of one expectation on one feed."""

    check: str
    expectation: str
    message: str
    kind: str
    success: bool
    unexpected_rows: list[int] = field(default_factory=list)  # 0-based positions in the feed
    observed: Any = None
    error: str | None = None
    row_messages: dict[int, str] = field(default_factory=dict)  # position -> message naming the culprit


@dataclass
class SuiteOutcome:
    results: list[CheckResult]
    success: bool
    statistics: dict[str, Any]

    def row_reasons(self, n_rows: int) -> list[list[str]]:
        """Per row, the ``"check: message"`` reasons of failed row-level checks (uniqueness excluded)."""
        reasons: list[list[str]] = [[] for _ in range(n_rows)]
        for r in self.results:
            if r.kind == ROW:
                for i in r.unexpected_rows:
                    reasons[i].append(f"{r.check}: {r.row_messages.get(i, r.message)}")
        return reasons

    def table_failures(self) -> list[str]:
        return [f"{r.check}: {r.message}" + (f" (observed {r.observed})" if r.observed is not None else "")
                + (f" [error: {r.error}]" if r.error else "")
                for r in self.results if r.kind == TABLE and not r.success or r.error]


def parse_time(value: Any) -> datetime | None:
    """ISO 8601 string -> aware UTC datetime (naive times are taken as UTC); None if it does not parse."""
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value.strip())
        return (dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt).astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: an offset takes it outside years 1-9999 in UTC
        return None


# C0/C1 controls have no Unicode name; these are the ones a sloppy producer actually sends.
_CONTROL_NAMES = {0x00: "NULL", 0x09: "CHARACTER TABULATION", 0x0A: "LINE FEED", 0x0D: "CARRIAGE RETURN",
                  0x1B: "ESCAPE", 0x7F: "DELETE", 0x85: "NEXT LINE"}


def char_name(ch: str) -> str:
    """``U+202E RIGHT-TO-LEFT OVERRIDE``: the code point and its name, so an invisible culprit can be found."""
    cp = ord(ch)
    return f"U+{cp:04X} " + (unicodedata.name(ch, "") or _CONTROL_NAMES.get(cp, "(control character)"))


def describe_chars(value: Any, label: str, pattern: re.Pattern[str], limit: int = 3) -> str | None:
    """``label contains U+.... NAME at position N[, ...]`` for the characters of ``value`` matching
    ``pattern`` (positions 1-based, in characters); None if there are none or ``value`` is not a string."""
    if not isinstance(value, str):
        return None
    hits = [(m.start() + 1, m.group()) for m in pattern.finditer(value)]
    if not hits:
        return None
    named = ", ".join(f"{char_name(ch)} at position {pos}" for pos, ch in hits[:limit])
    more = f" (and {len(hits) - limit} more)" if len(hits) > limit else ""
    return f"{label} contains {named}{more}"


def describe_list_chars(value: Any, label: str, pattern: re.Pattern[str]) -> str | None:
    """Like :func:`describe_chars` for the first item of a list column that holds a matching character."""
    if not isinstance(value, list):
        return None
    return next((d for i, v in enumerate(value) if (d := describe_chars(v, f"{label}[{i}]", pattern))), None)


def _list_text(value: Any) -> str | None:
    """The string items of a list column joined by spaces, for a regex check over all of them."""
    return " ".join(v for v in value if isinstance(v, str)) if isinstance(value, list) else None


def build_frame(rows: list[dict[str, Any]]):
    """Object-dtype DataFrame of the feed columns (absent optional ones as nulls) plus helper columns."""
    import pandas as pd

    data: dict[str, list[Any]] = {c: [r.get(c) for r in rows] for c in FEED_FIELDS}
    data = {c: [None if isinstance(v, float) and math.isnan(v) else v for v in vals] for c, vals in data.items()}
    times = [parse_time(v) for v in data["observed_at"]]
    data["_observed_at_valid"] = [None if v is None else t is not None for v, t in zip(data["observed_at"], times)]
    data["_observed_at_epoch"] = [t.timestamp() if t else float("nan") for t in times]
    for c in LIST_FIELDS:
        data[f"_{c}_json"] = [None if v is None else json.dumps(v) for v in data[c]]
        data[f"_{c}_text"] = [_list_text(v) for v in data[c]]
    df = pd.DataFrame({k: pd.Series(v, dtype=object) for k, v in data.items()})
    df["_observed_at_epoch"] = df["_observed_at_epoch"].astype(float)
    return df


def expectation_specs(policy: FeedPolicy, now: datetime) -> list[tuple[str, str, str, str, dict[str, Any]]]:
    """(check, message, kind, GX expectation class name, kwargs) for every expectation in the suite."""
    specs: list[tuple[str, str, str, str, dict[str, Any]]] = [
        ("columns_present", f"required columns {list(REQUIRED_FIELDS)} present", TABLE,
         "ExpectTableColumnsToMatchSet", {"column_set": list(REQUIRED_FIELDS), "exact_match": False}),
        ("row_count", f"row count within [{policy.min_rows}, {policy.max_rows}]", TABLE,
         "ExpectTableRowCountToBeBetween", {"min_value": policy.min_rows, "max_value": policy.max_rows}),
    ]
    for c in REQUIRED_FIELDS:
        specs.append((f"not_null:{c}", f"{c} is missing", ROW, "ExpectColumnValuesToNotBeNull", {"column": c}))
    for c in STRING_FIELDS:
        n = policy.max_chars(c)
        specs += [
            (f"is_string:{c}", f"{c} must be a string", ROW, "ExpectColumnValuesToBeOfType",
             {"column": c, "type_": "str"}),
            (f"length:{c}", f"{c} must have 1 to {n} characters", ROW, "ExpectColumnValueLengthsToBeBetween",
             {"column": c, "min_value": 1, "max_value": n}),
            (f"not_blank:{c}", f"{c} must not be blank", ROW, "ExpectColumnValuesToMatchRegex",
             {"column": c, "regex": r"\S"}),
            (f"no_control_chars:{c}", f"{c} contains a control character", ROW,
             "ExpectColumnValuesToNotMatchRegex", {"column": c, "regex": CONTROL_CHARS}),
            (f"invisible_chars:{c}", f"{c} contains an invisible (bidi or zero-width) character", ROW,
             "ExpectColumnValuesToNotMatchRegex", {"column": c, "regex": INVISIBLE_CHARS}),
            (f"encoding_damage:{c}", f"{c} contains U+FFFD (text decoded with the wrong encoding upstream)", ROW,
             "ExpectColumnValuesToNotMatchRegex", {"column": c, "regex": ENCODING_DAMAGE}),
        ]
    specs += [
        ("id_path_safe", "id must not contain '/' or '\\' or be '.' or '..' (ids name files downstream)", ROW,
         "ExpectColumnValuesToMatchRegex", {"column": "id", "regex": PATH_SAFE_ID}),
        ("prompt_one_slot", "prompt must contain exactly one '{}' and no other braces", ROW,
         "ExpectColumnValuesToMatchRegex", {"column": "prompt", "regex": ONE_SLOT}),
        ("targets_differ", "target_new equals target_true (not a change)", ROW,
         "ExpectSelectColumnValuesToBeUniqueWithinRecord",
         {"column_list": ["target_new", "target_true"], "ignore_row_if": "any_value_is_missing"}),
        ("observed_at_iso8601", "observed_at is not an ISO 8601 timestamp", ROW,
         "ExpectColumnValuesToBeInSet", {"column": "_observed_at_valid", "value_set": [True]}),
        ("observed_at_not_future", f"observed_at is in the future (after {now.isoformat()})", ROW,
         "ExpectColumnValuesToBeBetween", {"column": "_observed_at_epoch", "max_value": now.timestamp()}),
        ("id_unique", "id is not unique within the feed", UNIQUE,
         "ExpectColumnValuesToBeUnique", {"column": "id"}),
        ("subject_prompt_unique", "(subject, prompt) is not unique within the feed", UNIQUE,
         "ExpectCompoundColumnsToBeUnique", {"column_list": ["subject", "prompt"]}),
    ]
    ls = list_schema(policy)
    for c in LIST_FIELDS:
        specs.append((f"list:{c}", f"{c} must be a list of at most {policy.max_list_items} non-blank strings of "
                      f"at most {policy.max_list_item_chars} characters without control characters", ROW,
                      "ExpectColumnValuesToMatchJsonSchema", {"column": f"_{c}_json", "json_schema": ls}))
        specs.append((f"invisible_chars:{c}", f"an item of {c} contains an invisible (bidi or zero-width) "
                      "character", ROW, "ExpectColumnValuesToNotMatchRegex",
                      {"column": f"_{c}_text", "regex": INVISIBLE_CHARS}))
        specs.append((f"encoding_damage:{c}", f"an item of {c} contains U+FFFD (text decoded with the wrong "
                      "encoding upstream)", ROW, "ExpectColumnValuesToNotMatchRegex",
                      {"column": f"_{c}_text", "regex": ENCODING_DAMAGE}))
    return specs


_CHAR_CHECKS = {"no_control_chars": (re.compile(CONTROL_CHARS), ""),
                "invisible_chars": (re.compile(INVISIBLE_CHARS), ""),
                "encoding_damage": (re.compile(ENCODING_DAMAGE), " (text decoded with the wrong encoding upstream)")}


def row_message(check: str, value: Any) -> str | None:
    """A failing row's own message for checks about characters: which code point, where (else None)."""
    kind, _, column = check.partition(":")
    if kind not in _CHAR_CHECKS:
        return None
    pattern, why = _CHAR_CHECKS[kind]
    found = (describe_list_chars if column in LIST_FIELDS else describe_chars)(value, column, pattern)
    return found + why if found else None


def _positions(result: dict[str, Any], index: list[Any]) -> list[int]:
    pos = {v: i for i, v in enumerate(index)}
    return sorted({pos[i] for i in result.get("unexpected_index_list") or [] if i in pos})


def run_suite(rows: list[dict[str, Any]], policy: FeedPolicy, now: datetime | None = None) -> SuiteOutcome:
    """Validate ``rows`` with the GX suite; every expectation is reported, failures with their rows."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX logs an INFO line per ephemeral context ("Created temporary directory ..."); keep CLI output clean.
    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)
    now = now or datetime.now(UTC)
    df = build_frame(rows)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch_def = (ctx.data_sources.add_pandas(name="feeds").add_dataframe_asset(name="daily")
                 .add_batch_definition_whole_dataframe("all_rows"))
    suite = gx.ExpectationSuite(name="fact_change_feed")
    specs = {}
    for check, message, kind, cls, kwargs in expectation_specs(policy, now):
        suite.add_expectation(getattr(gxe, cls)(**kwargs, meta={"check": check}))
        specs[check] = (message, kind)
    suite = ctx.suites.add(suite)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="feed", data=batch_def, suite=suite))
    res = vd.run(batch_parameters={"dataframe": df}, result_format={"result_format": "COMPLETE"})
    index = list(df.index)
    results = []
    for r in res.results:
        check = (r.expectation_config.meta or {})["check"]
        message, kind = specs[check]
        exc = r.exception_info or {}
        err = exc.get("exception_message") if exc.get("raised_exception") else None
        rows_failed = _positions(r.result or {}, index)
        column = check.partition(":")[2]
        detail = {i: m for i in rows_failed if column in df.columns
                  and (m := row_message(check, df[column].iloc[i])) is not None}
        results.append(CheckResult(check, r.expectation_config.type, message, kind, bool(r.success),
                                   rows_failed, (r.result or {}).get("observed_value"), err, detail))
    order = list(specs)
    results.sort(key=lambda x: order.index(x.check))
    return SuiteOutcome(results, bool(res.success), dict(res.statistics))
