"""Crash-safe file writes: temporary file + fsync + rename, so readers see old or new, never half."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_dir(path: Path) -> None:
    """Persist a rename by syncing the directory entry (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on clean exit fsync it and rename it over ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix + ".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; readers (containers, others) need the usual mode
        os.replace(tmp_path, dest)
        fsync_dir(dest.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def make_readable(folder: str | Path) -> None:
    """Give ``folder`` and everything in it the usual modes under the umask (files 0644, folders 0755 for
    umask 022): ``save_pretrained`` and ``mkstemp`` write 0600, which another user or a serving
    container cannot read."""
    os.chmod(folder, 0o777 & ~_UMASK)
    for dirpath, dirnames, filenames in os.walk(folder):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~_UMASK)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~_UMASK)


def write_bytes_atomic(dest: str | Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: str | Path, text: str) -> None:
    write_bytes_atomic(dest, text.encode("utf-8"))


def write_json_atomic(dest: str | Path, obj: Any) -> None:
    write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_tensors_atomic(dest: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (tensors are made contiguous first)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(dest, suffix=".safetensors") as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object in canonical form (sorted keys, no whitespace)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def sha256_tensor(t) -> str:
    """Bit-level hash of a tensor: dtype, shape and raw bytes (bf16 handled via a same-size view)."""
    import torch

    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    h.update(t.numpy().tobytes())
    return h.hexdigest()
