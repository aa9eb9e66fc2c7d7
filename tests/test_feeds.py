"""Feeds: GX validation, row-level quarantine with reasons, thresholds, malformed files, dedup, idempotency."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kedit.feeds.dedup import flip_flops, in_feed_conflicts
from kedit.feeds.ingest import ingest_feed, to_edit_requests
from kedit.feeds.normalize import normalize_row, normalize_text
from kedit.feeds.reader import FeedFormatError, read_feed
from kedit.feeds.schema import FeedPolicy, feed_schema, shipped_schema

DATA = Path(__file__).parent / "data" / "feeds"
NOW = datetime(2026, 1, 1, tzinfo=UTC)
LENIENT = FeedPolicy(max_invalid_fraction=0.5)


def _copy(name: str, tmp: Path, as_name: str = "2025-01-02") -> Path:
    dest = tmp / "feeds" / f"{as_name}{Path(name).suffix}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / name, dest)
    return dest


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    path = _copy("mixed.jsonl", tmp_path_factory.mktemp("mixed"))
    return path, ingest_feed(path, LENIENT, now=NOW)


# id of the row in mixed.jsonl -> the check that must quarantine it
EXPECTED_REASON = {
    "g101": "not_null:target_new", "g102": "prompt_one_slot", "g103": "prompt_one_slot",
    "g104": "no_control_chars:subject", "g105": "targets_differ", "g106": "observed_at_iso8601",
    "g107": "observed_at_not_future", "g108": "length:target_new", "g109": "is_string:subject",
    "g110": "list:paraphrases", "g111": "not_blank:subject", "g112": "contradictory", "g113": "contradictory",
}


def test_each_bad_row_quarantined_with_its_reason(mixed):
    path, res = mixed
    assert res.passed, res.message
    by_id: dict[str, list[list[str]]] = {}
    for q in res.quarantined:
        by_id.setdefault(q.row["id"], []).append(q.reasons)
    for rid, check in EXPECTED_REASON.items():
        assert rid in by_id, f"{rid} not quarantined"
        assert any(r.startswith(check + ":") for r in by_id[rid][0]), (rid, by_id[rid])
    # id "g2" reused by a different row on line 34: the first keeps it, the later one is quarantined
    assert by_id["g2"] == [["duplicate_id: id 'g2' was first used on line 2 (kept); this row differs from it"]]
    assert res.counts["quarantined"] == len(EXPECTED_REASON) + 1 == len(res.quarantined)
    # the duplicate of g3's fact is dropped, not quarantined; all other good rows are accepted
    assert [(d.row["id"], d.reason) for d in res.dropped] == [
        ("g3-again", "duplicate: same fact and target as line 3 (id 'g3')")]
    assert sorted(res.accepted_ids) == sorted([f"g{i}" for i in range(1, 21)])
    assert res.counts["rows"] == 35 and res.counts["accepted"] == 20
    # quarantine file beside the feed, one JSON line per quarantined row with line number and reasons
    qfile = path.parent / "quarantine" / "2025-01-02.jsonl"
    assert res.quarantine_path == str(qfile)
    lines = [json.loads(x) for x in qfile.read_text().splitlines()]
    assert len(lines) == len(res.quarantined) and all(x["reasons"] and (x["line"] >= 21 or x["id"] == "g2") for x in lines)
    report = Path(res.report_path).read_text()
    assert res.report_path == str(path.parent / "reports" / "2025-01-02.md")
    assert "ACCEPTED" in report and "prompt_one_slot" in report and "g3-again" in report
    # every GX expectation is reported; the uniqueness ones failed
    checks = {c["check"]: c for c in res.checks}
    assert not checks["subject_prompt_unique"]["success"] and not checks["id_unique"]["success"]
    assert checks["row_count"]["success"]


def test_accepted_rows_are_normalised_edit_requests(mixed):
    reqs = to_edit_requests(mixed[1].accepted)
    assert reqs[0].id == "g1" and reqs[0].text == "Subject 1 is located in" and reqs[0].target_new == "Place 1"
    assert reqs[0].paraphrases == ["Subject 1 can be found in"] and reqs[0].neighbors == ["Paris is located in"]


def test_invalid_fraction_over_threshold_fails_whole_feed(tmp_path):
    path = _copy("mixed.jsonl", tmp_path)
    res = ingest_feed(path, FeedPolicy(max_invalid_fraction=0.2), now=NOW)
    assert not res.passed and res.accepted == [] and res.counts["held_back"] == 20
    assert "max_invalid_fraction" in res.message and "14 of 35" in res.message
    assert "REJECTED" in Path(res.report_path).read_text()
    assert Path(res.quarantine_path).exists()  # the bad rows are still quarantined for inspection


def test_row_count_limit_fails_whole_feed(tmp_path):
    with pytest.raises(FeedFormatError, match=r"more than 3 rows, over the limit of 3 \(feeds.max_rows\)"):
        ingest_feed(_copy("good.jsonl", tmp_path), FeedPolicy(max_rows=3), now=NOW, record=False)


def _lines_then_fail(first: list[str]):
    """The given lines, then an error if the reader asks for more: proves it stopped at the limit."""
    yield from first
    raise AssertionError("read past the row limit")


def test_jsonl_row_limit_stops_reading_at_the_limit(tmp_path):
    from kedit.feeds.reader import read_jsonl_rows

    lines = [json.dumps(_good(i)) for i in range(4)]
    lines.insert(2, "")  # a blank line is no row
    with pytest.raises(FeedFormatError) as err:
        read_jsonl_rows(tmp_path / "big.jsonl", _lines_then_fail(lines), max_rows=3)
    assert err.value.line == 5 and "stopped reading at row 4" in str(err.value)
    assert f"{tmp_path / 'big.jsonl'}:5: file holds more than 3 rows" in str(err.value)
    rows, _ = read_jsonl_rows(tmp_path / "ok.jsonl", iter(lines), max_rows=4)  # at the limit: read whole
    assert len(rows) == 4


def test_csv_row_limit_stops_reading_at_the_limit(tmp_path):
    from kedit.feeds.reader import read_csv_rows

    header = "id,subject,prompt,target_new,source,observed_at\n"
    lines = [header] + [f"h{i},S {i},{{}} is in,P {i},t,2025-01-02T03:04:05Z\n" for i in range(3)]
    with pytest.raises(FeedFormatError, match="more than 2 rows") as err:
        read_csv_rows(tmp_path / "big.csv", _lines_then_fail(lines), max_rows=2)
    assert err.value.line == 4
    rows, _, cols = read_csv_rows(tmp_path / "ok.csv", iter(lines), max_rows=3)
    assert len(rows) == 3 and cols[0] == "id"


@pytest.mark.parametrize("name,policy,line,words", [
    ("bad_json.jsonl", None, 3, "invalid JSON"),
    ("latin1.jsonl", None, 2, "not valid UTF-8"),
    ("missing_column.jsonl", None, None, "missing required column(s) ['target_new']"),
    ("missing_column.csv", None, 1, "missing required column(s) ['observed_at']"),
    ("empty.jsonl", None, None, "file is empty"),
    ("good.jsonl", FeedPolicy(max_file_bytes=100), None, "over the limit of 100"),
])
def test_malformed_files_name_file_line_and_problem(name, policy, line, words, tmp_path):
    path = _copy(name, tmp_path)
    with pytest.raises(FeedFormatError) as ei:
        ingest_feed(path, policy, now=NOW)
    err = ei.value
    assert err.path == str(path) and err.line == line and words in str(err)
    assert str(err).startswith(f"{path}:{line}:" if line else f"{path}:")
    assert not (path.parent / "reports").exists()  # nothing written, nothing applied


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(FeedFormatError, match="unknown feed format"):
        read_feed(tmp_path / "f.txt")
    with pytest.raises(FileNotFoundError):
        read_feed(tmp_path / "nope.jsonl")


def test_reingest_is_idempotent_and_never_double_applies(tmp_path):
    path = _copy("good.jsonl", tmp_path)
    seen = []

    def predicts(rows):
        seen.append(len(rows))
        return [r["id"] == "g2" for r in rows]

    first = ingest_feed(path, now=NOW, predicts_target=predicts)
    assert first.passed and first.accepted_ids == ["g1", "g3", "g4", "g5"] and seen == [5]
    assert [(d.row["id"], d.reason.split(":")[0]) for d in first.dropped] == [("g2", "no_op")]
    ledger = json.loads((path.parent / ".ingested.json").read_text())
    assert list(ledger) == [first.sha256] and ledger[first.sha256]["accepted_ids"] == first.accepted_ids
    report1 = Path(first.report_path).read_text()

    again = ingest_feed(path, now=NOW, predicts_target=predicts)
    assert again.previously_ingested and again.sha256 == first.sha256
    assert again.accepted == first.accepted and again.counts == first.counts
    assert "already ingested" in again.notes[-1]
    assert Path(again.report_path).read_text().replace(f"- note: {again.notes[-1]}\n", "") == report1

    # after the accepted facts were applied, a re-ingest yields nothing to apply
    applied = {(r["subject"], r["prompt"], " " + r["target_new"]) for r in first.accepted}
    after = ingest_feed(path, now=NOW, applied_facts=applied, predicts_target=predicts)
    assert after.accepted == [] and after.counts["drop_reasons"] == {"already_applied": 4, "no_op": 1}


def test_changed_file_under_same_name_is_noted(tmp_path):
    path = _copy("good.jsonl", tmp_path)
    first = ingest_feed(path, now=NOW)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n")
    second = ingest_feed(path, now=NOW)
    assert second.sha256 != first.sha256 and not second.previously_ingested
    assert any("different content" in n for n in second.notes)


def test_csv_and_parquet_read_like_jsonl(tmp_path):
    import pandas as pd

    csv_rows = read_feed(DATA / "good.csv").rows
    jsonl_rows = read_feed(DATA / "good.jsonl").rows
    assert csv_rows == jsonl_rows[:4]
    pq = tmp_path / "2025-01-02.parquet"
    pd.DataFrame(jsonl_rows).to_parquet(pq)
    feed = read_feed(pq)
    assert feed.format == "parquet" and feed.rows == jsonl_rows and feed.lines == [1, 2, 3, 4, 5]


def test_flip_flop_within_window_is_quarantined():
    row = normalize_row({"id": "a", "subject": "Paris", "prompt": "{} is the capital of", "target_new": "France",
                         "target_true": "Italy", "source": "t", "observed_at": "2025-03-10T00:00:00Z"})[0]
    history = [{"subject": "Paris", "prompt": "{} is the capital of", "target_new": "Italy",
                "target_true": "France", "observed_at": "2025-03-01"}]
    assert "flip_flop" in flip_flops([row], history, window_days=30)[0]
    assert flip_flops([row], history, window_days=5) == {}  # outside the window: a legitimate change
    same = [{**history[0], "target_new": "France"}]
    assert flip_flops([row], same, window_days=30) == {}  # re-stating the current value is not a flip
    early = {**row, "observed_at": "0001-01-05T00:00:00Z"}  # valid, but 30 days before it is not a date
    assert "flip_flop" in flip_flops([early], [{**history[0], "observed_at": "0001-01-01"}], window_days=30)[0]


def test_in_feed_duplicates_and_contradictions():
    base = {"id": "a", "subject": "S", "prompt": "{} is", "target_new": "X"}
    rows = [base, {**base, "id": "b"}, {**base, "id": "c", "subject": "T"}, {**base, "id": "d", "subject": "T",
                                                                                "target_new": "Y"}, dict(base)]
    quarantine, drop = in_feed_conflicts(rows)
    assert set(quarantine) == {2, 3} and all("contradictory" in v for v in quarantine.values())
    assert set(drop) == {1, 4}  # b and the last row: same fact and target as a


def test_normalisation():
    assert normalize_text("  Paris \t\n ") == "Paris" and normalize_text("New   York") == "New York"
    row, problems = normalize_row({"id": " x ", "subject": "Eiffel  Tower", "prompt": "{}  is in ",
                                   "target_new": " Rome", "target_true": "Rome ", "source": "s",
                                   "observed_at": "2025-01-02T05:00:00+02:00", "paraphrases": ["a", " a ", ""]})
    assert row["target_new"] == "Rome" and row["prompt"] == "{} is in" and row["subject"] == "Eiffel Tower"
    assert row["observed_at"] == "2025-01-02T03:00:00Z" and row["paraphrases"] == ["a"] and row["neighbors"] == []
    assert problems and problems[0].startswith("targets_differ")


def test_shipped_schema_and_sample_feed(tmp_path):
    import jsonschema

    assert shipped_schema() == feed_schema()
    from importlib import resources

    sample = resources.files("kedit").joinpath("data", "sample_feed.jsonl")
    rows = [json.loads(x) for x in sample.read_text(encoding="utf-8").splitlines()]
    assert 20 <= len(rows) <= 40
    validator = jsonschema.Draft202012Validator(feed_schema())
    for r in rows:
        validator.validate(r)
        assert r["paraphrases"] and r["neighbors"]
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**rows[0], "prompt": "no slot"})
    dest = tmp_path / "sample.jsonl"
    dest.write_bytes(sample.read_bytes())
    res = ingest_feed(dest, now=NOW, record=False)
    assert res.passed and res.counts["accepted"] == len(rows)


def test_policy_from_params():
    repo_params = Path(__file__).parents[1] / "params.yaml"
    assert FeedPolicy.from_params(repo_params).max_invalid_fraction == FeedPolicy().max_invalid_fraction
    assert FeedPolicy.from_params({"feeds": {"max_rows": 7}}).max_rows == 7
    with pytest.raises(ValueError, match="unknown policy key"):
        FeedPolicy.from_params({"feeds": {"max_rowz": 7}})
    with pytest.raises(ValueError):
        FeedPolicy(max_invalid_fraction=1.5)


def test_feed_make_from_counterfact(tmp_path):
    from kedit.feeds.make import make_feeds

    recs = [{"case_id": i, "prompt": f"Subj{i} was born in", "subject": f"Subj{i}", "target_new": "Rome",
             "ground_truth": "Oslo", "rephrase_prompt": f"Intro.\nWhere was Subj{i} born? In",
             "locality_prompt": "Mozart was born in", "locality_ground_truth": "Salzburg"} for i in range(7)]
    recs.insert(2, {"case_id": 99, "prompt": "nobody here", "subject": "Ghost", "target_new": "A"})
    src = tmp_path / "cf.json"
    src.write_text(json.dumps(recs))
    from datetime import date

    s = make_feeds(src, tmp_path / "feeds", days=3, per_day=3, start=date(2025, 1, 1))
    assert [f.name for f in s.files] == ["2025-01-01.jsonl", "2025-01-02.jsonl", "2025-01-03.jsonl"]
    assert s.rows == 7 and s.skipped == 1
    first = [json.loads(x) for x in s.files[0].read_text().splitlines()]
    assert first[0]["prompt"] == "{} was born in" and first[0]["id"] == "cf-0" and first[0]["target_true"] == "Oslo"
    assert first[0]["paraphrases"] == ["Intro. Where was Subj0 born? In"]
    assert first[0]["neighbors"] == ["Mozart was born in"] and first[0]["observed_at"] == "2025-01-01T06:00:00Z"
    with pytest.raises(FileExistsError):
        make_feeds(src, tmp_path / "feeds", days=3, per_day=3, start=date(2025, 1, 1))


def test_cli_validate_exit_codes(tmp_path, capsys):
    from kedit.cli import main

    assert main(["feed", "validate", str(_copy("good.jsonl", tmp_path)), "--out", str(tmp_path / "o")]) == 0
    assert "ACCEPTED" in capsys.readouterr().out and (tmp_path / "o" / "reports" / "2025-01-02.md").exists()
    bad = _copy("bad_json.jsonl", tmp_path, "2025-01-03")
    assert main(["feed", "validate", str(bad)]) == 2
    assert f"{bad}:3: invalid JSON" in capsys.readouterr().err


# --- hostile or sloppy producers --------------------------------------------------------------------------
def _good(i: int, **kw) -> dict:
    return {"id": f"h{i}", "subject": f"Subject {i}", "prompt": "{} is located in", "target_new": f"Place {i}",
            "target_true": f"Home {i}", "source": "test", "observed_at": "2025-01-02T03:04:05Z", **kw}


def _write_jsonl(tmp: Path, rows: list, name: str = "2025-01-02.jsonl", sep: str = "\n") -> Path:
    """Rows (dicts, or raw text lines) as a JSONL file; non-ASCII characters written raw, not escaped."""
    path = tmp / "feeds" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_bytes((sep.join(lines) + sep).encode("utf-8"))
    return path


def _reasons(res) -> dict[str, list[str]]:
    return {q.row["id"]: q.reasons for q in res.quarantined}


def test_invisible_unicode_is_quarantined_with_the_code_point_named(tmp_path):
    rows = [_good(i) for i in range(1, 11)]
    rows[0]["subject"] = "Ab\u202ec"                      # RIGHT-TO-LEFT OVERRIDE at position 3
    rows[1]["target_new"] = "Pa\u200bris"                 # ZERO WIDTH SPACE
    rows[2]["prompt"] = "{} is\ufeff located in"          # BOM inside text
    rows[3]["source"] = "\u2066feed\u2069"                # isolates
    rows[4]["paraphrases"] = ["fine", "Subject\u200d 5 is in"]
    path = _write_jsonl(tmp_path, rows)
    res = ingest_feed(path, LENIENT, now=NOW, record=False)
    why = _reasons(res)
    assert set(why) == {"h1", "h2", "h3", "h4", "h5"}, why
    assert "invisible_chars:subject: subject contains U+202E RIGHT-TO-LEFT OVERRIDE at position 3" in why["h1"]
    assert any("target_new contains U+200B ZERO WIDTH SPACE at position 3" in r for r in why["h2"])
    assert any("prompt contains U+FEFF ZERO WIDTH NO-BREAK SPACE at position 6" in r for r in why["h3"])
    assert any("U+2066 LEFT-TO-RIGHT ISOLATE at position 1" in r and "U+2069 POP DIRECTIONAL ISOLATE" in r
               for r in why["h4"])
    assert any(r.startswith("invisible_chars:paraphrases: paraphrases[1] contains U+200D ZERO WIDTH JOINER "
                            "at position 8") for r in why["h5"]), why["h5"]
    assert res.counts["quarantine_reasons"]["invisible_chars"] == 5
    checks = {c["check"] for c in res.checks}
    assert {"invisible_chars:subject", "invisible_chars:paraphrases"} <= checks  # in the GX suite itself
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):  # the published schema says so too
        jsonschema.validate(rows[0], feed_schema())


def test_jsonl_splits_on_newline_only(tmp_path):
    rows = [_good(i) for i in range(1, 6)]
    rows[0]["subject"] = "Sub\u2028ject 1"               # raw LINE SEPARATOR inside a JSON string
    rows[1]["source"] = "para\u2029graph"                 # raw PARAGRAPH SEPARATOR
    rows[2]["relation"] = "next\x85line"                  # raw NEL (a C1 control character)
    path = _write_jsonl(tmp_path, rows)
    feed = read_feed(path)
    assert [r["id"] for r in feed.rows] == ["h1", "h2", "h3", "h4", "h5"] and feed.lines == [1, 2, 3, 4, 5]
    res = ingest_feed(path, LENIENT, now=NOW, record=False)
    assert res.passed and res.accepted_ids == ["h1", "h2", "h4", "h5"]
    assert res.accepted[0]["subject"] == "Sub ject 1" and res.accepted[1]["source"] == "para graph"
    assert [q.line for q in res.quarantined] == [3]
    assert any("relation contains U+0085" in r for r in res.quarantined[0].reasons), res.quarantined[0].reasons
    crlf = _write_jsonl(tmp_path, rows[3:], name="2025-01-03.jsonl", sep="\r\n")
    assert [r["id"] for r in read_feed(crlf).rows] == ["h4", "h5"] and read_feed(crlf).lines == [1, 2]


def test_every_bad_jsonl_line_is_reported(tmp_path):
    good = [_good(i) for i in range(1, 6)]
    path = _write_jsonl(tmp_path, [good[0], "[1, 2]", good[1], '{"id": "x", oops}', "", "42", good[2], '"s"'])
    with pytest.raises(FeedFormatError) as ei:
        read_feed(path)
    err = ei.value
    assert err.line == 2 and [n for n, _ in err.problems] == [2, 4, 6, 8]
    text = str(err)
    for n, words in [(2, "got array"), (4, "invalid JSON"), (6, "got number"), (8, "got string")]:
        assert f"{path}:{n}: " in text and words in text, text
    assert "4 bad lines" in text


def test_every_bad_csv_line_is_reported(tmp_path):
    lines = (DATA / "good.csv").read_text().splitlines()
    path = tmp_path / "2025-01-02.csv"
    path.write_text("\n".join([lines[0], lines[1], "a,b", lines[2], "x,y,z", lines[3]]) + "\n")
    with pytest.raises(FeedFormatError) as ei:
        read_feed(path)
    assert [n for n, _ in ei.value.problems] == [3, 5] and "got 2" in str(ei.value) and "got 3" in str(ei.value)


def test_duplicate_id_keeps_first_and_quarantines_later_different_rows(tmp_path):
    rows = [_good(i) for i in range(1, 9)]
    rows.append({**_good(2), "target_new": "Elsewhere"})                 # line 9: same id as line 2, differs
    rows.append(dict(reversed(list(_good(3).items()))))                  # line 10: field-identical to line 3
    rows.append(_good(3))                                                # line 11: byte-identical to line 3
    path = _write_jsonl(tmp_path, rows)
    res = ingest_feed(path, LENIENT, now=NOW, record=False)
    assert res.accepted_ids == [f"h{i}" for i in range(1, 9)]            # the first h2 is kept
    assert [(q.line, q.row["target_new"]) for q in res.quarantined] == [(9, "Elsewhere")]
    assert res.quarantined[0].reasons == [
        "duplicate_id: id 'h2' was first used on line 2 (kept); this row differs from it"]
    assert [(d.line, d.reason) for d in res.dropped] == [
        (10, "duplicate: identical to line 3 (id 'h3')"), (11, "duplicate: identical to line 3 (id 'h3')")]
    assert res.counts["drop_reasons"] == {"duplicate": 2} and res.counts["quarantined"] == 1
    report = Path(res.report_path).read_text()
    assert "## Dropped rows (2)" in report and "identical to line 3" in report


def champion_with_facts(workspace, lm) -> str:
    """A promoted lineage state that applied h1 and h2 (Subject 1 -> Place 1, Subject 2 -> Place 2)."""
    from kedit.lineage.ops import open_store
    from tests.test_lineage import fabricate

    store = open_store(workspace)
    facts = [{"id": f"h{i}", "subject": f"Subject {i}", "prompt": "{} is located in", "target_new": f"Place {i}",
              "target_true": f"Home {i}"} for i in (1, 2)]
    state = store.commit(lm, fabricate(lm, None, 0, ["h1", "h2"]), parent=None, hparams={"method": "alphaedit"},
                         feed={"path": "feeds/old.jsonl", "file_sha256": "x", "row_ids": ["h1", "h2"],
                               "facts": facts})
    store.record_gate(state.id, {"passed": True}, against=None)
    store.approve(state.id, by="tester")
    store.promote(state.id, by="tester")
    assert store.champion() == state.id
    return state.id


def lineage_feed(workspace) -> Path:
    """h1 is already applied; h2 changes Subject 2 back to Home 2 (a flip-flop); h3..h8 are new."""
    rows = [_good(1), _good(2, target_new="Home 2", target_true="Place 2",
                          observed_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))]
    return _write_jsonl(Path(workspace.root), rows + [_good(i) for i in range(3, 9)])


def test_feed_ingest_cli_runs_the_nightly_lineage_checks(workspace, tiny_lm, capsys, monkeypatch):
    """`kedit feed ingest` and the nightly ingest step share one function: facts already applied on the
    champion's path are dropped, and a change back within the window is quarantined as a flip-flop."""
    from kedit.cli import main

    champion = champion_with_facts(workspace, tiny_lm)
    path = lineage_feed(workspace)
    monkeypatch.chdir(workspace.root)
    rc = main(["-w", str(workspace.root), "feed", "ingest", str(path), "--json", str(workspace.root / "out.json")])
    out = json.loads((workspace.root / "out.json").read_text())
    assert rc == 0, capsys.readouterr()
    assert out["champion"] == champion and f"champion {champion}" in capsys.readouterr().out
    assert out["counts"]["drop_reasons"] == {"already_applied": 1}
    assert out["counts"]["quarantine_reasons"] == {"flip_flop": 1}
    assert [r["id"] for r in out["accepted"]] == [f"h{i}" for i in range(3, 9)]
    assert (workspace.feeds_dir / ".ingested.json").exists() and (workspace.feeds_dir / "reports").is_dir()


