"""`kedit bench refresh`: nightly refreshes of N facts each, end to end, timed step by step.

The same steps the nightly flow runs (:mod:`kedit.refresh`: ingest -> trace -> edit -> gate ->
register -> decide), called in this process without a Prefect server, on a fresh workspace whose
model is linked from an already imported one (importing the model is not part of a night). Key
statistics are computed only when the configured editor reads them, and then count in the first
night's edit step. With ``nights`` > 1 each night applies the next N facts on top of the champion the
night before promoted: the first night also pays what a lineage does once (an editor's initial
state, e.g. memoir's background mean; the context prefixes), the later ones are the steady state.
``profile=True`` also writes a cProfile of each step (``<out>/night<k>-<step>.prof``) and lists its
most expensive calls.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from kedit.atomic import write_json_atomic, write_text_atomic
from kedit.workspace import Workspace

STEPS = ("ingest", "trace", "edit", "gate", "register", "decide")
FIRST_DAY = "2026-01-05"


def feed_day(night: int) -> str:
    """The feed date of night ``night`` (0-based): one day after the other from :data:`FIRST_DAY`."""
    from datetime import date, timedelta

    return (date.fromisoformat(FIRST_DAY) + timedelta(days=night)).isoformat()


@dataclass
class RefreshBenchConfig:
    """What one benchmarked refresh does. ``facts``: rows in the feed (the shipped 30-row sample feed
    first, then CounterFact records from ``data``); ``params``: the params.yaml the workspace gets
    (default: the project's); ``overrides``: ``block.key: value`` over it, e.g. ``{"refresh.method": "rome"}``."""

    facts: int = 100
    nights: int = 1
    model: str = "smollm2-135m"
    data: str | None = None  # flat CounterFact JSON for rows past the sample feed
    params: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    profile: bool = False
    top: int = 25  # calls listed per step when profiling


@dataclass
class StepTime:
    night: int
    step: str
    seconds: float
    note: str = ""
    top_calls: str = ""  # the profile's most expensive calls (cumulative), when profiled


@dataclass
class RefreshBench:
    config: dict[str, Any]
    method: str
    reads_key_statistics: bool
    n_facts: int  # per night
    steps: list[StepTime]
    night_seconds: list[float]
    outcomes: list[str]
    state_ids: list[str | None]
    device: str
    load_average: list[float]  # the machine's 1/5/15-minute load when the run ended
    when: str

    def table(self) -> str:
        lines = [f"refresh of {self.n_facts} facts a night, editor {self.method} "
                 f"({'reads' if self.reads_key_statistics else 'reads no'} key statistics), {self.device}, "
                 f"load average {' '.join(f'{x:.1f}' for x in self.load_average)}",
                 f"{'night':5s} {'step':10s} {'seconds':>9s}  note"]
        for night, total in enumerate(self.night_seconds):
            lines += [f"{s.night + 1:<5d} {s.step:10s} {s.seconds:9.1f}  {s.note}" for s in self.steps
                      if s.night == night]
            lines.append(f"{night + 1:<5d} {'total':10s} {total:9.1f}  outcome: {self.outcomes[night]}")
        return "\n".join(lines)

    def step_names(self) -> list[str]:
        """The steps that ran, in the order the nights ran them."""
        return list(dict.fromkeys(s.step for s in self.steps))

    def seconds(self, night: int, step: str) -> float | None:
        """Seconds of ``step`` on ``night`` (0-based), None when it did not run that night."""
        got = [s.seconds for s in self.steps if s.night == night and s.step == step]
        return sum(got) if got else None

    def markdown(self) -> str:
        """``results.md``: one row per night, one column per step, the total, and what was run where."""
        names = self.step_names()
        cfg = self.config
        cmd = (f"kedit -w WS bench refresh --facts {cfg.get('facts')} --nights {cfg.get('nights')} "
               f"--model {cfg.get('model')}")
        lines = [f"# Nightly refresh: {self.n_facts} facts a night, editor {self.method}", "",
                 f"{self.when}, {self.device}, load average at the end "
                 f"{' '.join(f'{x:.2f}' for x in self.load_average)}; command `{cmd}`"
                 + (f" with {', '.join(f'{k}={v}' for k, v in sorted(cfg.get('overrides', {}).items()))}"
                    if cfg.get("overrides") else "") + ".", "",
                 "| night | " + " | ".join(names) + " | total | outcome |",
                 "|---|" + "---|" * (len(names) + 2)]
        for night, total in enumerate(self.night_seconds):
            cells = ["–" if (v := self.seconds(night, n)) is None else f"{v:.1f}" for n in names]
            lines.append(f"| {night + 1} | " + " | ".join(cells) + f" | **{total:.1f}** | {self.outcomes[night]} |")
        lines += ["", "Seconds per step. The first night also pays what a lineage does once (first imports, "
                  "the editor's initial state, the context prefixes, the base model's drift reference)."]
        notes = [f"- night {s.night + 1} {s.step}: {s.note}" for s in self.steps if s.note]
        if notes:
            lines += ["", *notes]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RefreshBench:
        """A bench read back from its ``results.json``."""
        fields_ = {k: v for k, v in data.items() if k != "steps"}
        return cls(steps=[StepTime(**s) for s in data["steps"]], **fields_)


def plot_refresh_bench(bench: RefreshBench, path: str | Path) -> None:
    """Stacked seconds per step for each night (``steps.png``), with a line at five minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kedit.console import save_fig

    names = bench.step_names()
    nights = list(range(len(bench.night_seconds)))
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    bottom = [0.0] * len(nights)
    for name in names:
        vals = [bench.seconds(n, name) or 0.0 for n in nights]
        ax.bar([n + 1 for n in nights], vals, bottom=bottom, label=name, width=0.6)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.axhline(300, color="black", linestyle="--", linewidth=1)
    ax.set_ylim(0, max([300.0, *bench.night_seconds]) * 1.15)
    ax.text(0.55, 306, "5 min", fontsize=8)
    ax.set_xticks([n + 1 for n in nights])
    ax.set_xlabel("night")
    ax.set_ylabel("seconds")
    ax.set_title(f"refresh of {bench.n_facts} facts a night ({bench.method}, {bench.device})", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    save_fig(fig, path)


def write_report(bench: RefreshBench, out: str | Path) -> list[Path]:
    """``results.json``, ``results.md`` and ``steps.png`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", asdict(bench))
    write_text_atomic(out / "results.md", bench.markdown())
    plot_refresh_bench(bench, out / "steps.png")
    return [out / "results.json", out / "results.md", out / "steps.png"]


def feed_rows(n: int, data: str | Path | None = None) -> list[dict[str, Any]]:
    """``n`` feed rows: the shipped sample feed's, then rows made from CounterFact records (distinct
    subjects, so no row flips another within the feed)."""
    from importlib import resources

    from kedit.feeds.make import counterfact_row

    if n < 1:
        raise ValueError(f"bench refresh: --facts must be at least 1, got {n}")
    text = resources.files("kedit").joinpath("data", "sample_feed.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()][:n]
    if len(rows) < n:
        from kedit.bench.lifelong import DEFAULT_DATA

        path = Path(data or DEFAULT_DATA)
        if not path.is_file():
            raise FileNotFoundError(f"bench refresh: {n} facts need CounterFact records past the "
                                    f"{len(rows)}-row sample feed, and {path} does not exist (give --data)")
        subjects = {r["subject"] for r in rows}
        for rec in json.loads(path.read_text(encoding="utf-8")):
            row = counterfact_row(rec, observed_at="2026-01-05T08:00:00Z", source="counterfact-bench")
            if row and row["subject"] not in subjects:
                subjects.add(row["subject"])
                rows.append(row)
                if len(rows) == n:
                    break
        if len(rows) < n:
            raise ValueError(f"bench refresh: {path} gives only {len(rows)} usable rows, {n} asked")
    return rows


def prepare_workspace(root: Path, source: Workspace, cfg: RefreshBenchConfig, project: Path) -> Workspace:
    """A fresh workspace at ``root``: the model linked from ``source`` (hard links; copies across
    devices), params.yaml with the overrides, today's feed. An existing ``root`` is replaced."""
    src = source.model_dir(cfg.model)
    if not (src / "kedit_manifest.json").is_file():
        raise FileNotFoundError(f"bench refresh: model {cfg.model!r} is not imported in {source.root} "
                                f"(run `kedit -w {source.root} model import {cfg.model}` first)")
    if root.exists():
        if not (root / ".kedit-bench").is_file():
            raise FileExistsError(f"bench refresh: {root} exists and is not a bench workspace; give another --dir")
        shutil.rmtree(root)
    ws = Workspace(root)
    dst = ws.model_dir(cfg.model)
    dst.mkdir(parents=True)
    (root / ".kedit-bench").write_text("made by kedit bench refresh; replaced on the next run\n")
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
    params_file = Path(cfg.params) if cfg.params else project / "params.yaml"
    params = yaml.safe_load(params_file.read_text(encoding="utf-8")) if params_file.is_file() else {}
    params.setdefault("model", {})["slug"] = cfg.model
    for key, value in cfg.overrides.items():
        block, _, name = key.partition(".")
        if not name:
            raise ValueError(f"bench refresh: override {key!r} must be BLOCK.KEY=VALUE, e.g. refresh.method=rome")
        params.setdefault(block, {})[name] = value
    write_text_atomic(root / "params.yaml", yaml.safe_dump(params, sort_keys=False))
    ws.feeds_dir.mkdir(parents=True, exist_ok=True)
    if cfg.nights < 1:
        raise ValueError(f"bench refresh: --nights must be at least 1, got {cfg.nights}")
    rows = feed_rows(cfg.facts * cfg.nights, cfg.data)
    for night in range(cfg.nights):
        part = rows[night * cfg.facts: (night + 1) * cfg.facts]
        write_text_atomic(ws.feeds_dir / f"{feed_day(night)}.jsonl", "".join(json.dumps(r) + "\n" for r in part))
    return ws


def _timed(night: int, step: str, fn: Callable[[], Any], out: Path, profile: bool, top: int,
           log: Callable[[str], None]) -> tuple[Any, StepTime]:
    log(f"night {night + 1} {step}: started")
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    try:
        res = fn()
    finally:
        if prof:
            prof.disable()
    took = time.perf_counter() - t0
    calls = ""
    if prof:
        prof.dump_stats(out / f"night{night + 1}-{step}.prof")
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
        calls = buf.getvalue()
        write_text_atomic(out / f"night{night + 1}-{step}.txt", calls)
    log(f"night {night + 1} {step}: {took:.1f} s")
    return res, StepTime(night, step, took, top_calls=calls)


def run_refresh_bench(ws_root: str | Path, source: Workspace, cfg: RefreshBenchConfig, out: str | Path,
                      log: Callable[[str], None] = lambda _m: None) -> RefreshBench:
    """Prepare the workspace, then run and time each step of one refresh (approved by ``kedit-bench``
    when its gate passes). Writes ``results.json``, ``results.md``, ``steps.png`` (and the profiles) to ``out``."""
    from kedit import refresh as R
    from kedit.console import device_str
    from kedit.params import ENV_VAR

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    project = Path(__file__).resolve().parents[3]
    ws = prepare_workspace(Path(ws_root).resolve(), source, cfg, project)
    old_env = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = str(ws.root / "params.yaml")  # every step reads the bench workspace's params
    times: list[StepTime] = []
    night_seconds: list[float] = []
    outcomes: list[str] = []
    state_ids: list[str | None] = []
    try:
        rcfg = R.RefreshConfig.from_params(workspace=ws)
        for night in range(cfg.nights):
            t0 = time.perf_counter()
            outcome, sid = _night(R, ws, rcfg, night, times, out, cfg, log)
            night_seconds.append(time.perf_counter() - t0)
            outcomes.append(outcome)
            state_ids.append(sid)
    finally:
        if old_env is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old_env
    import torch

    bench = RefreshBench(config=asdict(cfg), method=rcfg.method, reads_key_statistics=rcfg.reads_key_statistics,
                         n_facts=cfg.facts, steps=times, night_seconds=night_seconds, outcomes=outcomes,
                         state_ids=state_ids, device=device_str(torch.device(rcfg.device)),
                         load_average=[round(x, 2) for x in os.getloadavg()],
                         when=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    write_report(bench, out)
    return bench


def _night(R, ws: Workspace, rcfg, night: int, times: list[StepTime], out: Path, cfg: RefreshBenchConfig,
           log: Callable[[str], None]) -> tuple[str, str | None]:
    """One refresh, each step timed into ``times``; approved by ``kedit-bench`` when its gate passes.
    Returns the outcome and the candidate state."""
    def step(name: str, fn: Callable[[], Any]) -> Any:
        res, t = _timed(night, name, fn, out, cfg.profile, cfg.top, log)
        times.append(t)
        return res

    ing = step("ingest", lambda: R.ingest_step(ws, feed_day(night), rcfg))
    times[-1].note = f"{len(ing['accepted'])} accepted, counts {ing['counts']}"
    if not ing["passed"]:
        return "feed-rejected", None
    if not ing["accepted"]:
        return "nothing-to-apply", None
    tr = step("trace", lambda: R.trace_step(ws, rcfg, ing["accepted"], ing["refresh_key"]))
    times[-1].note = f"{len(tr['traced'])} fact(s) traced ({', '.join(rcfg.trace_kinds)})"
    ed = step("edit", lambda: R.edit_step(ws, rcfg, ing))
    sid = ed["state_id"]
    times[-1].note = (f"{ed['n_edits']} edits, {ed['seconds']:.1f} s in the editor; key statistics "
                      + ("read" if rcfg.reads_key_statistics else "not read: the editor needs none"))
    gate = step("gate", lambda: R.gate_step(ws, rcfg, ing, ed))
    failed = [c["name"] for c in gate["checks"] if not c["passed"]]
    times[-1].note = "passed" if gate["passed"] else f"failed: {', '.join(failed)}"
    if not gate["passed"]:
        step("decide", lambda: R.decide_step(ws, ing["refresh_key"], sid, False, "kedit-bench",
                                             "gate failed: " + ", ".join(failed)))
        return "gate-failed", sid
    step("register", lambda: R.register_step(ws, ing["refresh_key"], sid))
    res = step("decide", lambda: R.decide_step(ws, ing["refresh_key"], sid, True, "kedit-bench", "bench refresh"))
    return res["decision"], sid
