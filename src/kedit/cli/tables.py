"""Tables the CLI prints, rendered by ``rich.table`` (columns sized to their contents, no hand-padded
format strings). Plain text when piped: no colour, no box, a width that does not wrap long cells."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def print_table(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]], title: str | None = None,
                header: bool = True, indent: int = 0) -> None:
    """``columns``: (heading, justify) pairs (``left`` / ``right``); one printed line per row."""
    import sys

    from rich.console import Console
    from rich.markup import escape
    from rich.padding import Padding
    from rich.table import Table

    table = Table(box=None, show_header=header, header_style="bold", title=title, title_justify="left",
                  padding=(0, 1, 0, 0), pad_edge=False, show_edge=False)
    for heading, justify in columns:
        table.add_column(heading, justify=justify, no_wrap=True)
    for row in rows:
        table.add_row(*[escape(str(c)) for c in row])
    tty = sys.stdout.isatty()
    Console(width=None if tty else 10_000, no_color=not tty, highlight=False).print(
        Padding(table, (0, 0, 0, indent), expand=False) if indent else table, crop=False)


def print_gate_checks(checks: Sequence[dict[str, Any]]) -> None:
    """A gate's checks: verdict, name, value, threshold, detail (``kedit gate``, ``kedit lineage gate``)."""
    rows = []
    for c in checks:
        verdict = "skip" if c.get("skipped") else ("PASS" if c.get("passed") else "FAIL")
        op = ">=" if c.get("direction") == "min" else "<="
        val = "-" if c.get("value") is None else f"{c['value']:.4g}"
        thr = "-" if c.get("threshold") is None else f"{op} {c['threshold']:g}"
        rows.append([verdict, c["name"], val, thr, c.get("detail", "")])
    print_table([("", "left"), ("check", "left"), ("value", "right"), ("threshold", "right"), ("detail", "left")],
                rows, indent=2)