def test_validate_writes_reports_into_the_workspace(tmp_path, capsys):
    from kedit.cli import main

    elsewhere = _copy("mixed.jsonl", tmp_path / "incoming")
    ws = tmp_path / "ws"
    assert main(["-w", str(ws), "feed", "validate", str(elsewhere)]) == 1  # rejected: over 20% invalid
    assert (ws / "feeds" / "reports" / "2025-01-02.md").exists()
    assert (ws / "feeds" / "quarantine" / "2025-01-02.jsonl").exists()
    assert not (elsewhere.parent / "reports").exists() and not (elsewhere.parent / "quarantine").exists()
    assert str(ws / "feeds" / "reports" / "2025-01-02.md") in capsys.readouterr().out


def test_hostile_json_lines_are_bad_lines_not_crashes(tmp_path):
    """Each of these used to crash the reader (RecursionError, ValueError without a line), pass silently
    (a repeated key: the last value wins unseen), or carry non-JSON NaN / a lone surrogate into the
    quarantine file and report (which then could not be written as UTF-8)."""
    good = json.dumps(_good(1))
    hostile = {
        2: ('{"id": "n", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        3: ('{"id": "i", "big": ' + "9" * 5000 + "}", "number too long"),
        4: ('{"id": "c", "score": NaN}', "NaN is not JSON"),
        5: (json.dumps(_good(5))[:-1] + ', "target_new": "Elsewhere"}', "key 'target_new' appears twice"),
        6: (json.dumps(_good(6)).replace("Subject 6", "Subject \\ud800 6"), "lone surrogate \\ud800"),
    }
    path = _write_jsonl(tmp_path, [good] + [line for line, _ in hostile.values()] + [good.replace("h1", "h7")])
    with pytest.raises(FeedFormatError) as ei:
        read_feed(path)
    assert [n for n, _ in ei.value.problems] == list(hostile), ei.value.problems
    for (n, problem), (_, words) in zip(ei.value.problems, hostile.values()):
        assert words in problem, (n, problem)


def test_schema_pattern_rejects_a_single_control_character():
    import jsonschema

    for bad in ("A\x00", "\x00", "a\tb"):  # the old pattern let one through as its \S
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**_good(1), "subject": bad}, feed_schema())
    jsonschema.validate(_good(1), feed_schema())


