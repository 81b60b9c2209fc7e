"""Fingerprints of files and folders: the same digests as the recursive version, any depth."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.fingerprint import content_fingerprint, disk_usage, sha256_file, stat_fingerprint


def _old_files(path: Path) -> list[Path]:
    # The implementation before the iterative walk (recursive rglob), kept as the reference.
    files = (p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return sorted(files, key=os.fspath)


def old_content(path: Path) -> str:
    h = hashlib.sha256()
    for p in _old_files(path):
        h.update(p.relative_to(path).as_posix().encode() + b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def old_stat(path: Path) -> str:
    h = hashlib.sha256()
    for p in _old_files(path):
        st = p.stat()
        h.update(f"{p.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def old_usage(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(folder, name))  # noqa: PTH118
            if not os.path.islink(os.path.join(folder, name)):  # noqa: PTH114, PTH118
                total += st.st_size
    return total


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Nested folders, names that sort differently per folder than as full paths (``a/b``
    vs ``a.txt`` vs ``a-b``), hidden files, symlinks to a file and to a folder, a FIFO."""
    root = tmp_path / "tree"
    for rel, data in {
        "a.txt": b"1",
        "a-b": b"22",
        "a/b": b"333",
        "a/c/d.bin": b"4444",
        ".hidden": b"55555",
        "a/.h/x": b"6",
        "z/y/x/w": b"77",
        "B": b"8",
    }.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "link-file").symlink_to(root / "a.txt")
    (root / "link-dir").symlink_to(root / "a")
    os.mkfifo(root / "fifo")
    return root


def test_same_digests_as_the_recursive_version(tree: Path) -> None:
    assert content_fingerprint(tree) == old_content(tree)
    assert stat_fingerprint(tree) == old_stat(tree)
    assert disk_usage(tree) == old_usage(tree) == 1 + 2 + 3 + 4 + 5 + 1 + 2 + 1


def test_relative_root_gives_the_same_digests(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    assert content_fingerprint(Path()) == old_content(tree)
    assert stat_fingerprint(Path()) == old_stat(tree)


def test_digests_change_with_content_and_names(tree: Path) -> None:
    before = content_fingerprint(tree), stat_fingerprint(tree)
    (tree / "a/c/d.bin").write_bytes(b"4445")
    assert content_fingerprint(tree) != before[0]
    (tree / "a/c/d.bin").rename(tree / "a/c/e.bin")
    assert stat_fingerprint(tree) != before[1]


def test_single_file(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    assert content_fingerprint(f) == hashlib.sha256(b"abc").hexdigest()
    assert disk_usage(f) == 3
    st = f.stat()
    assert stat_fingerprint(f) == hashlib.sha256(f"f\0{3}\0{st.st_mtime_ns}\n".encode()).hexdigest()


def make_deep_tree(top: Path, depth: int, *, leaf: str = "leaf", data: bytes = b"deep") -> None:
    """``top/d/d/.../d/<leaf>`` with ``depth`` folders ``d``, built through folder
    descriptors (no path or recursion grows with the depth here)."""
    top.mkdir(parents=True, exist_ok=True)
    fd = os.open(top, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            sub = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = sub
        out = os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, data)
        os.close(out)
    finally:
        os.close(fd)


def remove_deep_tree(top: Path) -> None:
    """Remove a tree of :func:`make_deep_tree`: ``shutil.rmtree`` (and pytest's clean-up of
    old temporary folders, shared by everyone on the machine) recurse and fail on it;
    GNU ``rm`` does not."""
    subprocess.run(["rm", "-rf", "--", os.fspath(top)], check=True)


@pytest.fixture
def deep_tree(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A folder with a file ``top`` and a file 200 levels deeper than the recursion limit."""
    depth = sys.getrecursionlimit() + 200
    make_deep_tree(tmp_path / "deep", depth)
    (tmp_path / "deep" / "top").write_bytes(b"xy")
    try:
        yield tmp_path / "deep", depth
    finally:
        remove_deep_tree(tmp_path / "deep")


def test_tree_deeper_than_the_recursion_limit(deep_tree: tuple[Path, int]) -> None:
    root, depth = deep_tree
    assert disk_usage(root) == 6
    h = hashlib.sha256()
    deep = hashlib.sha256(b"deep").hexdigest().encode()
    h.update(("d/" * depth + "leaf").encode() + b"\0" + deep)
    h.update(b"top\0" + hashlib.sha256(b"xy").hexdigest().encode())
    assert content_fingerprint(root) == h.hexdigest()
    assert len(stat_fingerprint(root)) == 64


def test_name_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / os.fsdecode(b"bad\xff.png")).write_bytes(b"x")
    first = content_fingerprint(tmp_path), stat_fingerprint(tmp_path)
    assert all(len(d) == 64 for d in first)
    assert disk_usage(tmp_path) == 1
