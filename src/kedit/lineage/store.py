"""The lineage store: every applied edit batch as a content-addressed, bit-exactly restorable state.

Layout of ``<workspace>/lineage/``::

    states/<id>/state.json                the record (written last; a state exists iff this exists)
    states/<id>/deltas.safetensors        the batch's deltas, stored layout and dtype
    states/<id>/editor_state.safetensors  the editor's tensors after the batch (e.g. AlphaEdit Σ K Kᵀ)
    states/<id>/editor_meta.json          the editor's JSON metadata after the batch
    states/<id>/snapshot.safetensors      every `snapshot_every` levels: full edited tensors
    base/<model hash>/<param>.safetensors the base model's value of each tensor ever edited
    events/<seq>-<type>.json              promote / rollback / approve / reject / gate / override / seal,
                                          appended, never edited; created exclusively (never over
                                          another) and hash-chained (see kedit.lineage.chain)
    CHAMPION                              the current champion id or ``base``: written from the events
                                          after each promote / rollback, never read as the truth
    .lock                                 one writer at a time: an OS lock (flock) on this file, held
                                          over a whole promote / rollback; it names the holder
    .intent.json                          an interrupted promote / rollback (see kedit.lineage.ops)

A commit stages all files in ``.staging/`` (each temp file + fsync + rename), writes ``state.json``
last and publishes the directory with one atomic rename, so a crash leaves the old store or the new
one. Only safetensors and JSON are read back: a store received from elsewhere cannot run code.
Materialising replays the deltas from the nearest snapshot (or the cached base tensors) in the
recorded order and dtype, then checks every tensor's sha256 against the record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kedit.atomic import (
    fsync_dir,
    save_tensors_atomic,
    sha256_file,
    sha256_json,
    sha256_tensor,
    write_json_atomic,
    write_text_atomic,
)
from kedit.editors.base import EditorState, EditResult
from kedit.lineage.chain import ChainReport, check_chain, seal
from kedit.lineage.identity import accounts, current_actor
from kedit.lineage.policy import Check, promotion_check, refusal, rollback_check
from kedit.lineage.signing import OFF as SIGNING_OFF
from kedit.lineage.signing import ApprovalSigning, SigningError, find_key, payload, sign
from kedit.lineage.signing import check as check_signature
from kedit.lineage.state import (
    BASE,
    DELTAS_FILE,
    EDITOR_META_FILE,
    EDITOR_TENSORS_FILE,
    SNAPSHOT_FILE,
    STATE_FILE,
    EditState,
    Event,
    LineageCorruptError,
    LineageError,
    label,
    read_event_json,
)
from kedit.lineage.text import check_text, escape_text

log = logging.getLogger(__name__)

# The points between which a commit can be interrupted (tests inject a failure at each).
COMMIT_STEPS = ("base", "deltas", "editor_state", "snapshot", "manifest", "publish")
EVENT_TYPES = ("promote", "rollback", "approve", "reject", "gate", "override", "seal")
CHAMPION_FILE = "CHAMPION"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def tensor_info(t: torch.Tensor) -> dict[str, Any]:
    """What a record keeps about a tensor: enough to check it bit for bit and to read it at a glance."""
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "sha256": sha256_tensor(t),
            "norm": float(t.detach().float().norm())}


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types on a damaged header
        raise LineageCorruptError(f"{path}: unreadable safetensors file ({exc})") from exc


@dataclass
class VerifyReport:
    """Outcome of :meth:`LineageStore.verify`: ``problems`` names every bad file or state."""

    states: int = 0
    files: int = 0
    tensors: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # not problems: e.g. events written before the chain

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class LogEntry:
    """One line of ``kedit lineage log``: a state plus what happened to it afterwards.

    ``approvals`` are approve events only (a promotion is not an approval); ``overrides`` are the
    promotions / rollbacks that went past an unmet rule, with the reason given."""

    state: EditState
    children: list[str]
    champion: bool
    gate: dict | None
    approvals: list[Event]
    promoted: bool
    promotions: list[Event] = field(default_factory=list)
    overrides: list[Event] = field(default_factory=list)
    # overrides whose promote / rollback was never written (the process died between the two events)
    unfinished_overrides: list[Event] = field(default_factory=list)
    # events of this state that fail the chain or binding check (file -> why); ignored by the rules
    untrusted: dict[str, str] = field(default_factory=dict)


class _Model:
    """What the store needs from a LoadedModel or a bare module: parameters, base hash, weight files."""

    def __init__(self, lm_or_model: Any) -> None:
        manifest = getattr(lm_or_model, "manifest", None)
        self.model: torch.nn.Module = getattr(lm_or_model, "model", lm_or_model)
        self.params = dict(self.model.named_parameters())
        if manifest is not None:
            self.base_hash, self.slug = manifest.model_hash, manifest.slug
            self.files: dict = manifest.files
            self.path = Path(lm_or_model.path)
        else:  # a bare module: identify it by the content of its weights
            self.base_hash, self.slug, self.files, self.path = self.digest(), "in-memory", {}, Path(".")

    def digest(self, replace: dict[str, torch.Tensor] | None = None) -> str:
        """Same digest as :func:`kedit.models.store.wrap_model`, optionally with some tensors swapped."""
        replace = replace or {}
        return sha256_json({k: sha256_tensor(replace.get(k, v)) for k, v in sorted(self.model.state_dict().items())})

    def read_file_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Base values of ``names`` read from the model store's safetensors files (exact), if present."""
        from safetensors import safe_open

        found: dict[str, torch.Tensor] = {}
        for fname in self.files:
            if not fname.endswith(".safetensors") or not (self.path / fname).exists():
                continue
            with safe_open(str(self.path / fname), framework="pt") as fh:
                for n in set(names) & set(fh.keys()):
                    found[n] = fh.get_tensor(n)
        return found