def test_utf16_file_is_named_as_such(tmp_path):
    path = tmp_path / "2025-01-02.jsonl"
    path.write_bytes((json.dumps(_good(1)) + "\n").encode("utf-16"))
    with pytest.raises(FeedFormatError, match="UTF-16 .*feeds must be UTF-8"):
        read_feed(path)
    path.write_bytes((json.dumps(_good(1)) + "\n").encode("utf-16-le"))  # no byte-order mark
    with pytest.raises(FeedFormatError, match="NUL byte at column 2 .*UTF-16") as ei:
        read_feed(path)
    assert ei.value.line == 1


def test_replacement_character_is_quarantined(tmp_path):
    """U+FFFD means the text was decoded with the wrong encoding before it reached the feed."""
    rows = [_good(i) for i in range(1, 6)]
    rows[1]["target_new"] = "S\ufffdo Paulo"
    res = ingest_feed(_write_jsonl(tmp_path, rows), LENIENT, now=NOW, record=False)
    assert _reasons(res) == {"h2": ["encoding_damage:target_new: target_new contains U+FFFD REPLACEMENT "
                                    "CHARACTER at position 2 (text decoded with the wrong encoding upstream)"]}


def test_parquet_row_count_is_checked_before_reading(tmp_path):
    import pandas as pd

    pq = tmp_path / "2025-01-02.parquet"
    pd.DataFrame([_good(i) for i in range(50)]).to_parquet(pq)
    with pytest.raises(FeedFormatError, match="50 rows, over the limit of 10"):
        read_feed(pq, FeedPolicy(max_rows=10))


