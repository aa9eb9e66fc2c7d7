"""The held-out discipline: calibration (and any tuning) reads one part of a development file, the
benchmark reports on another.

The rule is deterministic and needs nothing but the file: of its ``N`` records, the **last**
``ceil(N x CALIBRATION_SHARE)`` (indices ``[N - n_cal, N)``) are the calibration part; the benchmark's
records are ``[0, N - n_cal)``. The benchmark reads from index 0 by default, so its default runs
are held out, and results taken before the split existed stay comparable. On CounterFact dev
(10,000 records): calibration ``[9000, 10000)``, benchmark ``[0, 9000)``.

A calibrated hparams file records the split (data file name, sha256, ranges, the records each
measurement read); ``kedit bench lifelong`` checks its records against it and refuses to report on
calibration records unless told to (and then says so in its report).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kedit.atomic import sha256_file

CALIBRATION_SHARE = 0.1


@dataclass(frozen=True)
class DevSplit:
    """Which records of one development file calibration may read (``[cal_start, cal_end)``) and
    which the benchmark reports on (``[0, heldout_end)``)."""

    data: str  # file name (the path differs between machines)
    sha256: str
    n_records: int
    cal_start: int
    cal_end: int

    @property
    def heldout_end(self) -> int:
        return self.cal_start

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["calibration_records"] = [self.cal_start, self.cal_end]
        d["heldout_records"] = [0, self.heldout_end]
        d["rule"] = (f"last ceil({self.n_records} x {CALIBRATION_SHARE}) records calibrate, the rest are "
                     f"held out for the benchmark")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "calibration.split") -> DevSplit:
        try:
            return cls(data=str(d["data"]), sha256=str(d["sha256"]), n_records=int(d["n_records"]),
                       cal_start=int(d["cal_start"]), cal_end=int(d["cal_end"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: not a data split record ({exc})") from None

    def calibration_indices(self, n: int) -> list[int]:
        """The first ``n`` calibration records (all of them when ``n`` exceeds the part)."""
        return list(range(self.cal_start, min(self.cal_end, self.cal_start + n)))

    def overlap(self, offset: int, count: int) -> list[int]:
        """Indices in ``[offset, offset + count)`` that belong to the calibration part, as ``[lo, hi)`` or []."""
        lo, hi = max(offset, self.cal_start), min(offset + count, self.cal_end)
        return [lo, hi] if lo < hi else []


def split_counts(n_records: int) -> tuple[int, int]:
    """``(cal_start, cal_end)`` of a file of ``n_records``: the last ``ceil(n x share)`` records."""
    if n_records < 2:
        raise ValueError(f"a development file needs at least 2 records to split, has {n_records}")
    n_cal = max(1, math.ceil(n_records * CALIBRATION_SHARE))
    return n_records - n_cal, n_records


def dev_split(path: str | Path, n_records: int) -> DevSplit:
    """The split of the development file at ``path`` holding ``n_records`` records."""
    start, end = split_counts(n_records)
    return DevSplit(data=Path(path).name, sha256=sha256_file(path), n_records=n_records, cal_start=start,
                    cal_end=end)


def file_split(hparams_file: str | Path | None) -> DevSplit | None:
    """The split a calibrated hparams file records (its ``calibration.split`` block), else None (a
    hand-set file, or none)."""
    import yaml

    if hparams_file is None or not Path(hparams_file).is_file():
        return None
    data = yaml.safe_load(Path(hparams_file).read_text()) or {}
    block = (data.get("calibration") or {}) if isinstance(data, dict) else {}
    split = block.get("split") if isinstance(block, dict) else None
    return DevSplit.from_dict(split, f"{hparams_file}: calibration.split") if isinstance(split, dict) else None


@dataclass
class HeldoutCheck:
    """What a benchmark run's records are, measured against the calibration split of its hparams."""

    records: list[int]  # [offset, offset + T)
    split: dict[str, Any] | None
    same_data: bool
    overlap: list[int]  # calibration records the run reports on ([lo, hi)), [] when held out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sentence(self) -> str:
        if self.split is None:
            return (f"Records [{self.records[0]}, {self.records[1]}); the hparams file records no calibration "
                    "split (hand-set settings).")
        cal = self.split["calibration_records"]
        if not self.same_data:
            return (f"Records [{self.records[0]}, {self.records[1]}) of another data file than the one the "
                    f"settings were calibrated on ({self.split['data']}, records [{cal[0]}, {cal[1]})).")
        if self.overlap:
            return (f"**WARNING: records [{self.overlap[0]}, {self.overlap[1]}) of this run are calibration "
                    f"records** (calibration read [{cal[0]}, {cal[1]}) of {self.split['data']}); "
                    "these numbers are not held out.")
        return (f"Held out: records [{self.records[0]}, {self.records[1]}) of {self.split['data']}; the settings "
                f"were calibrated on records [{cal[0]}, {cal[1]}).")


def check_heldout(hparams_file: str | Path | None, data: str | Path, offset: int, count: int,
                  allow_overlap: bool = False) -> HeldoutCheck:
    """Check a run on ``data`` records ``[offset, offset + count)`` against the calibration split its
    hparams file records; raise a clear error when it would report on calibration records and
    ``allow_overlap`` is off."""
    split = file_split(hparams_file)
    rec = [offset, offset + count]
    if split is None:
        return HeldoutCheck(rec, None, False, [])
    same = Path(data).is_file() and sha256_file(data) == split.sha256
    ov = split.overlap(offset, count) if same else []
    if ov and not allow_overlap:
        raise ValueError(
            f"records [{offset}, {offset + count}) of {Path(data).name} include calibration records "
            f"[{ov[0]}, {ov[1]}): the settings in {hparams_file} were calibrated on records "
            f"[{split.cal_start}, {split.cal_end}). Report on held-out records [0, {split.heldout_end}) "
            f"(e.g. --edits {min(count, split.heldout_end)} --offset 0), or pass --allow-calibration-records "
            f"to measure on them anyway (the report then says so)")
    return HeldoutCheck(rec, split.to_dict(), same, ov)