class LineageStore:
    """Content-addressed edit states, events and snapshots under one directory (see module doc)."""

    def __init__(self, root: str | Path, snapshot_every: int = 20, require_distinct_approver: bool = False,
                 signing: ApprovalSigning | None = None) -> None:
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1, got {snapshot_every}")
        self.root = Path(root)
        self.snapshot_every = int(snapshot_every)
        # params.yaml lineage.require_distinct_approver: the approver may not be the promoter (policy.py)
        self.require_distinct_approver = bool(require_distinct_approver)
        # params.yaml lineage.approval_signing: approvals count only with a good signature (signing.py)
        self.signing = signing or SIGNING_OFF
        self._signature_cache: dict[tuple, str | None] = {}
        self.fault_hook: Callable[[str], None] | None = None  # called after each commit step (crash tests)
        self._index: dict[str, EditState] = {}
        self._index_key: tuple | None = None
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None  # last materialised tensors
        self._locked = False
        # event files and hashed files as last read, by (inode, size, mtime, ctime): a file that changes
        # (ctime cannot be set back) is read again; events are many and read on every champion() call
        self._file_cache: dict[Path, tuple[tuple, Any]] = {}
        self._chain_cache: tuple[tuple, tuple[list[Event], ChainReport, dict[str, str]]] | None = None

    # --- paths ---------------------------------------------------------------------------------
    @property
    def states_dir(self) -> Path:
        return self.root / "states"

    @property
    def events_dir(self) -> Path:
        return self.root / "events"

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    def state_dir(self, state_id: str) -> Path:
        return self.states_dir / state_id

    def recorded_path(self, recorded: str | Path) -> Path:
        """A path an event records (a gate report folder): relative ones are relative to the workspace
        holding this store (``<workspace>/lineage``), so a moved or copied workspace still finds them;
        an absolute one (an older record, or a folder outside the workspace) stays as it is."""
        p = Path(recorded)
        return p if p.is_absolute() else self.root.parent / p

    # --- locking -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, op: str = "write") -> Iterator[None]:
        """Exclusive writer lock: ``flock`` on ``lineage/.lock``, which then names the holder.

        The kernel grants the lock to one process and releases it when that process ends, however it
        ends: a writer killed with -9 leaves the file (naming a dead pid) but not the lock, and of two
        writers started together after such a crash exactly one gets it. The other is refused at once
        with the holder's pid, host, start time and operation (no queue): a promotion waiting behind
        another would act on a champion it has not seen. The file is never removed (removing it would
        let a writer lock a name that another writer has just replaced)."""
        if self._locked:  # re-entrant within one store object
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._locked_error() from None
        except OSError as exc:
            os.close(fd)
            raise LineageError(f"cannot lock {self.lock_path}: {exc} (the lineage store needs a filesystem with "
                               f"flock locks)") from exc
        try:
            left = self.lock_holder()
            if left.get("pid"):  # a holder that did not release: it died holding the lock
                log.warning("lineage lock %s: pid %s on %s (%s, since %s) ended without releasing it; lock taken",
                            self.lock_path, left.get("pid"), left.get("host"), left.get("op"), left.get("since"))
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(), "op": op}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            os.fsync(fd)
            self._locked = True
            try:
                self._clean_staging()
                yield
            finally:
                self._locked = False
                os.ftruncate(fd, 0)  # released cleanly: the file names no holder
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def _locked_error(self) -> LineageError:
        """The refusal a second writer gets, naming the holder (read until the winner has written it)."""
        holder: dict = {}
        for _ in range(20):
            holder = self.lock_holder()
            if holder.get("pid") and pid_alive(holder["pid"]):
                break
            time.sleep(0.05)  # the winner has the lock but has not written its name over the dead one's yet
        doing = f" ({holder['op']})" if holder.get("op") else ""
        return LineageError(
            f"lineage store {self.root} is locked by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"since {holder.get('since', '?')}{doing}: another kedit writer is running; try again when it "
            f"has finished")

    def lock_holder(self) -> dict:
        """Who the lock file names: the writer holding it, or one that died holding it ({}: released)."""
        try:
            return json.loads(self.lock_path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def _clean_staging(self) -> None:
        """Remove what an interrupted commit left (only ever unpublished staging folders)."""
        shutil.rmtree(self.root / ".staging", ignore_errors=True)

    def _step(self, name: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(name)

    # --- reading -------------------------------------------------------------------------------
    def _refresh(self) -> None:
        if not self.states_dir.exists():
            self._index, self._index_key = {}, None
            return
        st = self.states_dir.stat()
        key = (st.st_mtime_ns, st.st_nlink)
        if key == self._index_key:
            return
        index = {}
        for d in self.states_dir.iterdir():
            if (d / STATE_FILE).exists():
                index[d.name] = self._index.get(d.name) or EditState.from_file(d / STATE_FILE)
        self._index, self._index_key = index, key

    def states(self) -> list[EditState]:
        """All states in the order they were written."""
        self._refresh()
        return sorted(self._index.values(), key=lambda s: (s.seq, s.created_at))

    def resolve(self, state_id: str) -> str:
        """A full id from an id or a unique prefix (>= 4 characters), ``champion`` or ``HEAD``."""
        self._refresh()
        if state_id in ("champion", "@champion"):
            champ = self.champion()
            if champ is None:
                ev = self.champion_event()
                raise LineageError(f"{self.root}: the champion is the base model, which has no edit state ("
                                   + (f"rolled back by event {ev.seq}" if ev else "nothing promoted yet")
                                   + "); use 'base' where a command takes one (`kedit export base`)")
            return champ
        if state_id in ("HEAD", "latest"):
            states = self.states()
            if not states:
                raise LineageError(f"{self.root}: the lineage is empty")
            return states[-1].id
        if state_id in self._index:
            return state_id
        hits = [k for k in self._index if len(state_id) >= 4 and k.startswith(state_id)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise LineageError(f"state prefix {state_id!r} is ambiguous: {[h[:12] for h in hits]}")
        raise LineageError(f"no edit state {state_id!r} in {self.root} ({len(self._index)} states; "
                           f"see `kedit lineage log`)")

    def get(self, state_id: str) -> EditState:
        sid = self.resolve(state_id)  # resolve may rebuild the index: look up afterwards
        return self._index[sid]

    def path(self, state_id: str | None) -> list[EditState]:
        """The states from the first batch on the base model down to ``state_id`` (inclusive)."""
        chain: list[EditState] = []
        sid = self.resolve(state_id) if state_id else None
        while sid is not None:
            s = self._index.get(sid)
            if s is None:
                raise LineageCorruptError(f"{self.root}: state {chain[-1].short} names a parent {sid} that is "
                                          f"not in the store")
            chain.append(s)
            sid = s.parent
        return chain[::-1]

    def children(self, state_id: str | None) -> list[EditState]:
        return [s for s in self.states() if s.parent == state_id]

    def _cached(self, path: Path, read: Callable[[Path], Any]) -> Any:
        st = path.stat()
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        hit = self._file_cache.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = read(path)
        self._file_cache[path] = (key, value)
        return value

    def _event_records(self) -> list[tuple[Path, dict]]:
        """(file, JSON) of every event file; the dicts are shared with the cache: read them, never change them."""
        if not self.events_dir.exists():
            return []
        return [(p, self._cached(p, read_event_json)) for p in sorted(self.events_dir.glob("*.json"))]

    def _hash_file(self, path: Path) -> str:
        return self._cached(path, sha256_file)

    def _scan(self, signatures: bool = True) -> tuple[list[Event], ChainReport, dict[str, str]]:
        """The events (oldest first), their chain and the untrusted ones (file -> why); recomputed when
        an event file changes, the bindings of gate verdicts each time (their files are hashed once).
        ``signatures=False``: approval signatures left unchecked (one ssh-keygen run per approval and
        process), for readers that use no approval (the champion)."""
        records = self._event_records()
        key = tuple((p, self._file_cache[p][0]) for p, _ in records)
        if self._chain_cache is None or self._chain_cache[0] != key:
            chain = check_chain(records)
            evs = sorted((Event.from_dict(raw, p.name) for p, raw in records), key=lambda e: (e.seq, e.file))
            bad = dict(chain.bad)
            for e in evs:
                if e.file != f"{e.seq:06d}-{e.type}.json":
                    bad.setdefault(e.file, f"its file name does not match its number and type "
                                           f"({e.seq:06d}-{e.type}.json)")
                if e.type not in EVENT_TYPES:
                    bad.setdefault(e.file, f"unknown event type {e.type!r}")
            self._chain_cache = (key, (evs, chain, bad))
        evs, chain, bad = self._chain_cache[1]
        bad = dict(bad)
        for e in evs:
            if e.type == "gate" and e.file not in bad:
                why = self._binding_problem(e, evs)
                if why:
                    bad[e.file] = why
        if self.signing.on and signatures:
            self._signature_problems(evs, {p.name: raw for p, raw in records}, bad)
        return list(evs), chain, bad

    def _signature_problems(self, evs: list[Event], raws: dict[str, dict], bad: dict[str, str]) -> None:
        """With approval signing on: name each approve event whose signature is bad, and each unsigned
        one after the first good signature (the chain shows signing was on from there). Unsigned
        approvals before it (written before signing was switched on) are not named here, but do not
        count for a promotion either (:meth:`promotion_check`)."""
        first_signed = None
        for e in evs:
            if e.type != "approve" or e.file in bad:
                continue
            if e.signature is None:
                if first_signed is not None:
                    bad[e.file] = (f"it carries no approval signature, although approvals are signed since event "
                                   f"{first_signed} (lineage.approval_signing: ssh): written outside kedit or "
                                   f"with signing switched off")
                continue
            why = self.signature_problem(e, raws[e.file])
            if why:
                bad[e.file] = why
            elif first_signed is None:
                first_signed = e.seq

    def signature_problem(self, ev: Event, raw: dict) -> str | None:
        """Why an approve event's signature does not hold (None: a good signature by its ``by`` from the
        allowed signers file); checked once per event and allowed signers file content."""
        path = self.signing.allowed_signers
        signers = self._hash_file(path) if path is not None and path.is_file() else None
        key = (ev.file, ev.digest, ev.by, str(path), signers)
        if key not in self._signature_cache:
            self._signature_cache[key] = check_signature(payload(raw), raw.get("signature"), str(ev.by), path)
        return self._signature_cache[key]

    def event_problems(self) -> list[str]:
        """Everything wrong with the events, as ``verify`` names it: the chain's problems (edited,
        removed, inserted or hand-written events; numbers missing or written twice) and each untrusted
        event (a file name that does not match, a gate verdict no longer bound, a bad approval
        signature). Any of them refuses a promotion (:meth:`promotion_check`)."""
        evs, chain, bad = self._scan()
        return [*chain.problems, *(f"event {e.seq} ({e.type}, {e.file}): {bad[e.file]}" for e in evs
                                   if e.file in bad and e.file not in chain.bad)]

    def events(self) -> list[Event]:
        """Every event file, trusted or not, oldest first (see :meth:`trusted_events`)."""
        return self._scan(signatures=False)[0]

    def chain(self) -> ChainReport:
        """The hash chain over the events, checked (:mod:`kedit.lineage.chain`)."""
        return self._scan(signatures=False)[1]

    def untrusted(self) -> dict[str, str]:
        """Event file -> why it is not trusted: it fails the chain, its file name does not match its
        number and type, or (a gate verdict) it no longer matches the state or report it was bound to."""
        return self._scan()[2]

    def trusted_events(self) -> list[Event]:
        """The events the promotion rules and the champion are read from: those :meth:`untrusted` does not name."""
        evs, _, bad = self._scan()
        return [e for e in evs if e.file not in bad]

    def _binding_problem(self, ev: Event, events: list[Event]) -> str | None:
        """Why a gate verdict no longer holds for what it was recorded on (None: it does, or it predates binding).

        A verdict is bound to the sha256 of the state's record (which lists every file's hash) and of
        its report's ``gate.json``; a later verdict written into the same report folder replaces the
        report, so only the latest verdict per folder is held to it."""
        bind = ev.data.get("binding")
        if ev.digest is None and bind is None:
            return None  # written before verdicts were bound (and before the chain)
        if not isinstance(bind, dict) or "state_record" not in bind:
            return "the gate verdict is not bound to the state's record (no binding.state_record): not written by kedit"
        path = self.state_dir(ev.state) / STATE_FILE if ev.state else None
        if path is None or not path.exists():
            return f"the gate verdict names state {label(ev.state)[:12]}, which is not in the store"
        if self._hash_file(path) != bind["state_record"]:
            return f"{path} changed since the gate verdict was recorded on it (sha256 differs from the binding)"
        report = ev.data.get("report")
        files = bind.get("report_files") or {}
        later = [e for e in events if e.type == "gate" and e.seq > ev.seq and e.data.get("report") == report]
        folder = self.recorded_path(report) if report else None
        # reports/ is not versioned: in a copy of the workspace made by git + DVC the folder is absent,
        # and the verdict stands on its chained event and its state binding alone
        if folder is not None and not later and folder.is_dir():
            for name, want in files.items():
                f = folder / name
                if not f.exists():
                    return f"its report file {f} is missing"
                if self._hash_file(f) != want:
                    return f"its report file {f} changed since the verdict was recorded (sha256 differs from the binding)"
            gj = folder / "gate.json"
            if "gate.json" in files and gj.exists():
                try:
                    passed = json.loads(gj.read_text()).get("passed")
                except (OSError, json.JSONDecodeError):
                    passed = None
                if passed is not (ev.data.get("gate") or {}).get("passed"):
                    return f"its verdict (passed={(ev.data.get('gate') or {}).get('passed')}) is not the report's ({gj}: passed={passed})"
        return None

    def champion(self) -> str | None:
        """The champion: the state the last promote / rollback event chose (None: the base model).

        The one answer kedit gives (CLI, tasks, flows): read from the events, never from the
        ``CHAMPION`` file, which is only a copy for shell users."""
        ev = self.champion_event()
        return ev.state if ev else None

    def champion_event(self) -> Event | None:
        """The last trusted promote / rollback event (None: nothing was ever promoted); approval signatures
        play no part in it, and are not checked here."""
        evs, _, bad = self._scan(signatures=False)
        for ev in reversed(evs):
            if ev.type in ("promote", "rollback") and ev.file not in bad:
                return ev
        return None

    def champion_file_problem(self) -> str | None:
        """What is wrong with the ``CHAMPION`` copy, if anything (stale or missing after a promotion)."""
        if self.champion_event() is None:
            return None
        want = label(self.champion())
        path = self.root / CHAMPION_FILE
        have = path.read_text().strip() if path.exists() else None
        if have == want:
            return None
        return f"{path}: {'missing' if have is None else f'says {have[:12]!r}'}, the events say {want[:12]!r}"

    def write_champion_file(self) -> None:
        """Rewrite the ``CHAMPION`` copy from the events."""
        if self.champion_event() is not None:
            write_text_atomic(self.root / CHAMPION_FILE, label(self.champion()) + "\n")

    def editor_state(self, state_id: str) -> EditorState:
        """The editor's persistent state after ``state_id`` (files checked against their hashes)."""
        s = self.get(state_id)
        d = self.state_dir(s.id)
        self._check_file(s, EDITOR_META_FILE)
        meta = json.loads((d / EDITOR_META_FILE).read_text())
        tensors: dict[str, torch.Tensor] = {}
        if EDITOR_TENSORS_FILE in s.files:
            self._check_file(s, EDITOR_TENSORS_FILE)
            tensors = _load_safetensors(d / EDITOR_TENSORS_FILE)
        return EditorState(method=s.editor_state["method"], tensors=tensors, meta=meta)

    def deltas(self, state_id: str) -> dict[str, torch.Tensor]:
        s = self.get(state_id)
        return _load_safetensors(self.state_dir(s.id) / DELTAS_FILE)

    def _check_file(self, s: EditState, name: str) -> None:
        path = self.state_dir(s.id) / name
        if not path.exists():
            raise LineageCorruptError(f"{path}: missing (state {s.short} records it)")
        actual = sha256_file(path)
        if actual != s.files[name]:
            raise LineageCorruptError(f"{path}: sha256 {actual[:12]} does not match the recorded "
                                      f"{s.files[name][:12]} (corrupt or modified)")

    # --- tensors of a state (store only; the model is not needed) ------------------------------------
    def _base_tensors(self, s: EditState, names: list[str], verify: bool = True) -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            path = self.base_dir / s.base_model_hash / f"{n}.safetensors"
            if not path.exists():
                raise LineageCorruptError(f"{path}: base tensor {n} missing (needed by state {s.short})")
            t = _load_safetensors(path)["tensor"]
            if verify and sha256_tensor(t) != s.base_sha256[n]:
                raise LineageCorruptError(f"{path}: base tensor {n} does not match its recorded sha256")
            out[n] = t
        return out

    def tensors(self, state_id: str | None, verify: bool = True) -> dict[str, torch.Tensor]:
        """Every tensor edited on the path to ``state_id``, after it: replayed from the nearest snapshot."""
        if state_id is None:
            return {}
        out = self._take_tensors(state_id, verify)
        self._cache = (self.resolve(state_id), out)
        return {k: v.clone() for k, v in out.items()}

    def _take_tensors(self, state_id: str, verify: bool = True) -> dict[str, torch.Tensor]:
        """Like :meth:`tensors` but hands over the cached dict itself (the caller may modify it)."""
        target = self.get(state_id)
        if self._cache is not None and self._cache[0] == target.id:
            out, self._cache = self._cache[1], None
            return out
        chain = self.path(target.id)
        start = max((i for i, s in enumerate(chain) if s.snapshot), default=-1)
        if start >= 0:
            snap = chain[start]
            cur = _load_safetensors(self.state_dir(snap.id) / SNAPSHOT_FILE)
            if set(cur) != set(snap.tensor_sha256):
                raise LineageCorruptError(f"{self.state_dir(snap.id) / SNAPSHOT_FILE}: holds {sorted(cur)}, "
                                          f"the record lists {sorted(snap.tensor_sha256)}")
        else:
            cur = {}
        missing = [n for n in target.tensor_sha256 if n not in cur]
        cur.update(self._base_tensors(target, missing, verify=False))  # the final check covers them
        for s in chain[start + 1:]:
            deltas = _load_safetensors(self.state_dir(s.id) / DELTAS_FILE)
            for n, d in deltas.items():
                if n not in cur:
                    raise LineageCorruptError(f"{self.state_dir(s.id) / DELTAS_FILE}: delta for {n} "
                                              f"which the record does not list")
                cur[n].add_(d.to(cur[n].dtype))  # the same op, dtype and order as apply_deltas
        if verify:
            bad = [n for n, h in target.tensor_sha256.items() if sha256_tensor(cur[n]) != h]
            if bad:
                raise LineageCorruptError(self._diagnose(chain[start if start >= 0 else 0:], target, bad))
        return cur

    def _diagnose(self, chain: list[EditState], target: EditState, bad: list[str]) -> str:
        """Name the files that make a replay miss its recorded hashes."""
        culprits = []
        for s in chain:
            for name in (DELTAS_FILE, SNAPSHOT_FILE):
                if name in s.files:
                    try:
                        self._check_file(s, name)
                    except LineageCorruptError as exc:
                        culprits.append(str(exc))
        for n in bad:
            if n in target.base_sha256:
                try:
                    self._base_tensors(target, [n])
                except LineageCorruptError as exc:
                    culprits.append(str(exc))
        where = "; ".join(culprits) if culprits else "no file differs from its recorded hash (replay mismatch)"
        return f"state {target.short}: tensors {bad} do not match their recorded sha256: {where}"

    def materialise(self, state_id: str | None, lm: Any) -> EditorState | None:
        """Put ``lm`` (loaded from the base model) into ``state_id``, in place, and verify it bit for bit.

        Tensors edited anywhere in the lineage but not on this state's path are reset to the base
        model's values, so this works whatever state the model was in. Returns the editor state to
        continue from (None for ``state_id=None``, the base model).
        """
        m = _Model(lm)
        target = self.get(state_id) if state_id else None
        if target and target.base_model_hash != m.base_hash:
            raise LineageError(f"state {target.short} was made on base model {target.base_model_slug} "
                               f"({target.base_model_hash[:12]}), not on {m.slug} ({m.base_hash[:12]})")
        values = self._take_tensors(target.id) if target else {}
        others = self._base_for(m.base_hash, self._all_edited(m.base_hash) - set(values))
        for n, t in {**values, **others}.items():
            if n not in m.params:
                raise LineageError(f"state {target.short if target else 'base'}: model has no parameter {n}")
            if tuple(t.shape) != tuple(m.params[n].shape) or t.dtype != m.params[n].dtype:
                raise LineageError(f"{n}: stored {tuple(t.shape)} {t.dtype}, model has "
                                   f"{tuple(m.params[n].shape)} {m.params[n].dtype}")
        with torch.no_grad():
            for n, t in {**values, **others}.items():
                m.params[n].copy_(t)  # same shape and dtype: an exact copy of the verified tensors
        from kedit.editors.registry import attach_state

        state = self.editor_state(target.id) if target else None
        attach_state(lm, state)  # added parameters (T-Patcher's patches) live in the editor state
        if target:
            self._cache = (target.id, values)
        return state

    def _all_edited(self, base_hash: str) -> set[str]:
        d = self.base_dir / base_hash
        return {p.name[: -len(".safetensors")] for p in d.glob("*.safetensors")} if d.exists() else set()

    def _base_for(self, base_hash: str, names: set[str]) -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            out[n] = _load_safetensors(self.base_dir / base_hash / f"{n}.safetensors")["tensor"]
        return out

    # --- writing -------------------------------------------------------------------------------
    def commit(self, base_lm_or_model: Any, result: EditResult, parent: str | None, feed: dict,
               hparams: dict, evaluation: dict | None = None, predictions: dict | None = None,
               applied: bool | None = None) -> EditState:
        """Record ``result`` as a new state on top of ``parent`` and return it.

        The model may hold the parent state's weights (deltas not applied yet) or the weights after
        ``apply_deltas`` (the usual order: apply, evaluate, commit); the store tells which by comparing
        bits, or ``applied`` says it. The recorded weights are computed from the store, not read from
        the model, so the record is exact either way. Committing the same content twice returns the
        existing state.
        """
        m = _Model(base_lm_or_model)
        if not result.deltas and not result.state.tensors:  # added-capacity editors change no weight
            raise ValueError("commit: the edit result has no deltas and no editor state tensors")
        for n, d in result.deltas.items():
            if n not in m.params:
                raise KeyError(f"commit: delta for unknown parameter {n!r}")
            if tuple(d.shape) != tuple(m.params[n].shape):
                raise ValueError(f"commit: delta for {n} has shape {tuple(d.shape)}, parameter has "
                                 f"{tuple(m.params[n].shape)}")
        deltas = {n: d.detach().to("cpu").contiguous() for n, d in sorted(result.deltas.items())}
        with self.lock():
            self._refresh()
            ps = self.get(parent) if parent else None
            if ps and ps.base_model_hash != m.base_hash:
                raise LineageError(f"commit: parent {ps.short} was made on base model {ps.base_model_slug} "
                                   f"({ps.base_model_hash[:12]}), this model is {m.slug} ({m.base_hash[:12]})")
            start = self._take_tensors(ps.id) if ps else {}
            base_sha = dict(ps.base_sha256) if ps else {}
            new = [n for n in deltas if n not in start]
            base_new, applied = self._base_values(m, new, deltas, start, applied)
            for n, t in base_new.items():
                base_sha[n] = sha256_tensor(t)
                start[n] = t.clone()
            post = start  # advanced in place: the parent's tensors are not needed afterwards
            for n, d in deltas.items():
                post[n].add_(d.to(post[n].dtype))
            es = result.state
            record = dict(
                parent=ps.id if ps else None, base_model_hash=m.base_hash, base_model_slug=m.slug,
                feed=_jsonable(feed, "feed"), method=es.method, hparams=_jsonable(hparams, "hparams"),
                deltas={n: tensor_info(d) for n, d in deltas.items()},
                editor_state={"method": es.method,
                              "tensors": {k: tensor_info(v) for k, v in sorted(es.tensors.items())},
                              "meta_sha256": sha256_json(_jsonable(es.meta, "editor state meta"))},
                tensor_sha256={n: sha256_tensor(t) for n, t in sorted(post.items())},
                base_sha256=dict(sorted(base_sha.items())),
                evaluation=_jsonable(evaluation, "evaluation"), predictions=_jsonable(predictions, "predictions"),
                n_edits=_count_edits(feed, result),
            )
            probe = EditState(id="", **record)
            sid = EditState.compute_id(probe.content())
            if sid in self._index:
                return self._index[sid]
            depth = (ps.depth + 1) if ps else 1
            snapshot = depth % self.snapshot_every == 0
            seq = 1 + max((s.seq for s in self._index.values()), default=0)

            for n, t in base_new.items():  # outside the state folder; content-addressed by model and name
                path = self.base_dir / m.base_hash / f"{n}.safetensors"
                if not path.exists():
                    save_tensors_atomic(path, {"tensor": t})
            self._step("base")
            stage = self.root / ".staging" / f"{sid}.{uuid.uuid4().hex[:8]}"
            stage.mkdir(parents=True)
            save_tensors_atomic(stage / DELTAS_FILE, deltas, metadata={"state": sid})
            self._step("deltas")
            if es.tensors:
                save_tensors_atomic(stage / EDITOR_TENSORS_FILE,
                                    {k: v.detach().cpu() for k, v in es.tensors.items()})
            write_json_atomic(stage / EDITOR_META_FILE, es.meta)
            self._step("editor_state")
            if snapshot:
                save_tensors_atomic(stage / SNAPSHOT_FILE, post, metadata={"state": sid})
            self._step("snapshot")
            files = {p.name: sha256_file(p) for p in sorted(stage.iterdir())}
            state = EditState(id=sid, **record, depth=depth, seq=seq, created_at=_now(), snapshot=snapshot,
                              files=files)
            write_json_atomic(stage / STATE_FILE, state.to_dict())  # the manifest, last
            fsync_dir(stage)
            self._step("manifest")
            self.states_dir.mkdir(parents=True, exist_ok=True)
            dest = self.state_dir(sid)
            if dest.exists():  # a folder without a manifest cannot be published; nothing reads it
                shutil.rmtree(dest)
            os.replace(stage, dest)
            fsync_dir(self.states_dir)
            self._step("publish")
            self._index[sid] = state
            self._index_key = None
            self._cache = (sid, post)
            return state

    def _base_values(self, m: _Model, new: list[str], deltas: dict[str, torch.Tensor],
                     start: dict[str, torch.Tensor], applied: bool | None
                     ) -> tuple[dict[str, torch.Tensor], bool]:
        """Exact base values of tensors this lineage has not edited before, and whether deltas are applied.

        Sources, in order: the store's base cache, the model store's safetensors files, the model
        itself (checked against the base model's content digest when there are no files)."""
        base: dict[str, torch.Tensor] = {}
        for n in new:
            p = self.base_dir / m.base_hash / f"{n}.safetensors"
            if p.exists():
                base[n] = _load_safetensors(p)["tensor"]
        base.update(m.read_file_tensors([n for n in new if n not in base]))
        known = {**start, **base}
        with torch.no_grad():
            for n, d in deltas.items():
                if n not in known:
                    continue
                cur = m.params[n].detach().cpu()
                pre = torch.equal(cur, known[n])
                post = torch.equal(cur, known[n] + d.to(known[n].dtype))
                if not pre and not post:
                    raise LineageError(f"commit: model weight {n} is neither at the parent state nor at parent + "
                                       f"deltas; materialise the parent state before editing")
                if pre != post:
                    if applied is not None and applied != post:
                        raise LineageError(f"commit: applied={applied}, but weight {n} says otherwise")
                    applied = post
        unknown = [n for n in new if n not in base]
        if unknown:
            cur = {n: m.params[n].detach().cpu().clone() for n in unknown}
            if m.files:
                raise LineageError(f"commit: base tensors {unknown} not found in {m.path}")
            candidates = [applied] if applied is not None else [False, True]
            for mode in candidates:
                guess = {n: (cur[n] - deltas[n].to(cur[n].dtype)) if mode else cur[n] for n in unknown}
                if mode and any(not torch.equal(guess[n] + deltas[n].to(cur[n].dtype), cur[n]) for n in unknown):
                    continue
                if m.digest(guess) == m.base_hash:
                    base.update(guess)
                    applied = mode
                    break
            else:
                raise LineageError(f"commit: cannot recover the base values of {unknown} exactly from the in-memory "
                                   f"model; commit before apply_deltas, or load the model from the model store")
        return base, bool(applied)

    # --- events ---------------------------------------------------------------------------------
    def next_seq(self) -> int:
        return 1 + max((e.seq for e in self.events()), default=0)

    def _event(self, type_: str, state_id: str | None, by: str, comment: str = "",
               data: dict | None = None, key: str | Path | None = None) -> Event:
        if type_ not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type_!r}")
        check_texts(type_, by, comment)
        signer = find_key(key, cwd=self.root.parent) if type_ == "approve" and self.signing.on else None
        with self.lock(f"{type_} {label(state_id)[:12]}"):
            sid = self.resolve(state_id) if state_id else None
            chain = self.chain()
            seq = chain.last_seq + 1
            ev = Event(seq=seq, type=type_, state=sid, by=str(by), at=_now(), comment=comment,
                       data=_jsonable(data or {}, f"{type_} data"), actor=current_actor().to_dict())
            raw = seal(ev.to_dict(), chain.head)
            if signer is not None:
                raw = seal({**raw, "signature": self._sign(raw, signer)}, chain.head)
            self._create_event_file(seq, type_, raw)
            ev = Event.from_dict(raw, f"{seq:06d}-{type_}.json")
            if type_ in ("promote", "rollback"):
                self.write_champion_file()
            return ev

    def _sign(self, raw: dict, key: Path) -> dict:
        """The approver's signature over ``raw`` (sealed, unsigned), checked against the allowed signers
        before anything is written: an approval that would not count is refused here."""
        sig = sign(payload(raw), key, str(raw["by"]))
        why = check_signature(payload(raw), sig, str(raw["by"]), self.signing.allowed_signers)
        if why:
            raise SigningError(f"approve: signed with {key}, but the signature {why.removeprefix('its signature ')}: "
                               f"the approval would not count, so it was not recorded. The allowed signers file "
                               f"must list {raw['by']!r} with this key's public half ({key}.pub), or sign with the "
                               f"key it lists for {raw['by']!r}")
        return sig

    def _create_event_file(self, seq: int, type_: str, raw: dict) -> None:
        """Write ``events/<seq>-<type>.json`` exclusively: complete (temp file + fsync) and never over
        another event (``link`` fails on an existing name, as ``O_EXCL`` does), nor beside another
        event with the same number. Under the lock neither can happen; this is what keeps a number
        from being written twice if the lock ever failed (a filesystem that ignores flock)."""
        self.events_dir.mkdir(parents=True, exist_ok=True)
        dest = self.events_dir / f"{seq:06d}-{type_}.json"
        taken = sorted(p.name for p in self.events_dir.glob(f"{seq:06d}-*.json"))
        if taken:
            raise LineageError(f"event {seq} exists already ({', '.join(taken)}): another writer wrote it; "
                               f"nothing was written, try again")
        tmp = self.events_dir / f".{seq:06d}-{type_}.{uuid.uuid4().hex[:8]}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(raw, indent=2, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, dest)
            except FileExistsError:
                raise LineageError(f"event {seq} exists already ({dest.name}): another writer wrote it; nothing "
                                   f"was written, try again") from None
            fsync_dir(self.events_dir)
        finally:
            tmp.unlink(missing_ok=True)

    def promotion_check(self, state_id: str, by: str | None = None, distinct: bool | None = None) -> Check:
        """The promotion rules (:mod:`kedit.lineage.policy`) for ``state_id`` over the trusted events
        (a refusal names the state's untrusted events and why), and one more: no problem anywhere in
        the events (:meth:`event_problems`, what ``verify`` names), since one event written outside
        kedit makes every event suspect. With approval signing on, only signed approvals count.
        ``by``: who would promote; with ``distinct`` (None: ``require_distinct_approver``) the approval
        must come from another account."""
        state = self.get(state_id)
        problems = self.event_problems()
        events, _, bad = self._scan()
        sealed = any(e.type == "seal" and e.digest and e.file not in bad for e in events)  # a seal is chained
        for e in events:  # verdicts and approvals from before the chain count once `kedit lineage seal` vouched
            if e.digest is None and e.type in ("gate", "approve") and not sealed and e.file not in bad:
                bad[e.file] = ("it was written before the event chain and no `kedit lineage seal` has vouched for "
                               "those events (check them, then seal; or gate / approve again)")
            if self.signing.on and e.type == "approve" and e.signature is None and e.file not in bad:
                bad[e.file] = (f"it carries no approval signature (lineage.approval_signing: ssh; written before "
                               f"signing was on, or outside kedit): approve again with your key (`kedit lineage "
                               f"approve {state.short} --key PATH`)")
        distinct = self.require_distinct_approver if distinct is None else distinct
        promoter = accounts(by, current_actor().to_dict()) if by and distinct else None
        check = promotion_check([e for e in events if e.file not in bad], state, promoter=promoter)
        if problems:  # any event kedit did not write as it stands: nothing read from the events is trusted
            check.unmet.insert(0, "the lineage events fail their check (`kedit lineage verify` names the same), and "
                               "no promotion goes ahead while they do: " + "; ".join(problems) + ". kedit never "
                               "writes such events: find out who wrote or changed them; restore lineage/events/ "
                               "from the git + DVC history, or move the named files out of lineage/events/ when "
                               "they are the last events (`kedit lineage seal` is only for events written before "
                               "the chain, `kedit lineage gate` records a fresh verdict)")
        if check.unmet:  # say why events that would have met a rule did not count
            check.unmet.extend(f"event {e.seq} ({e.type} of {state.short}, {e.file}) is not trusted and does not "
                               f"count: {bad[e.file]}" for e in events if e.file in bad and e.state == state.id)
        return check

    def rollback_check(self, state_id: str | None) -> Check:
        self._refresh()
        return rollback_check(self.trusted_events(), dict(self._index), self.resolve(state_id) if state_id else None)

    def promote(self, state_id: str, by: str, comment: str = "", override: str | None = None,
                data: dict | None = None) -> Event:
        """Record that ``state_id`` is the champion, if the promotion rules are met.

        Rules: a passed gate verdict for this state against its parent, then an approval (see
        :mod:`kedit.lineage.policy`). ``override`` (a reason) goes past unmet rules and is recorded
        as an ``override`` event before the promotion. This writes the store event only; use
        :func:`kedit.lineage.ops.promote` to move git, DVC and MLflow with it under the same lock.
        """
        check_texts("promote", by, comment, reason=override)
        with self.lock(f"promote {state_id[:12]}"):
            sid = self.resolve(state_id)
            check = self.promotion_check(sid, by=by)
            extra = {"gate_event": check.gate_event, "approval_event": check.approval_event}
            extra.update(self._override("promote", sid, by, check, override))
            return self._event("promote", sid, by, comment, {"previous": self.champion(), **extra, **(data or {})})

    def rollback(self, state_id: str | None, by: str, reason: str, override: bool = False,
                 data: dict | None = None) -> Event:
        """Make an earlier state (None: the base model) the champion again; the next edits branch from it.

        The target must be the base model, a former champion or an ancestor of one; ``override=True``
        goes past that with ``reason`` recorded as an ``override`` event. Store event only: see
        :func:`kedit.lineage.ops.rollback`."""
        if not reason or not reason.strip():
            raise ValueError("rollback: give a reason")
        check_texts("rollback", by, reason=reason)
        state_id = None if state_id == BASE else state_id
        with self.lock(f"rollback {label(state_id)[:12]}"):
            sid = self.resolve(state_id) if state_id else None
            extra = self._override("rollback", sid, by, self.rollback_check(sid), reason if override else None)
            return self._event("rollback", sid, by, reason, {"previous": self.champion(), **extra, **(data or {})})

    def _override(self, action: str, sid: str | None, by: str, check: Check, reason: str | None) -> dict:
        """Refuse an unmet rule, or record the override (with the rules it skipped) and name it."""
        if check.ok:
            return {}
        if not reason or not reason.strip():
            raise refusal(action, sid, check)
        ev = self._event("override", sid, by, reason, {"action": action, "unmet": check.unmet,
                                                         "gate_event": check.gate_event})
        return {"override_event": ev.seq}

    def seal(self, by: str, comment: str = "") -> Event:
        """Vouch for the events written before the chain (a one-shot migration): a ``seal`` event, chained
        over all of them, after which their gate verdicts and approvals count for promotions again."""
        with self.lock("seal"):
            chain = self.chain()
            if not chain.legacy:
                raise LineageError(f"{self.root}: no events from before the event chain; nothing to seal")
            if any(e.type == "seal" and e.digest for e in self.trusted_events()):
                raise LineageError(f"{self.root}: the events from before the chain are sealed already")
            if chain.problems:
                raise LineageError(f"{self.root}: the events fail their check; not sealing them: "
                                   + "; ".join(chain.problems))
            return self._event("seal", None, by, comment, {"sealed_events": chain.legacy,
                                                           "first_chained": chain.first_chained})

    def approve(self, state_id: str, by: str, comment: str = "", key: str | Path | None = None) -> Event:
        """Record a reviewer's approval (a separate event from the promotion it allows). With approval
        signing on, it is signed with the approver's SSH key (``key``, else ``$KEDIT_SIGNING_KEY``, else
        git's ``user.signingkey``) and refused, with nothing written, unless the allowed signers file
        accepts the signature for ``by``."""
        return self._event("approve", state_id, by, comment, key=key)

    def reject(self, state_id: str, by: str, comment: str = "") -> Event:
        """Record that a candidate was not promoted (a reviewer said no, its gate failed, or the
        approval timed out); the champion does not move."""
        return self._event("reject", state_id, by, comment or "rejected")

    def record_gate(self, state_id: str, gate: dict, against: str | None, by: str = "kedit-gate",
                    report: str | None = None) -> Event:
        """Attach a gate verdict (a JSON dict, e.g. {"passed": true, ...}) to a state.

        ``against``: the state the candidate was compared with (None: the base model); a verdict
        counts for promotion only when that is the state's parent. ``report``: the gate report folder,
        where a later override is noted."""
        sid = self.resolve(state_id)
        data: dict[str, Any] = {"gate": gate, "against": self.resolve(against) if against else None}
        binding: dict[str, Any] = {"state_record": sha256_file(self.state_dir(sid) / STATE_FILE)}
        if report:
            data["report"] = str(report)
            folder = self.recorded_path(report)
            binding["report_files"] = {n: sha256_file(folder / n) for n in ("gate.json",) if (folder / n).is_file()}
        data["binding"] = binding  # what verify and the promotion rules re-hash (see _binding_problem)
        return self._event("gate", sid, by, "", data)

    # --- views ----------------------------------------------------------------------------------
    def log(self) -> list[LogEntry]:
        """Every state with its children, last gate verdict, approvals and champion flag."""
        states = self.states()
        events, _, bad = self._scan()
        trusted = [e for e in events if e.file not in bad]
        champ = self.champion()
        done_overrides = {e.data.get("override_event") for e in trusted if e.type in ("promote", "rollback")}
        kids: dict[str | None, list[str]] = {}
        for s in states:
            kids.setdefault(s.parent, []).append(s.id)
        out = []
        for s in states:
            evs = [e for e in trusted if e.state == s.id]
            gates = [e.data.get("gate") for e in evs if e.type == "gate"]
            overrides = [e for e in evs if e.type == "override"]
            out.append(LogEntry(state=s, children=kids.get(s.id, []), champion=s.id == champ,
                                gate=gates[-1] if gates else None,
                                approvals=[e for e in evs if e.type == "approve"],
                                promoted=any(e.type == "promote" for e in evs),
                                promotions=[e for e in evs if e.type in ("promote", "rollback")],
                                overrides=[e for e in overrides if e.seq in done_overrides],
                                unfinished_overrides=[e for e in overrides if e.seq not in done_overrides],
                                untrusted={e.file: bad[e.file] for e in events if e.state == s.id and e.file in bad}))
        return out

    def branches(self) -> list[list[str]]:
        """Every root-to-leaf path (each leaf is the tip of a branch)."""
        states = self.states()
        parents = {s.parent for s in states}
        return [[x.id for x in self.path(s.id)] for s in states if s.id not in parents]

    def facts(self, state_id: str | None) -> dict[str, str]:
        """Row id -> feed file hash of every fact applied on the path to ``state_id`` (less those a later
        state retracted: its feed lists them under ``retracted``, see :mod:`kedit.lineage.retract`)."""
        out: dict[str, str] = {}
        for s in self.path(state_id) if state_id else []:
            for rid in s.feed.get("row_ids", []) or []:
                out[str(rid)] = s.feed.get("file_sha256", "")
            for rid in s.feed.get("retracted", []) or []:
                out.pop(str(rid), None)
        return out

    def fact_records(self, state_id: str | None) -> list[dict]:
        """The feed records (``feed["facts"]``) of every fact applied on the path to ``state_id``, in
        order, less those a later state on the path retracted (what retention gates and the feed's
        already-applied check must see)."""
        out: list[dict] = []
        for s in self.path(state_id) if state_id else []:
            out.extend(s.feed.get("facts", []) or [])
            gone = {str(r) for r in s.feed.get("retracted", []) or []}
            if gone:
                out = [f for f in out if str(f.get("id")) not in gone]
        return out

    def diff(self, a: str | None, b: str | None) -> dict[str, Any]:
        """Facts added / removed going from state ``a`` to ``b`` and the per-tensor weight change."""
        fa, fb = self.facts(a), self.facts(b)
        ta = self.tensors(a) if a else {}
        tb = self.tensors(b) if b else {}
        names = sorted(set(ta) | set(tb))
        sa = self.get(a) if a else None
        sb = self.get(b) if b else None
        ref = sb or sa
        base = self._base_tensors(ref, [n for n in names if n not in ta or n not in tb]) if ref else {}
        norms = {}
        for n in names:
            x, y = ta.get(n, base.get(n)), tb.get(n, base.get(n))
            norms[n] = {"delta_norm": float((y.double() - x.double()).norm()), "weight_norm": float(y.double().norm())}
        pa = [s.id for s in self.path(a)] if a else []
        pb = [s.id for s in self.path(b)] if b else []
        common = [x for x, y in zip(pa, pb) if x == y]
        return {"from": a, "to": b, "common_ancestor": common[-1] if common else None,
                "added": sorted(set(fb) - set(fa)), "removed": sorted(set(fa) - set(fb)),
                "modules": norms}

    # --- verification ---------------------------------------------------------------------------
    def verify(self, deep: bool = True, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """Re-hash every file, check every record and (``deep``) replay every state against its tensor hashes."""
        rep = VerifyReport()
        if not self.root.exists():
            rep.problems.append(f"{self.root}: no lineage store here")
            return rep
        valid: dict[str, EditState] = {}
        for d in sorted(self.states_dir.iterdir()) if self.states_dir.exists() else []:
            try:
                s = EditState.from_file(d / STATE_FILE)
            except (LineageCorruptError, FileNotFoundError) as exc:
                rep.problems.append(str(exc) if not isinstance(exc, FileNotFoundError)
                                    else f"{d}: folder without {STATE_FILE}")
                continue
            rep.states += 1
            ok = True
            for name in s.files:
                rep.files += 1
                try:
                    self._check_file(s, name)
                except LineageCorruptError as exc:
                    rep.problems.append(str(exc))
                    ok = False
            extra = sorted({p.name for p in d.iterdir()} - set(s.files) - {STATE_FILE})
            if extra:
                rep.problems.append(f"{d}: files not in the record: {extra}")
            if ok:
                valid[s.id] = s
        for s in valid.values():
            if s.parent and s.parent not in valid:
                rep.problems.append(f"state {s.short}: parent {str(s.parent)[:12]} missing or invalid")
        for h in sorted(self.base_dir.glob("*/*.safetensors")) if self.base_dir.exists() else []:
            rep.files += 1
            want = {s.base_sha256.get(h.stem) for s in valid.values() if s.base_model_hash == h.parent.name} - {None}
            try:
                got = sha256_tensor(_load_safetensors(h)["tensor"])
            except (LineageCorruptError, KeyError) as exc:
                rep.problems.append(f"{h}: {exc}")
                continue
            if want and got not in want:
                rep.problems.append(f"{h}: base tensor does not match the sha256 recorded by the states")
        try:
            evs = self.events()
            chain = self.chain()
            bad = self.untrusted()
            problems = self.event_problems()
        except LineageCorruptError as exc:
            rep.problems.append(str(exc))
            evs, chain, bad, problems = [], None, {}, []
        for e in evs:
            if e.state and e.state not in valid:
                rep.problems.append(f"event {e.seq} ({e.type}) names unknown or invalid state {e.state[:12]}")
        rep.problems.extend(problems)
        if chain is not None:
            seals = [e for e in evs if e.type == "seal" and e.digest and e.file not in bad]
            sealed_by = f"event {seals[0].seq} (seal by {escape_text(seals[0].by)})" if seals else None
            if chain.note(sealed_by):
                rep.notes.append(chain.note(sealed_by))
        unsigned = [e.seq for e in evs if self.signing.on and e.type == "approve" and e.signature is None
                    and e.file not in bad]
        if unsigned:
            rep.notes.append(f"{len(unsigned)} approve events (first {unsigned[0]}, last {unsigned[-1]}) carry no "
                             f"approval signature: written before lineage.approval_signing was on; they do not "
                             f"count for a promotion")
        if deep and not rep.problems:
            self._deep_verify(list(valid.values()), rep, progress)
        return rep

    def _deep_verify(self, states: list[EditState], rep: VerifyReport,
                     progress: Callable[[int, int], None] | None) -> None:
        """Replay the whole tree depth first, one delta per state, comparing every tensor hash."""
        kids: dict[str | None, list[EditState]] = {}
        for s in sorted(states, key=lambda s: s.seq):
            kids.setdefault(s.parent, []).append(s)
        stack: list[tuple[EditState, dict[str, torch.Tensor]]] = [(s, {}) for s in reversed(kids.get(None, []))]
        done = 0
        while stack:
            s, cur = stack.pop()
            try:
                missing = [n for n in s.tensor_sha256 if n not in cur]
                cur.update(self._base_tensors(s, missing, verify=False))
                for n, d in _load_safetensors(self.state_dir(s.id) / DELTAS_FILE).items():
                    cur[n].add_(d.to(cur[n].dtype))
                bad = [n for n, h in s.tensor_sha256.items() if sha256_tensor(cur[n]) != h]
                rep.tensors += len(s.tensor_sha256)
                if bad:
                    rep.problems.append(f"state {s.short}: replayed tensors {bad} do not match their recorded sha256")
                    continue
                if s.snapshot:
                    snap = _load_safetensors(self.state_dir(s.id) / SNAPSHOT_FILE)
                    if any(not torch.equal(snap.get(n, torch.empty(0)), cur[n]) for n in cur):
                        rep.problems.append(f"{self.state_dir(s.id) / SNAPSHOT_FILE}: differs from the replay")
            except LineageCorruptError as exc:
                rep.problems.append(str(exc))
                continue
            done += 1
            if progress:
                progress(done, len(states))
            children = kids.get(s.id, [])
            for i, c in enumerate(reversed(children)):
                stack.append((c, cur if i == len(children) - 1 else {k: v.clone() for k, v in cur.items()}))


def check_texts(action: str, by: str, comment: str = "", reason: str | None = None) -> None:
    """Refuse an event's free text before anything is written: a missing name, or control characters."""
    if not by or not str(by).strip():
        raise ValueError(f"{action}: say who does it (by=...)")
    check_text(f"{action}: by", str(by))
    check_text(f"{action}: comment", comment, allow_newlines=True)
    check_text(f"{action}: reason", reason, allow_newlines=True)


def pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _jsonable(obj: Any, what: str) -> Any:
    """Round-trip through JSON so records hold only plain data (and fail here, naming the field)."""
    if obj is None:
        return None
    try:
        return json.loads(json.dumps(obj, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"commit: {what} must be JSON-serialisable ({exc})") from exc


def _count_edits(feed: dict, result: EditResult) -> int:
    rows = (feed or {}).get("row_ids")
    if rows:
        return len(rows)
    return len(result.diagnostics)