def test_id_that_is_a_path_is_quarantined(tmp_path):
    """Ids name files downstream (tracing writes reports/<key>/tracing/<id>): no separators, no '.'/'..'."""
    rows = [_good(i) for i in range(1, 11)]
    for i, bad in enumerate(["../../etc/cron.d/x", "/abs", "a\\b", ".."]):
        rows[i]["id"] = bad
    rows[4]["id"] = "Q42.P36:v1-ok"
    res = ingest_feed(_write_jsonl(tmp_path, rows), LENIENT, now=NOW, record=False)
    assert sorted(_reasons(res)) == sorted(["../../etc/cron.d/x", "/abs", "a\\b", ".."])
    assert all(r[0].startswith("id_path_safe:") for r in _reasons(res).values())
    assert "Q42.P36:v1-ok" in res.accepted_ids


def test_unknown_columns_are_named_in_the_report(tmp_path):
    """A misspelt optional column (``paraphrase``) would otherwise vanish without a word."""
    rows = [_good(i) for i in range(1, 4)]
    rows[0]["paraphrase"] = ["Subject 1 sits in"]
    res = ingest_feed(_write_jsonl(tmp_path, rows), now=NOW, record=False)
    assert res.passed and "unknown column(s) ['paraphrase'] ignored" in "; ".join(res.notes)
    assert "unknown column(s) ['paraphrase'] ignored" in Path(res.report_path).read_text()


