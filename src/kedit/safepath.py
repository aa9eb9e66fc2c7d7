"""Where kedit may write, add or delete: never through a symbolic link that leads out of the workspace,
never onto its own stores.

A link inside a tracked folder (``lineage/notes.txt -> /elsewhere/file``) made ``dvc add`` chmod the
outside file, replace the link with a hard link to it and push its bytes to the remote; an export whose
``--out`` was a link or the lineage folder itself deleted what it pointed at. Every write, add and
delete site asks this module first and refuses with :class:`UnsafePathError`, naming the path, where
it leads and why. A path outside the workspace that the user names outright (``export --out /srv/m``)
is theirs to name; what is refused is a link that silently redirects, a store of kedit's own, and
(with ``within``) anything that resolves outside the folder it must stay in.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from kedit.workspace import Workspace

# A workspace's own stores: an export or any other replace must never delete or overwrite them.
STORE_NAMES = ("lineage", "models", "stats", "feeds", ".dvc", ".git", ".dvc-remote", "mlflow.db", "mlartifacts",
               ".kedit-cache", ".stack")


class UnsafePathError(ValueError):
    """A write, add or delete that would leave the workspace through a link or land on kedit's own stores."""


def own_stores(ws: Workspace) -> list[Path]:
    """The workspace's stores (resolved), present or not."""
    root = ws.root.resolve()
    return [root / name for name in STORE_NAMES]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def _links_on_the_way(path: Path) -> list[Path]:
    """The symbolic links among ``path`` and its ancestors (as written, not resolved)."""
    p = Path(path).absolute()  # ".." kept: "ws/link/../x" goes through the link
    return [q for q in [p, *p.parents] if q.is_symlink()]


def check_target(path: str | Path, ws: Workspace, what: str, *, within: str | Path | None = None,
                 stores: bool = True) -> Path:
    """The resolved ``path`` that ``what`` is about to write or replace, or :class:`UnsafePathError`.

    Refused: ``path`` itself a symbolic link (it would be written through, or deleted and replaced); a
    link among its ancestors inside the workspace that leads out of it; with ``stores``, a target that
    is, holds or lies inside one of the workspace's own stores (:data:`STORE_NAMES`) or is the workspace
    itself or a folder above it; with ``within``, a target that resolves outside that folder."""
    given = Path(path).absolute()  # not normalised: a ".." after a link is where the link leads
    root = ws.root.resolve()
    if given.is_symlink():
        raise UnsafePathError(f"{what}: {given} is a symbolic link to {os.readlink(given)}; kedit does not "
                              f"write through links: name the real path")
    for link in _links_on_the_way(given.parent):
        target = link.resolve()
        if _inside(link.parent.resolve() / link.name, root) and not _inside(target, root):
            raise UnsafePathError(f"{what}: {link} (on the way to {given}) is a symbolic link leading out of the "
                                  f"workspace {root}, to {target}")
    resolved = given.resolve()
    if within is not None:
        folder = Path(within).resolve()
        if not _inside(resolved, folder):
            raise UnsafePathError(f"{what}: {given} resolves to {resolved}, outside {folder}")
    if stores:
        if root.is_relative_to(resolved):
            raise UnsafePathError(f"{what}: {given} is the workspace {root} or a folder holding it; replacing "
                                  f"it would delete the workspace's stores")
        for store in own_stores(ws):
            if _inside(resolved, store):
                raise UnsafePathError(f"{what}: {given} is inside the workspace's own store {store}; kedit "
                                      f"never writes over its stores")
    return resolved


def check_links(folders: Iterable[str | Path], ws: Workspace, what: str,
                allowed: Iterable[str | Path] = ()) -> None:
    """Refuse any symbolic link under ``folders`` that resolves outside the ``allowed`` folders (e.g.
    the DVC cache, whose links DVC itself makes): a tool that follows it (``dvc add`` chmods, hard-links
    and uploads what a link points at) would act on a file that is not the workspace's."""
    keep = [Path(a).resolve() for a in allowed]
    bad: list[str] = []
    for folder in folders:
        folder = Path(folder)
        if folder.is_symlink():
            bad.append(f"{folder} -> {folder.resolve()}")
            continue
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if p.is_symlink():
                    target = p.resolve()
                    if not any(_inside(target, k) for k in keep):
                        bad.append(f"{p} -> {target}")
    if bad:
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise UnsafePathError(f"{what}: refused: symbolic link(s) in the workspace {ws.root} lead to files that "
                              f"are not its own data: {shown}; remove them (copy a file in instead) and retry")
