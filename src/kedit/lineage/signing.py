"""Per-approver signatures on approve events (``lineage.approval_signing: ssh``).

The hash chain (:mod:`kedit.lineage.chain`) holds no secret: anyone who can write ``lineage/events/``
can chain a forged approval with kedit's own code. With approval signing on, an approve event counts
only when it carries an SSH signature, made with ``ssh-keygen -Y sign -n kedit-approval`` over the
event's canonical payload, that ``ssh-keygen -Y verify`` accepts for the approver's name (the event's
``by``) against the workspace's ``allowed_signers`` file (git's format: ``principal key-type key``).

The payload is the event's JSON without ``digest`` and ``signature`` (``prev`` included) in canonical
form (sorted keys, no whitespace): the chained content, so a signature is bound to its event, its
approver, its state and its place in the chain, and cannot be moved to another event. The event's
digest covers the signature in turn. docs/lineage.md says what this protects against and what not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedit.lineage.state import LineageError

NAMESPACE = "kedit-approval"
KEY_ENV = "KEDIT_SIGNING_KEY"
MODES = ("ssh",)
DEFAULT_ALLOWED_SIGNERS = "allowed_signers"


class SigningError(LineageError):
    """An approval cannot be signed or checked: no ssh-keygen, no key, no allowed_signers file, a bad setting."""


@dataclass(frozen=True)
class ApprovalSigning:
    """The approval-signing setting of a workspace: ``mode`` None (off) or ``ssh``; the allowed signers file."""

    mode: str | None = None
    allowed_signers: Path | None = None

    @property
    def on(self) -> bool:
        return self.mode is not None


OFF = ApprovalSigning()


def signing_config(root: Path, params: dict[str, Any]) -> ApprovalSigning:
    """The setting from the ``lineage:`` params block; ``root``: the workspace, which must hold the
    allowed signers file (it is committed with the workspace's git history, see docs/lineage.md)."""
    mode = params.get("approval_signing")
    if mode in (None, False, "off", "none", ""):
        return OFF
    if mode not in MODES:
        raise SigningError(f"lineage.approval_signing: {mode!r} is not a signing mode; use 'ssh' (or false / "
                           f"null: off)")
    name = params.get("allowed_signers") or DEFAULT_ALLOWED_SIGNERS
    root = Path(root).resolve()
    path = Path(name).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()
    if path != root and root not in path.parents:
        raise SigningError(f"lineage.allowed_signers: {name} resolves to {path}, outside the workspace {root}; "
                           f"keep it in the workspace, committed with its git history, where changes are reviewed")
    return ApprovalSigning(mode=str(mode), allowed_signers=path)


def payload(raw: dict[str, Any]) -> bytes:
    """What is signed: the event without ``digest`` and ``signature``, canonical JSON."""
    body = {k: v for k, v in raw.items() if k not in ("digest", "signature")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def ssh_keygen() -> str:
    """The ssh-keygen executable, or a SigningError saying it is needed."""
    exe = shutil.which("ssh-keygen")
    if exe is None:
        raise SigningError("ssh-keygen not found on PATH: lineage.approval_signing: ssh signs and checks approvals "
                           "with it (install OpenSSH 8.2 or later, e.g. `apt-get install openssh-client`)")
    return exe


def find_key(explicit: str | Path | None = None, cwd: Path | None = None) -> Path:
    """The approver's SSH private key: ``explicit`` (``--key``), else ``$KEDIT_SIGNING_KEY``, else git's
    ``user.signingkey`` (read in ``cwd``; a ``.pub`` path means its private key beside it)."""
    where = "--key"
    value: str | None = str(explicit) if explicit else None
    if not value and os.environ.get(KEY_ENV):
        value, where = os.environ[KEY_ENV], f"${KEY_ENV}"
    if not value and shutil.which("git"):
        got = subprocess.run(["git", "config", "--get", "user.signingkey"], cwd=cwd, capture_output=True, text=True)
        if got.returncode == 0 and got.stdout.strip():
            value, where = got.stdout.strip(), "git config user.signingkey"
    if not value:
        raise SigningError(f"no SSH signing key for the approval (lineage.approval_signing: ssh): pass --key PATH, "
                           f"set ${KEY_ENV}, or `git config user.signingkey PATH`")
    if value.startswith("key::"):
        raise SigningError(f"{where}: a literal key ({value[:20]}...) cannot sign here; give the path of the "
                           f"private key file")
    path = Path(value).expanduser()
    if path.suffix == ".pub" and path.with_suffix("").is_file():
        path = path.with_suffix("")
    if not path.is_file():
        raise SigningError(f"{where}: SSH signing key {path} does not exist")
    return path


def sign(data: bytes, key: Path, principal: str) -> dict[str, Any]:
    """An SSH signature over ``data`` with ``key`` (``ssh-keygen -Y sign -n kedit-approval``), as stored
    in the event's ``signature`` field."""
    exe = ssh_keygen()
    with tempfile.TemporaryDirectory(prefix="kedit-sign-") as tmp:
        msg = Path(tmp) / "payload"
        msg.write_bytes(data)
        got = subprocess.run([exe, "-Y", "sign", "-q", "-f", str(key), "-n", NAMESPACE, str(msg)],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
        sig = Path(tmp) / "payload.sig"
        if got.returncode != 0 or not sig.is_file():
            raise SigningError(f"ssh-keygen could not sign the approval with {key}: "
                               f"{(got.stderr or got.stdout).strip() or f'exit {got.returncode}'}")
        text = sig.read_text()
    return {"format": "ssh", "namespace": NAMESPACE, "principal": principal, "sig": text}


def check(data: bytes, signature: Any, principal: str, allowed_signers: Path) -> str | None:
    """Why ``signature`` is not a good signature over ``data`` by ``principal`` under ``allowed_signers``
    (``ssh-keygen -Y verify``); None: it is."""
    if not isinstance(signature, dict) or not isinstance(signature.get("sig"), str):
        return "it carries no approval signature"
    if signature.get("namespace") != NAMESPACE or signature.get("format") != "ssh":
        return f"its signature is not an SSH {NAMESPACE} signature"
    if not allowed_signers.is_file():
        return f"its signature cannot be checked: the allowed signers file {allowed_signers} does not exist"
    try:
        exe = ssh_keygen()
    except SigningError as exc:
        return f"its signature cannot be checked: {exc}"
    with tempfile.TemporaryDirectory(prefix="kedit-verify-") as tmp:
        sig = Path(tmp) / "payload.sig"
        sig.write_text(signature["sig"])
        got = subprocess.run([exe, "-Y", "verify", "-f", str(allowed_signers), "-I", principal, "-n", NAMESPACE,
                              "-s", str(sig)], input=data, capture_output=True)
    if got.returncode == 0:
        return None
    why = (got.stderr or got.stdout).decode(errors="replace").strip().splitlines()
    return (f"its signature is not a good signature by {principal!r} from {allowed_signers} "
            f"(ssh-keygen: {why[-1] if why else f'exit {got.returncode}'})")
