"""MLflow artifacts stored inside the workspace under a workspace-relative URI.

MLflow turns every local artifact location into an absolute ``file://`` URI and writes it into its
store (experiment, runs, logged models, model versions), so a workspace copied or cloned elsewhere
would read, and write, the original folder's artifacts. kedit's experiment instead keeps its
artifacts at ``kedit-workspace:/mlartifacts``: this MLflow artifact repository (registered through
the ``mlflow.artifact_repository`` entry point, so any process with kedit installed resolves it,
``mlflow models serve`` included) resolves such a URI against the folder holding the tracking
store's SQLite file, i.e. the workspace that is being read, wherever it now lies.

MLflow imports this module while it registers its artifact repositories, so nothing of MLflow is
imported at module level (that would import the registry again, half-initialised): the entry point
is the factory :func:`repository`, which builds the repository class on first use.
"""

from __future__ import annotations

import functools
import os
import urllib.parse
from pathlib import Path
from typing import Any

SCHEME = "kedit-workspace"
ARTIFACT_DIR = "mlartifacts"
ROOT_URI = f"{SCHEME}:/{ARTIFACT_DIR}"  # the experiment's artifact location


class WorkspaceURIError(ValueError):
    """A ``kedit-workspace:`` URI that cannot be resolved (no workspace tracking store in sight)."""


def sqlite_file(tracking_uri: str | None) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for any other store)."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:"):
        return None
    path = urllib.parse.unquote(urllib.parse.urlparse(tracking_uri).path)
    # sqlite:////abs/file.db -> path //abs/file.db; sqlite:///rel/file.db -> /rel/file.db (relative)
    return Path(path[1:]).resolve()


def workspace_root(tracking_uri: str | None = None) -> Path:
    """The workspace a ``kedit-workspace:`` URI is relative to: the folder of the SQLite tracking store
    (``tracking_uri``, else MLflow's current one), else ``$KEDIT_HOME``."""
    if tracking_uri is None:
        import mlflow

        tracking_uri = mlflow.get_tracking_uri()
    db = sqlite_file(tracking_uri)
    if db is not None:
        return db.parent
    if os.environ.get("KEDIT_HOME"):
        return Path(os.environ["KEDIT_HOME"]).resolve()
    raise WorkspaceURIError(f"{SCHEME}: URIs are relative to a workspace's SQLite tracking store, and the "
                            f"tracking URI is {tracking_uri!r}; point MLFLOW_TRACKING_URI at "
                            f"sqlite:///<workspace>/mlflow.db or set KEDIT_HOME")


def is_workspace_uri(uri: str | None) -> bool:
    return bool(uri) and urllib.parse.urlparse(uri).scheme == SCHEME


def local_path(uri: str, tracking_uri: str | None = None) -> Path:
    """The folder or file a ``kedit-workspace:/<rel>`` URI names in the workspace being read."""
    rel = urllib.parse.unquote(urllib.parse.urlparse(uri).path).lstrip("/")
    root = workspace_root(tracking_uri)
    path = (root / rel).resolve()
    if path != root and root not in path.parents:
        raise WorkspaceURIError(f"{uri}: resolves to {path}, outside the workspace {root}")
    return path


def repository(artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None) -> Any:
    """The MLflow artifact repository of a ``kedit-workspace:`` URI (the entry point MLflow calls)."""
    return repository_class()(artifact_uri, tracking_uri=tracking_uri, registry_uri=registry_uri)


@functools.cache
def repository_class() -> type:
    """A local artifact repository rooted in the workspace being read (see the module docstring)."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    class WorkspaceArtifactRepository(LocalArtifactRepository):
        def __init__(self, artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None):
            path = local_path(artifact_uri, tracking_uri)
            super().__init__(path.as_uri(), tracking_uri=tracking_uri, registry_uri=registry_uri)

    return WorkspaceArtifactRepository
