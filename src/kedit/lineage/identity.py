"""Who a lineage event was written by, as far as this process can tell.

An event keeps two names side by side: ``by``, the free text a caller gives (``--by alice``, the
approver typed into a Prefect form), and the actor recorded here: the OS account of the process's
real uid (from the password database, not from ``$USER``, which any caller can set), the configured
identity ``$KEDIT_IDENTITY`` when set (a service account such as ``kedit-nightly``, or a person's
directory name), the host and the pid. docs/lineage.md states what this can and cannot prove.
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import asdict, dataclass
from typing import Any

IDENTITY_ENV = "KEDIT_IDENTITY"


@dataclass(frozen=True)
class Actor:
    """The process that writes an event: ``identity`` is ``$KEDIT_IDENTITY`` or else ``os_user``."""

    identity: str
    os_user: str
    uid: int | None
    host: str
    pid: int
    configured: bool  # True: identity came from $KEDIT_IDENTITY, not from the OS account

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def os_user() -> tuple[str, int | None]:
    """The account name of the real uid (``pwd``), falling back to ``getpass`` where there is no uid."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    if uid is not None:
        try:
            import pwd

            return pwd.getpwuid(uid).pw_name, uid
        except (ImportError, KeyError):  # a container uid with no passwd entry
            return f"uid-{uid}", uid
    return getpass.getuser(), None


def current_actor() -> Actor:
    name, uid = os_user()
    configured = (os.environ.get(IDENTITY_ENV) or "").strip()
    return Actor(identity=configured or name, os_user=name, uid=uid, host=socket.gethostname(), pid=os.getpid(),
                 configured=bool(configured))


def describe(actor: dict[str, Any] | None) -> str:
    """``alice`` or ``kedit-nightly (os: svc)`` for display; empty for events written before actors."""
    if not actor:
        return ""
    ident, user = actor.get("identity") or "", actor.get("os_user") or ""
    return ident if ident == user or not user else f"{ident} (os: {user})"


def accounts(by: str | None, actor: dict[str, Any] | None) -> set[str]:
    """The names an event is written under (its ``by`` and its actor's identity), case-folded: what
    ``lineage.require_distinct_approver`` compares between an approval and a promotion."""
    names = {str(by or "").strip(), str((actor or {}).get("identity") or "").strip()}
    return {n.casefold() for n in names if n}
