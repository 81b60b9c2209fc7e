"""Checksums and fingerprints of files and folders, for manifests and up-to-date checks."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

_BLOCK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of the bytes of ``path``."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files_under(path: Path) -> list[Path]:
    # Sorted by string: comparing Path objects is several times slower on big folders.
    files = (p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return sorted(files, key=os.fspath)


def content_fingerprint(path: Path) -> str:
    """sha256 over the content of a file, or of every file under a folder (with names).

    Reads every byte: use it for inputs whose content decides the result.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in _files_under(path):
        h.update(p.relative_to(path).as_posix().encode() + b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def stat_fingerprint(path: Path) -> str:
    """sha256 over names, sizes and modification times: cheap, for large outputs or folders."""
    path = Path(path)
    h = hashlib.sha256()
    entries = [path] if path.is_file() else _files_under(path)
    for p in entries:
        st = p.stat()
        rel = p.name if p == path else p.relative_to(path).as_posix()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def disk_usage(path: Path) -> int:
    """Total bytes of a file or of all files under a folder (streamed: no file list)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(folder, name))  # noqa: PTH118 (hot loop: str is faster)
            except OSError:
                continue
            if not stat.S_ISLNK(st.st_mode):
                total += st.st_size
    return total


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (the rename of an output) to disk where the OS allows."""
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