def test_report_and_quarantine_file_show_invisible_characters_escaped(tmp_path):
    """A quarantined row is written as read, but a bidi override in it must not reorder what the
    reviewer sees in the report or the quarantine file: such characters are written as \\u escapes."""
    rows = [_good(i) for i in range(1, 6)]
    rows[0]["id"] = "h1\u202etxt.exe"
    rows[1]["subject"] = "Sub\x85ject \U000e0041"
    res = ingest_feed(_write_jsonl(tmp_path, rows), LENIENT, now=NOW, record=False)
    report = Path(res.report_path).read_text(encoding="utf-8")
    qfile = Path(res.quarantine_path).read_text(encoding="utf-8")
    for text in (report, qfile):
        assert "\u202e" not in text and "\x85" not in text and "\U000e0041" not in text
    assert "h1\\u202etxt.exe" in report
    quarantined = [json.loads(x)["row"] for x in qfile.splitlines()]
    assert quarantined[0]["id"] == rows[0]["id"] and quarantined[1]["subject"] == rows[1]["subject"]  # exact


def test_observed_at_out_of_range_in_utc_is_quarantined_not_a_crash(tmp_path):
    """``datetime.fromisoformat`` accepts these, but they fall outside years 1-9999 in UTC (OverflowError)."""
    rows = [_good(i) for i in range(1, 6)]
    rows[0]["observed_at"] = "0001-01-01T00:00:00+23:59"
    rows[1]["observed_at"] = "9999-12-31T23:59:59-23:59"
    res = ingest_feed(_write_jsonl(tmp_path, rows), LENIENT, now=NOW, record=False)
    assert {k: [r.split(":")[0] for r in v] for k, v in _reasons(res).items()} == {
        "h1": ["observed_at_iso8601"], "h2": ["observed_at_iso8601"]}


