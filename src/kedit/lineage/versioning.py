"""Git + DVC versioning of a workspace: ``lineage/``, ``models/`` and ``stats/`` are DVC-tracked data,
each promoted state is a git commit and a tag ``kedit/state/<id>``, so ``git checkout <tag> && dvc
checkout`` restores that state's files. kedit's own rollback does not need this (the lineage store
keeps every state); it is how the files travel and how a past workspace is reproduced elsewhere.

DVC and git run as subprocesses (``dvc`` from this interpreter's environment): their CLIs are
stable, and nothing of theirs is imported into kedit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kedit.lineage.state import LineageError
from kedit.safepath import check_links, check_target
from kedit.workspace import Workspace

TRACKED = ("lineage", "models", "stats")
TAG_PREFIX = "kedit/state/"
CHAIN_MARK = re.compile(r"\[kedit event (\d+)\] \[kedit chain ([0-9a-f]{64})\]")
DVCIGNORE = ["lineage/.lock", "lineage/.staging/", "lineage/.intent.json"]
DEFAULT_REMOTE = ".dvc-remote"
GITIGNORE = ["mlflow.db", "mlartifacts/", ".dvc-remote/", ".kedit-cache/", "reports/", ".stack/"]


def _dvc_bin() -> str:
    cand = Path(sys.executable).parent / "dvc"
    return str(cand) if cand.exists() else (shutil.which("dvc") or "dvc")


def state_tag(state_id: str) -> str:
    return f"{TAG_PREFIX}{state_id[:12]}"


@dataclass
class Versioning:
    """The workspace as a git + DVC repository with a default local DVC remote (a directory).

    ``remote`` may be any DVC remote URL (``s3://...``, ``gs://...``, ``azure://...``); a plain path
    (default ``<workspace>/.dvc-remote``) works out of the box.
    """

    ws: Workspace
    remote: str | None = None
    remote_name: str = "kedit"
    sign: bool = False  # params.yaml lineage.sign_commits: `git commit -S` with git's configured signing key
    # workspace files committed with every snapshot when present (the allowed signers file of approval signing)
    track: tuple[str, ...] = ()

    @property
    def root(self) -> Path:
        return self.ws.root

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"})
        return env

    def git(self, *args: str, check: bool = True) -> str:
        p = subprocess.run(["git", *args], cwd=self.root, capture_output=True, text=True, env=self._env())
        if check and p.returncode != 0:
            raise LineageError(f"git {' '.join(args)} failed in {self.root}: {p.stderr.strip() or p.stdout.strip()}")
        return p.stdout.strip()

    def dvc(self, *args: str, check: bool = True) -> str:
        p = subprocess.run([_dvc_bin(), *args], cwd=self.root, capture_output=True, text=True, env=self._env())
        if check and p.returncode != 0:
            raise LineageError(f"dvc {' '.join(args)} failed in {self.root}: {p.stderr.strip() or p.stdout.strip()}")
        return p.stdout.strip()

    @property
    def initialised(self) -> bool:
        return (self.root / ".git").exists() and (self.root / ".dvc").is_dir()

    def remote_url(self) -> str:
        """The remote as configured, else ``.dvc-remote`` inside the workspace. A relative path is
        relative to the workspace (DVC stores it relative to ``.dvc/``), so the committed config holds
        no absolute path and a copy or clone of the workspace uses its own remote."""
        return self.remote or DEFAULT_REMOTE

    def configured_remote(self) -> str | None:
        """The remote's URL exactly as ``.dvc/config`` holds it (relative paths relative to ``.dvc/``)."""
        import configparser

        cfg = configparser.ConfigParser()
        path = self.root / ".dvc" / "config"
        if not path.exists():
            return None
        cfg.read(path)
        for section in (f"'remote \"{self.remote_name}\"'", f'remote "{self.remote_name}"'):
            if cfg.has_option(section, "url"):
                return cfg.get(section, "url")
        return None

    def _check_remote(self) -> bool:
        """An absolute default remote written by an older kedit: this workspace's own ``.dvc-remote``
        becomes the relative path (True: config changed); another folder's is refused, since pushing
        there would write into the workspace this one was copied from."""
        url = self.configured_remote()
        if self.remote is not None or not url or "://" in url or not Path(url).is_absolute():
            return False
        own = self.root / DEFAULT_REMOTE
        if Path(url).resolve() == own.resolve():
            self.dvc("remote", "modify", self.remote_name, "url", DEFAULT_REMOTE)
            return True
        if Path(url).name == DEFAULT_REMOTE:
            raise LineageError(
                f"{self.root / '.dvc' / 'config'}: DVC remote {self.remote_name!r} is {url}, another workspace's "
                f"default remote (a workspace made by an older kedit, then copied or moved); pushing would write "
                f"into that folder. Point it at this workspace's own remote (`dvc remote modify {self.remote_name} "
                f"url {DEFAULT_REMOTE}` in {self.root}) or set lineage.dvc_remote in params.yaml")
        return False

    def ensure(self) -> None:
        """git init + dvc init + the default remote, each only if absent; the remote config is committed
        before any data (``dvc.api.open(rev=old)`` reads the remote from that revision's config)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / ".git").exists():
            self.git("init", "-q", "-b", "main")
        if not self.git("config", "user.email", check=False):
            self.git("config", "user.email", "kedit@localhost")
            self.git("config", "user.name", "kedit")
        changed = False
        if not (self.root / ".dvc").is_dir():
            self.dvc("init", "-q")
            self.dvc("config", "core.analytics", "false")
            # Model files are large and never edited in place: link them from the cache, do not copy.
            self.dvc("config", "cache.type", "hardlink,symlink")
            changed = True
        remotes = self.dvc("remote", "list")
        if self.remote_name not in remotes.split():
            url = self.remote_url()
            if "://" not in url and Path(url).resolve() != (self.root / ".dvc-remote").resolve():
                check_target(url, self.ws, "lineage.dvc_remote")  # a push must not write into a store
            if "://" not in url:
                (self.root / url).mkdir(parents=True, exist_ok=True)
            self.dvc("remote", "add", "-d", self.remote_name, url)
            changed = True
        else:
            changed |= self._check_remote()
        changed |= _ensure_lines(self.root / ".dvcignore", DVCIGNORE)
        changed |= _ensure_lines(self.root / ".gitignore", GITIGNORE)
        if changed:
            self.git("add", ".dvc/config", ".dvcignore", ".gitignore")
            if self.git("diff", "--cached", "--name-only"):
                self.git("commit", "-q", "-m", "kedit: DVC setup and default remote")

    def check_data(self) -> None:
        """Refuse (:class:`~kedit.safepath.UnsafePathError`) a symbolic link in the tracked folders that
        leads anywhere but the DVC cache: ``dvc add`` follows it, chmods the target read-only, replaces
        the link with a hard link to it and ``dvc push`` uploads its bytes. DVC's own links (cache.type
        symlink) point into the cache and pass."""
        present = [self.root / d for d in TRACKED if (self.root / d).exists()]
        check_links(present, self.ws, "git + DVC versioning", allowed=[self.root / ".dvc" / "cache"])

    def snapshot(self, message: str, tag: str | None = None, push: bool = True,
                 always_commit: bool = False) -> dict[str, str]:
        """``dvc add`` the data folders, commit the .dvc files, optionally tag, and push to the remote.

        ``always_commit``: make a commit even when no file changed, so the message (e.g. the event a
        promotion recorded) is in the history. Returns the git commit and, per folder, the DVC
        revision (the md5 of the tracked directory).
        """
        self.ensure()
        staged = pipeline_outputs(self.root)
        present = [d for d in TRACKED if (self.root / d).exists()]
        if not present:
            raise LineageError(f"{self.root}: none of {TRACKED} exist yet; nothing to version")
        # folders whose contents are outputs of dvc.yaml stages are versioned by `dvc repro` (dvc.lock);
        # `dvc add` on them would overlap those outputs
        added = [d for d in present if not any(o == d or o.startswith(d + "/") for o in staged)]
        self.check_data()
        if added:
            self.dvc("add", "-q", *added)
        self.git("add", *[f"{d}.dvc" for d in added], ".gitignore",
                 *[f for f in ("dvc.yaml", "dvc.lock", "params.yaml", GATE_METRICS, GATE_PLOT, *self.track)
                   if (self.root / f).exists()])
        sign = ["-S"] if self.sign else []
        if self.git("diff", "--cached", "--name-only"):
            self.git("commit", "-q", *sign, "-m", message)
        elif always_commit:
            self.git("commit", "-q", *sign, "--allow-empty", "-m", message)
        commit = self.git("rev-parse", "HEAD")
        if tag:
            self.git("tag", "-f", tag, commit)
        if push:
            self.dvc("push", "-q")
        return {"git_commit": commit, **{f"dvc_rev.{d}": self.dvc_rev(d) for d in present}}

    def dvc_rev(self, folder: str = "lineage") -> str:
        """The md5 DVC recorded for ``folder`` in the current ``<folder>.dvc`` (empty if untracked)."""
        import yaml

        f = self.root / f"{folder}.dvc"
        if not f.exists():  # a pipeline output: its md5 is in dvc.lock
            lock = self.root / "dvc.lock"
            stages = ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}) if lock.exists() else {}
            md5s = [str(o.get("md5", "")) for st in stages.values() for o in (st.get("outs") or [])
                    if str(o["path"]).rstrip("/") == folder or str(o["path"]).startswith(folder + "/")]
            return ",".join(md5s)
        outs = (yaml.safe_load(f.read_text()) or {}).get("outs") or [{}]
        return str(outs[0].get("md5", ""))

    def tag_state(self, state_id: str, message: str) -> dict[str, str]:
        """Commit the current data as the champion ``state_id`` (``base``: the base model) and tag it
        ``kedit/state/<id>``; always one commit, so each promotion / rollback is in the history."""
        return self.snapshot(message, tag=state_tag(state_id), always_commit=True)

    def chain_marks(self) -> list[tuple[str, int, str]]:
        """(commit, event number, chain digest) of every commit in the history that names an event
        of the lineage chain (``[kedit event N] [kedit chain D]``, see ``kedit.lineage.ops``)."""
        out = self.git("log", "--all", "--format=%H%x1f%B%x1e", check=False)
        marks = []
        for entry in out.split("\x1e"):
            commit, _, body = entry.strip().partition("\x1f")
            m = CHAIN_MARK.search(body)
            if m:
                marks.append((commit, int(m.group(1)), m.group(2)))
        return marks

    def verify_commit(self, commit: str) -> str | None:
        """Why ``git verify-commit`` refuses ``commit`` (None: a good signature by an allowed key)."""
        p = subprocess.run(["git", "verify-commit", commit], cwd=self.root, capture_output=True, text=True,
                           env=self._env())
        return None if p.returncode == 0 else (p.stderr.strip() or p.stdout.strip() or "no signature")

    def tag_message(self, tag: str) -> str | None:
        """The full message of the commit ``tag`` points at (None: no such tag)."""
        if tag not in self.tags():
            return None
        return self.git("log", "-1", "--format=%B", tag, check=False)

    def tags(self) -> list[str]:
        out = self.git("tag", "--list", f"{TAG_PREFIX}*", check=False)
        return [t for t in out.splitlines() if t]

    def checkout(self, rev: str) -> None:
        """``git checkout <rev> && dvc checkout`` (files of that revision; detached HEAD for a tag)."""
        self.git("checkout", "-q", rev)
        self.dvc("checkout", "-q", "--force")

    def pull(self) -> None:
        self.dvc("pull", "-q")


METRICS_DIR = "metrics"
GATE_METRICS = "metrics/gate.json"  # dvc.yaml `metrics:`: `dvc metrics diff kedit/state/A kedit/state/B`
GATE_PLOT = "metrics/gate_checks.csv"  # dvc.yaml `plots:`: each check's value beside its threshold


def write_champion_metrics(root: Path, state_id: str | None, gate: dict | None, n_edits: int = 0) -> list[str]:
    """The champion's gate verdict as DVC metrics and plot data, committed with each promotion /
    rollback, so two state tags compare with ``dvc metrics diff`` and ``dvc plots diff``. ``gate``: the
    state's last gate event (None: never gated, or the base model). Returns the files written."""
    import csv
    import io

    from kedit.atomic import write_json_atomic, write_text_atomic

    checks = [c for c in (gate or {}).get("checks", []) if c.get("value") is not None and not c.get("skipped")]
    metrics: dict = {"gate": {"passed": int(bool((gate or {}).get("passed"))), "n_checks": len(checks),
                              **{c["name"]: float(c["value"]) for c in checks}},
                     "n_edits": int(n_edits), "state": state_id or "base"}
    write_json_atomic(root / GATE_METRICS, metrics)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["check", "value", "threshold", "passed"])
    for c in checks:
        w.writerow([c["name"], float(c["value"]), "" if c.get("threshold") is None else c["threshold"],
                    int(bool(c.get("passed")))])
    write_text_atomic(root / GATE_PLOT, buf.getvalue())
    return [GATE_METRICS, GATE_PLOT]


def pipeline_outputs(root: Path) -> list[str]:
    """Output paths declared by the stages of ``root/dvc.lock`` (what `dvc repro` has produced)."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.exists():
        return []
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    return [str(o["path"]).rstrip("/") for st in stages.values() for o in (st.get("outs") or [])]


def _ensure_lines(path: Path, lines: list[str]) -> bool:
    have = path.read_text().splitlines() if path.exists() else []
    add = [line for line in lines if line not in have]
    if add:
        with open(path, "a") as fh:
            if have and have[-1] != "":
                fh.write("\n")
            fh.write("\n".join(add) + "\n")
    return bool(add)
