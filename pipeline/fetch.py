"""Obtain the four MNIST idx files, verified by the checksum of their uncompressed content.

Sources are tried in order: the public mirrors by default, or one local folder or http(s)
URL given by the user. A file already present with the right content is not fetched again.
Files are stored gzip-compressed as ``<name>.gz`` in the destination folder, each written to
a temporary name and renamed only after its content checksum matched.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline import __version__
from pipeline.errors import ChecksumError, FetchError, InputError
from pipeline.logs import get_logger
from pipeline.stage import StageResult, run_stage


@dataclass(frozen=True)
class FileSpec:
    """Expected uncompressed size and sha256 of one idx file."""

    name: str
    bytes: int
    sha256: str


MNIST_FILES: tuple[FileSpec, ...] = (
    FileSpec(
        "train-images-idx3-ubyte",
        47040016,
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    FileSpec(
        "train-labels-idx1-ubyte",
        60008,
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    FileSpec(
        "t10k-images-idx3-ubyte",
        7840016,
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    FileSpec(
        "t10k-labels-idx1-ubyte",
        10008,
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
)

#: Public mirrors serving ``<name>.gz``, tried in order.
DEFAULT_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

_BLOCK = 1 << 20
log = get_logger("fetch")


def content_digest(path: Path) -> tuple[str, int]:
    """sha256 and size of the *uncompressed* content of ``path`` (gzip detected by content)."""
    h = hashlib.sha256()
    size = 0
    with Path(path).open("rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw  # type: ignore[assignment]
        try:
            while block := stream.read(_BLOCK):
                h.update(block)
                size += len(block)
        except (OSError, EOFError, zlib.error) as e:
            raise ChecksumError(f"{path}: expected a valid gzip stream, got {e}") from None
    return h.hexdigest(), size


def _verify(path: Path, spec: FileSpec, origin: str) -> None:
    digest, size = content_digest(path)
    if digest != spec.sha256:
        raise ChecksumError(
            f"{spec.name} from {origin}: expected content sha256 {spec.sha256[:16]}... "
            f"({spec.bytes} bytes), got {digest[:16]}... ({size} bytes)"
        )


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _download(url: str, dest: BinaryIO, *, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": f"mnist-pipeline/{__version__}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        shutil.copyfileobj(response, dest, _BLOCK)


def _copy_local(folder: Path, spec: FileSpec, dest: BinaryIO) -> str:
    """Copy ``<name>.gz`` or ``<name>`` from ``folder``; raw content is gzip-compressed."""
    gz_path, raw_path = folder / f"{spec.name}.gz", folder / spec.name
    if gz_path.is_file():
        with gz_path.open("rb") as f:
            shutil.copyfileobj(f, dest, _BLOCK)
        return str(gz_path)
    if raw_path.is_file():
        with raw_path.open("rb") as f, gzip.GzipFile(fileobj=dest, mode="wb", mtime=0) as out:
            shutil.copyfileobj(f, out, _BLOCK)
        return str(raw_path)
    raise FileNotFoundError(f"neither {gz_path.name} nor {raw_path.name} in {folder}")


def _fetch_one(spec: FileSpec, dest_dir: Path, sources: Sequence[str], *, timeout: float) -> str:
    """Fetch one file from the first source that gives the right content; return its origin."""
    final = dest_dir / f"{spec.name}.gz"
    tmp = dest_dir / f".{spec.name}.gz.part-{os.getpid()}"
    failures: list[Exception] = []
    for source in sources:
        origin = source.rstrip("/") + "/" + f"{spec.name}.gz" if is_url(source) else source
        try:
            with tmp.open("wb") as f:
                if is_url(source):
                    _download(origin, f, timeout=timeout)
                else:
                    origin = _copy_local(Path(source), spec, f)
                f.flush()
                os.fsync(f.fileno())
            _verify(tmp, spec, origin)
        except (OSError, urllib.error.URLError, ChecksumError, ValueError) as e:
            log.warning(
                "%s: %s", spec.name, e if isinstance(e, ChecksumError) else f"{origin}: {e}"
            )
            failures.append(e)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            continue
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): keep no partial download
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        tmp.replace(final)
        return origin
    if all(isinstance(e, ChecksumError) for e in failures):
        raise ChecksumError(f"no source gave the expected content; {failures[-1]}")
    hint = (
        "; without network, point source (--source or MNIST_SOURCE) at a folder holding "
        "the idx files"
        if any(is_url(s) for s in sources)
        else ""
    )
    raise FetchError(
        f"{spec.name}: expected it from {len(sources)} source(s), got none; last: "
        f"{failures[-1]}{hint}"
    )


def fetch_mnist(
    dest_dir: Path,
    *,
    source: str | None = None,
    files: Sequence[FileSpec] = MNIST_FILES,
    timeout: float = 60.0,
) -> dict[str, dict[str, str]]:
    """Make ``dest_dir`` hold the MNIST files as ``<name>.gz`` with verified content.

    Parameters
    ----------
    dest_dir : Path
        Folder to write into (created if missing).
    source : str, optional
        A local folder holding ``<name>.gz`` (or uncompressed ``<name>``) files, or an
        http(s) URL of a folder serving ``<name>.gz``. Default: the public mirrors in order.
    files : sequence of FileSpec
        What to fetch; the four MNIST files by default.
    timeout : float
        Seconds before a network read gives up.

    Returns
    -------
    dict
        Per file name: ``path``, content ``sha256`` and ``origin`` (``"present"`` when the
        file was already there and valid).
    """
    source = source or None  # an empty MNIST_SOURCE means "the default mirrors"
    if source is not None and not is_url(source):
        folder = Path(source)
        if not folder.is_dir():
            raise InputError(
                f"--source: expected a folder or an http(s) URL, got {source!r} (no such folder)"
            )
    sources = [source] if source else list(DEFAULT_MIRRORS)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict[str, str]] = {}
    for spec in files:
        final = dest_dir / f"{spec.name}.gz"
        origin = "present"
        if final.is_file():
            try:
                _verify(final, spec, str(final))
                log.info("%s: already present and valid", final)
            except ChecksumError as e:
                log.warning("%s; fetching it again", e)
                origin = _fetch_one(spec, dest_dir, sources, timeout=timeout)
        else:
            origin = _fetch_one(spec, dest_dir, sources, timeout=timeout)
            log.info("%s: fetched from %s, content verified", final, origin)
        report[spec.name] = {"path": str(final), "sha256": spec.sha256, "origin": origin}
    return report


def fetch(
    *,
    dest_dir: Path,
    source: str | None = None,
    timeout: float = 60.0,
    force: bool = False,
    lock_timeout: float = 60.0,
) -> StageResult:
    """The ``fetch`` stage: make ``dest_dir`` hold the verified MNIST files.

    Each file is written atomically on its own (so valid files survive an interrupted run and
    are not fetched again); the manifest records where each came from.
    """
    return run_stage(
        "fetch",
        output=Path(dest_dir),
        inputs={},
        params={"source": source or "default mirrors"},
        force=force,
        lock_timeout=lock_timeout,
        atomic=False,
        build=lambda d: {"files": fetch_mnist(d, source=source, timeout=timeout)},
    )