def test_csv_list_cell_that_is_hostile_json_is_a_bad_value_not_a_crash(tmp_path):
    lines = (DATA / "good.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[1].split(",")
    assert len(cells) == len(header)  # the row has no quoted commas, so a cell can be swapped in place
    deep = list(cells)
    deep[header.index("paraphrases")] = "[" * 50_000
    big = list(cells)
    big[header.index("paraphrases")] = "[" + "9" * 5000 + "]"
    path = tmp_path / "2025-01-02.csv"
    path.write_text("\n".join([lines[0], ",".join(deep), ",".join(big)] + lines[2:]) + "\n")
    rows = read_feed(path).rows
    assert isinstance(rows[0]["paraphrases"], str) and isinstance(rows[1]["paraphrases"], str)


def test_byte_order_marks_of_concatenated_files_are_dropped(tmp_path):
    """A BOM at the start of the file, or of a line (files concatenated with their BOMs), is an encoding
    artefact outside any value: it is dropped. Inside a value it is quarantined (see invisible_chars)."""
    a, b = json.dumps(_good(1)), json.dumps(_good(2))
    path = tmp_path / "2025-01-02.jsonl"
    path.write_bytes(("\ufeff" + a + "\n\ufeff" + b + "\n").encode("utf-8"))
    feed = read_feed(path)
    assert [r["id"] for r in feed.rows] == ["h1", "h2"] and feed.rows[0] == _good(1)
    csv_path = tmp_path / "2025-01-02.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + (DATA / "good.csv").read_bytes())
    assert read_feed(csv_path).rows == read_feed(DATA / "good.csv").rows
