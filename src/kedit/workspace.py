"""Where kedit keeps its files: one project folder holding models/, stats/, lineage/, mlflow.db."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


def slugify(text: str) -> str:
    """Lower-case, file-system-safe name: letters, digits, '-' and '.' only."""
    slug = re.sub(r"[^a-zA-Z0-9.]+", "-", text.strip()).strip("-").lower()
    if not slug:
        raise ValueError(f"cannot make a slug from {text!r}")
    return slug


@dataclass(frozen=True)
class Workspace:
    """All on-disk locations derive from one root (env KEDIT_HOME, else the current directory).

    ``cache_root``: where caches go instead of ``<root>/.kedit-cache`` (a folder read in place that
    must not be written to, such as a logged model's artifacts in MLflow's store)."""

    root: Path
    cache_root: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())
        if self.cache_root is not None:
            object.__setattr__(self, "cache_root", Path(self.cache_root).resolve())

    @classmethod
    def default(cls, root: str | Path | None = None) -> Workspace:
        base = root or os.environ.get("KEDIT_HOME") or os.getcwd()
        return cls(Path(base).resolve())

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def stats_dir(self) -> Path:
        return self.root / "stats"

    @property
    def lineage_dir(self) -> Path:
        return self.root / "lineage"

    @property
    def feeds_dir(self) -> Path:
        return self.root / "feeds"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def cache_dir(self) -> Path:
        return self.cache_root or self.root / ".kedit-cache"

    @property
    def mlflow_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"

    def rel(self, path: str | Path) -> str:
        """How a path is recorded (lineage events, state records, reports): relative to the workspace
        root when it lies inside it, so a workspace copied or moved elsewhere still finds its files; a
        path outside the workspace (a feed given by its absolute path) is recorded as it is."""
        p = Path(path)
        full = (p if p.is_absolute() else self.root / p).resolve()
        try:
            return full.relative_to(self.root).as_posix()
        except ValueError:
            return str(full)

    def path(self, recorded: str | Path) -> Path:
        """A recorded path (see :meth:`rel`) as a path in this workspace; absolute ones stay as they are."""
        p = Path(recorded)
        return p if p.is_absolute() else self.root / p

    def model_dir(self, slug: str) -> Path:
        return self.models_dir / slug
