"""Checksums and fingerprints of files and folders, for manifests and up-to-date checks."""

from __future__ import annotations

import hashlib
import os
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


def _files_under(path: Path) -> list[tuple[str, str]]:
    """``(relative path with /, full path)`` of every regular file under ``path``.

    Symlinks are neither listed nor followed; folders that cannot be listed are skipped.
    An explicit stack, not recursion: a tree deeper than Python's recursion limit (1,000
    levels) must fingerprint like any other. Sorted by the relative path string, which is
    the order the earlier ``rglob`` version had (by full path: the prefix is common).
    """
    root = os.fspath(path)
    out: list[tuple[str, str]] = []
    stack = [("", root)]
    while stack:
        rel_dir, folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            continue
        for e in entries:
            rel = rel_dir + e.name
            try:
                if e.is_symlink():
                    continue
                if e.is_dir(follow_symlinks=False):
                    stack.append((rel + "/", e.path))
                elif e.is_file(follow_symlinks=False):
                    out.append((rel, e.path))
            except OSError:
                continue
    out.sort()
    return out


def _name_bytes(rel: str) -> bytes:
    # A name that is not valid UTF-8 is held with surrogate escapes; hash its bytes.
    return rel.encode("utf-8", "surrogateescape")


def content_fingerprint(path: Path) -> str:
    """sha256 over the content of a file, or of every file under a folder (with names).

    Reads every byte: use it for inputs whose content decides the result.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for rel, full in _files_under(path):
        h.update(_name_bytes(rel) + b"\0")
        h.update(sha256_file(Path(full)).encode())
    return h.hexdigest()


def stat_fingerprint(path: Path) -> str:
    """sha256 over names, sizes and modification times: cheap, for large outputs or folders."""
    path = Path(path)
    h = hashlib.sha256()
    entries = [(path.name, os.fspath(path))] if path.is_file() else _files_under(path)
    for rel, full in entries:
        st = os.stat(full)  # noqa: PTH116 (str paths: no Path object per file)
        h.update(_name_bytes(rel) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def disk_usage(path: Path) -> int:
    """Total bytes of a file or of all files under a folder (streamed: no file list)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    # An explicit stack of folders (os.walk recurses: a tree deeper than the recursion
    # limit raised RecursionError after the output was written, so no manifest was).
    stack = [os.fspath(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        elif not e.is_symlink():
                            total += e.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
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
