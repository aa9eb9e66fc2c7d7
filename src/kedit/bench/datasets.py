"""The data sets the lifelong benchmark runs: how a record becomes an :class:`EditRequest`, which
fields give the fluency and locality prompts, and how edited records are scored.

- ``counterfact``: flat CounterFact; efficacy / generalization / specificity (docs/metrics.md), plus
  efficacy magnitude and the harmonic-mean score.
- ``zsre``: zsRE question answering (MEND split); ``src`` is edited to ``alt``; reliability /
  generalization / locality are token-level accuracies under teacher forcing
  (:func:`kedit.evaluation.metrics.evaluate_zsre`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedit.editors.base import EditRequest
from kedit.editors.io import request_from_record

# ../shared/data beside the repository (a checkout at /work/main finds /work/shared), else beside the
# working directory's parent (a checkout one level deeper, run from its root)
SHARED_DATA_DIRS = (Path(__file__).resolve().parents[3].parent / "shared" / "data",
                    Path("..") / "shared" / "data", Path("..") / ".." / "shared" / "data")


def zsre_template(src: str, subject: str, where: str = "record") -> tuple[str, str, bool]:
    """``(prompt with {} for the subject, subject as written in src, fell_back)``.

    The subject should occur in ``src`` verbatim; where it occurs only with other letter case the
    first case-insensitive match is used (``fell_back`` True, counted in the report); otherwise a
    clear error."""
    if subject in src:
        i = src.index(subject)
    else:
        i = src.lower().find(subject.lower())
        if i < 0:
            raise ValueError(f"{where}: zsRE question {src!r} does not contain the subject {subject!r}")
    found = src[i: i + len(subject)]
    return src[:i] + "{}" + src[i + len(subject):], found, found != subject


def zsre_request(rec: dict, rid: str, where: str = "record") -> EditRequest:
    """``src`` -> ``alt``; the old answer is ``pred`` (the MEND model's prediction), else ``answers[0]``."""
    prompt, subject, _ = zsre_template(rec["src"], rec["subject"], where)
    answers = rec.get("answers") or []
    old = rec.get("pred") or (answers[0] if answers else None)
    return EditRequest(prompt=prompt, subject=subject, target_new=rec["alt"].strip(), target_true=old,
                       paraphrases=[rec["rephrase"]], neighbors=[rec["loc"]], id=rid)


def _counterfact_request(rec: dict, rid: str, where: str) -> EditRequest:
    return request_from_record(rec, where)


def _counterfact_reference(lm, records: list[dict]) -> None:
    return None


def _counterfact_evaluate(lm, records: list[dict], reference: Any, ids: list) -> dict:
    from kedit.evaluation.metrics import evaluate_counterfact

    return evaluate_counterfact(lm, records)


def _zsre_reference(lm, records: list[dict]) -> list[list[int]]:
    from kedit.evaluation.metrics import zsre_locality_predictions

    return zsre_locality_predictions(lm, records)


def _zsre_evaluate(lm, records: list[dict], reference: Any, ids: list) -> dict:
    from kedit.evaluation.metrics import evaluate_zsre

    return evaluate_zsre(lm, records, None if reference is None else reference[: len(records)], ids=ids)


def _joined(parts: list[dict], key: str) -> list:
    return [x for p in parts for x in p[key]]


def _merge_counterfact(parts: list[dict]) -> dict:
    from kedit.evaluation.metrics import counterfact_result

    return counterfact_result(*(_joined(parts, k) for k in ("ids", "efficacy_ok", "generalization_ok",
                                                            "specificity_ok", "magnitude")))


def _merge_zsre(parts: list[dict]) -> dict:
    from kedit.evaluation.metrics import zsre_result

    return zsre_result(*(_joined(parts, k) for k in ("ids", "reliability_per_record", "generalization_per_record",
                                                     "locality_per_record", "locality_predictions")))


def _check_counterfact(records: list[dict], where: str) -> None:
    from kedit.evaluation.metrics import check_counterfact

    check_counterfact(records, where)


def _check_zsre(records: list[dict], where: str) -> None:
    from kedit.evaluation.metrics import check_zsre

    check_zsre(records, where)


@dataclass(frozen=True)
class BenchDataset:
    """One benchmark data set. ``metrics`` are its three per-record metrics in the order edit success,
    generalization, locality (curve, table, plot); ``report`` every per-record metric the report shows."""

    name: str
    file: str  # default file name in ../shared/data
    title: str  # what a record is, for the report ("CounterFact records")
    metrics: tuple[str, str, str]
    report: tuple[str, ...]
    prompt_field: str  # the edit prompt: fluency prompts
    locality_field: str  # unrelated prompts: neighbourhood KL and canary agreement
    check: Callable[[list[dict], str], None]
    to_request: Callable[[dict, str, str], EditRequest]  # (record, id, where)
    reference: Callable[[Any, list[dict]], Any]  # what the unedited model gives that locality compares with
    evaluate: Callable[[Any, list[dict], Any, list], dict]  # (lm, records, reference, ids) -> metrics
    merge: Callable[[list[dict]], dict]  # evaluate's results over consecutive chunks -> the one over all
    # free generation (kedit.evaluation.freegen): the paraphrase prompt and the new object of a record
    paraphrase_field: str = "rephrase_prompt"
    object_field: str = "target_new"

    def free_generation_fields(self, records: list[dict]) -> tuple[list[str], list[str], list[str], list[str]]:
        """Each record's edit, paraphrase and neighbourhood prompt and its new object."""
        return ([r[self.prompt_field] for r in records], [r[self.paraphrase_field] for r in records],
                [r[self.locality_field] for r in records], [r[self.object_field] for r in records])

    def default_data(self) -> Path:
        """The data set's file in the first ../shared/data that has it (else the first candidate, which
        then fails to load with a clear message)."""
        found = [d / self.file for d in SHARED_DATA_DIRS if (d / self.file).exists()]
        return (found or [SHARED_DATA_DIRS[0] / self.file])[0].resolve()

    def _read(self, path: str | Path) -> tuple[Path, list]:
        """The file's JSON list of records (a clear error if it is missing or not a list)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{self.name} file {path} not found (pass --data)")
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of {self.name} records, got {type(data).__name__}")
        return path, data

    def load(self, path: str | Path, n: int, offset: int = 0) -> list[dict]:
        path, data = self._read(path)
        recs = data[offset: offset + n]
        if len(recs) < n:
            raise ValueError(f"{path}: asked for {n} records from offset {offset}, only {len(recs)} available")
        self.check(recs, str(path))
        return recs

    def load_valid(self, path: str | Path, n: int, offset: int = 0) -> tuple[list[dict], list[int], list[dict]]:
        """The first ``n`` records from ``offset`` that pass the data set's check, their indices in the
        file, and the records left out (``{"record": index, "reason": ...}``): a benchmark over a file
        with a few unusable rows (zsRE dev has records without a new answer) runs on the rest and says
        which were left out and why."""
        path, data = self._read(path)
        recs, index, skipped = [], [], []
        for i in range(offset, len(data)):
            if len(recs) == n:
                break
            try:
                self.check([data[i]], f"{path}[{i}]")
                self.to_request(data[i], str(i), f"{path} record {i}")
            except (ValueError, KeyError, TypeError) as exc:
                skipped.append({"record": i, "reason": str(exc)})
                continue
            recs.append(data[i])
            index.append(i)
        if len(recs) < n:
            raise ValueError(f"{path}: asked for {n} valid records from offset {offset}, only {len(recs)} "
                             f"available ({len(skipped)} left out, e.g. {skipped[:1]})")
        return recs, index, skipped

    def requests(self, records: list[dict], path: str, offset: int, index: list[int] | None = None
                 ) -> list[EditRequest]:
        """One request per record, its id the record's index in the file (``index``; default offset + i)."""
        idx = index if index is not None else [offset + i for i in range(len(records))]
        return [self.to_request(r, str(i), f"{path} record {i}") for i, r in zip(idx, records)]

    def subject_fallbacks(self, records: list[dict]) -> int:
        """Records whose subject was found in the prompt only case-insensitively (zsRE)."""
        if self.name != "zsre":
            return 0
        return sum(zsre_template(r["src"], r["subject"])[2] for r in records)


DATASETS = {
    "counterfact": BenchDataset(
        name="counterfact", file="counterfact-dev.json", title="CounterFact records",
        metrics=("efficacy", "generalization", "specificity"),
        report=("efficacy", "generalization", "specificity", "efficacy_magnitude", "score"),
        prompt_field="prompt", locality_field="locality_prompt", check=_check_counterfact,
        to_request=_counterfact_request, reference=_counterfact_reference, evaluate=_counterfact_evaluate,
        merge=_merge_counterfact),
    "zsre": BenchDataset(
        name="zsre", file="zsre-dev-1k.json", title="zsRE records",
        metrics=("reliability", "generalization", "locality"),
        report=("reliability", "generalization", "locality"),
        prompt_field="src", locality_field="loc", check=_check_zsre,
        to_request=lambda r, rid, where: zsre_request(r, rid, where), reference=_zsre_reference,
        evaluate=_zsre_evaluate, merge=_merge_zsre, paraphrase_field="rephrase", object_field="alt"),
}


def get_dataset(name: str) -> BenchDataset:
    if name not in DATASETS:
        raise ValueError(f"unknown benchmark data set {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name]
