"""Fetching idx files from a local folder and from a real HTTP server on loopback."""

from __future__ import annotations

import gzip
import hashlib
import socket
import threading
from collections.abc import Callable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import MNIST_NAMES, SyntheticDataset

import pipeline.fetch as fetch_mod
from pipeline.errors import ChecksumError, FetchError, InputError, PipelineError
from pipeline.fetch import MNIST_FILES, FileSpec, content_digest, fetch, fetch_mnist
from pipeline.idx import encode_idx, is_gzip, read_idx, write_idx
from pipeline.stage import manifest_path

Serve = Callable[[Path], tuple[str, list[str]]]


def specs_for(ds: SyntheticDataset) -> list[FileSpec]:
    """FileSpecs (uncompressed size and sha256) of a synthetic dataset's four files."""
    out = []
    for key, name in MNIST_NAMES.items():
        data = encode_idx(ds.arrays[key])
        out.append(FileSpec(name, len(data), hashlib.sha256(data).hexdigest()))
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*part*"))


def assert_fetched(dest: Path, ds: SyntheticDataset) -> None:
    for key, name in MNIST_NAMES.items():
        path = dest / f"{name}.gz"
        assert is_gzip(path), f"{path} is not stored gzip-compressed"
        np.testing.assert_array_equal(read_idx(path), ds.arrays[key])
    assert leftovers(dest) == []


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Serve]:
    """``serve(folder)`` starts an HTTP server on loopback; returns (base URL, request paths)."""
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def start(folder: Path) -> tuple[str, list[str]]:
        requests: list[str] = []

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/", requests

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def corrupt_dir(tmp_path: Path, dataset: SyntheticDataset) -> Path:
    """Same file names as ``dataset``, valid gzip idx files, but different content."""
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for key, name in MNIST_NAMES.items():
        write_idx(folder / f"{name}.gz", dataset.arrays[key][::-1].copy() + 1, compress=True)
    return folder


def unused_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# ----------------------------------------------------------------------------- local folder


def test_fetch_from_local_folder(tmp_path: Path, dataset: SyntheticDataset) -> None:
    dest = tmp_path / "dest"
    report = fetch_mnist(dest, source=str(dataset.raw_dir), files=specs_for(dataset))
    assert_fetched(dest, dataset)
    for spec in specs_for(dataset):
        entry = report[spec.name]
        assert entry["origin"] == str(dataset.raw_dir / f"{spec.name}.gz")
        assert entry["path"] == str(dest / f"{spec.name}.gz")
        assert entry["sha256"] == spec.sha256
        assert content_digest(dest / f"{spec.name}.gz") == (spec.sha256, spec.bytes)
        # a .gz source is copied byte for byte
        assert (dest / f"{spec.name}.gz").read_bytes() == (
            dataset.raw_dir / f"{spec.name}.gz"
        ).read_bytes()


def test_raw_source_files_are_stored_gzip_compressed(
    tmp_path: Path, make_dataset: Callable[..., SyntheticDataset]
) -> None:
    ds = make_dataset("raw_uncompressed", compress=False)
    dest = tmp_path / "dest"
    report = fetch_mnist(dest, source=str(ds.raw_dir), files=specs_for(ds))
    assert_fetched(dest, ds)
    for spec in specs_for(ds):
        assert report[spec.name]["origin"] == str(ds.raw_dir / spec.name)
        stored = (dest / f"{spec.name}.gz").read_bytes()
        assert gzip.decompress(stored) == (ds.raw_dir / spec.name).read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{n}.gz" for n in MNIST_NAMES.values())


def test_local_folder_prefers_gz_over_raw(tmp_path: Path, dataset: SyntheticDataset) -> None:
    # a raw file with wrong content beside the good .gz: the .gz must be the one used
    name = MNIST_NAMES[("train", "labels")]
    (dataset.raw_dir / name).write_bytes(b"not an idx file")
    report = fetch_mnist(tmp_path / "dest", source=str(dataset.raw_dir), files=specs_for(dataset))
    assert report[name]["origin"] == str(dataset.raw_dir / f"{name}.gz")


def test_source_folder_missing(tmp_path: Path, dataset: SyntheticDataset) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(InputError, match="expected a folder or an http"):
        fetch_mnist(dest, source=str(tmp_path / "nowhere"), files=specs_for(dataset))
    assert not dest.exists()


def test_source_folder_lacks_a_file(tmp_path: Path, dataset: SyntheticDataset) -> None:
    name = MNIST_NAMES[("test", "labels")]
    (dataset.raw_dir / f"{name}.gz").unlink()
    dest = tmp_path / "dest"
    with pytest.raises(FetchError, match=rf"{name}: expected it from 1 source\(s\).*neither"):
        fetch_mnist(dest, source=str(dataset.raw_dir), files=specs_for(dataset))
    assert not (dest / f"{name}.gz").exists()
    assert leftovers(dest) == []


def test_local_source_with_wrong_content(
    tmp_path: Path, dataset: SyntheticDataset, corrupt_dir: Path
) -> None:
    dest = tmp_path / "dest"
    first = MNIST_NAMES[("train", "images")]
    with pytest.raises(ChecksumError, match=first) as info:
        fetch_mnist(dest, source=str(corrupt_dir), files=specs_for(dataset))
    assert "expected content sha256" in str(info.value)
    assert list(dest.iterdir()) == []  # no final file, no temporary file


def test_interrupted_fetch_leaves_no_partial_file(
    tmp_path: Path, dataset: SyntheticDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_copy = fetch_mod._copy_local

    def copy_then_interrupt(folder: Path, spec: FileSpec, dest):  # type: ignore[no-untyped-def]
        if spec.name == MNIST_NAMES[("train", "labels")]:
            dest.write(b"\x1f\x8b half a download")
            raise KeyboardInterrupt
        return real_copy(folder, spec, dest)

    monkeypatch.setattr(fetch_mod, "_copy_local", copy_then_interrupt)
    dest = tmp_path / "dest"
    with pytest.raises(KeyboardInterrupt):
        fetch_mnist(dest, source=str(dataset.raw_dir), files=specs_for(dataset))
    # the file completed before the interruption stays; nothing partial is left
    assert sorted(p.name for p in dest.iterdir()) == [f"{MNIST_NAMES[('train', 'images')]}.gz"]


# ----------------------------------------------------------------------------- HTTP


def test_fetch_over_http(tmp_path: Path, dataset: SyntheticDataset, serve: Serve) -> None:
    url, requests = serve(dataset.raw_dir)
    dest = tmp_path / "dest"
    report = fetch_mnist(dest, source=url.rstrip("/"), files=specs_for(dataset), timeout=10)
    assert_fetched(dest, dataset)
    for name in MNIST_NAMES.values():
        assert report[name]["origin"] == f"{url}{name}.gz"
    assert sorted(requests) == sorted(f"/{n}.gz" for n in MNIST_NAMES.values())


@pytest.mark.parametrize("kind", ["other-content", "gzip-magic-then-garbage", "not-gzip"])
def test_http_server_with_corrupt_bytes(
    tmp_path: Path, dataset: SyntheticDataset, serve: Serve, corrupt_dir: Path, kind: str
) -> None:
    if kind != "other-content":
        for f in corrupt_dir.iterdir():
            f.write_bytes(b"\x1f\x8b" + b"garbage" * 100 if kind.startswith("gzip") else b"junk")
    url, _ = serve(corrupt_dir)
    dest = tmp_path / "dest"
    name = MNIST_NAMES[("train", "images")]
    with pytest.raises(ChecksumError, match=name) as info:
        fetch_mnist(dest, source=url, files=specs_for(dataset), timeout=10)
    assert "expected" in str(info.value)
    assert not (dest / f"{name}.gz").exists()
    assert list(dest.iterdir()) == []  # nothing final, no .part file


def test_http_404(tmp_path: Path, dataset: SyntheticDataset, serve: Serve) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    url, requests = serve(empty)
    dest = tmp_path / "dest"
    with pytest.raises(FetchError, match="404") as info:
        fetch_mnist(dest, source=url, files=specs_for(dataset), timeout=10)
    assert not isinstance(info.value, ChecksumError)
    assert MNIST_NAMES[("train", "images")] in str(info.value)
    assert requests == [f"/{MNIST_NAMES[('train', 'images')]}.gz"]
    assert list(dest.iterdir()) == []


def test_connection_refused_is_a_fetch_error(tmp_path: Path, dataset: SyntheticDataset) -> None:
    with pytest.raises(FetchError):
        fetch_mnist(tmp_path / "d", source=unused_port_url(), files=specs_for(dataset), timeout=5)


@pytest.mark.parametrize("bad", ["corrupt", "404", "refused"])
def test_mirror_fallback(
    tmp_path: Path,
    dataset: SyntheticDataset,
    serve: Serve,
    corrupt_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    bad: str,
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_url = {
        "corrupt": lambda: serve(corrupt_dir)[0],
        "404": lambda: serve(empty)[0],
        "refused": unused_port_url,
    }[bad]()
    good_url, good_requests = serve(dataset.raw_dir)
    monkeypatch.setattr(fetch_mod, "DEFAULT_MIRRORS", (bad_url, good_url))
    dest = tmp_path / "dest"
    report = fetch_mnist(dest, source=None, files=specs_for(dataset), timeout=10)
    assert_fetched(dest, dataset)
    for name in MNIST_NAMES.values():
        assert report[name]["origin"] == f"{good_url}{name}.gz"
    assert len(good_requests) == 4


def test_all_mirrors_bad(
    tmp_path: Path,
    dataset: SyntheticDataset,
    serve: Serve,
    corrupt_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt_url, _ = serve(corrupt_dir)
    missing_url, _ = serve(empty)
    dest = tmp_path / "dest"
    # only wrong content -> ChecksumError
    monkeypatch.setattr(fetch_mod, "DEFAULT_MIRRORS", (corrupt_url, corrupt_url))
    with pytest.raises(ChecksumError, match="no source gave the expected content"):
        fetch_mnist(dest, files=specs_for(dataset), timeout=10)
    # a mix of failures -> FetchError naming the number of sources
    monkeypatch.setattr(fetch_mod, "DEFAULT_MIRRORS", (corrupt_url, missing_url))
    with pytest.raises(FetchError, match=r"expected it from 2 source\(s\)") as info:
        fetch_mnist(dest, files=specs_for(dataset), timeout=10)
    # No network (mirrors unreachable): the message says how to use a local copy.
    assert "--source or MNIST_SOURCE" in str(info.value)
    assert list(dest.iterdir()) == []


# ----------------------------------------------------------------------------- present files


def test_present_valid_files_are_not_fetched_again(
    tmp_path: Path, dataset: SyntheticDataset, serve: Serve
) -> None:
    url, requests = serve(dataset.raw_dir)
    dest = tmp_path / "dest"
    fetch_mnist(dest, source=url, files=specs_for(dataset), timeout=10)
    assert len(requests) == 4
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    report = fetch_mnist(dest, source=url, files=specs_for(dataset), timeout=10)
    assert len(requests) == 4  # no new request
    assert {v["origin"] for v in report.values()} == {"present"}
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before
    # even with a source that could not deliver anything
    report = fetch_mnist(dest, source=str(tmp_path / "dest"), files=specs_for(dataset))
    assert {v["origin"] for v in report.values()} == {"present"}


@pytest.mark.parametrize(
    "damage",
    [b"garbage", b"\x1f\x8b garbage", b""],
    ids=["not-gzip", "bad-gzip", "empty"],
)
def test_present_but_corrupt_file_is_fetched_again(
    tmp_path: Path, dataset: SyntheticDataset, serve: Serve, damage: bytes
) -> None:
    url, requests = serve(dataset.raw_dir)
    dest = tmp_path / "dest"
    fetch_mnist(dest, source=url, files=specs_for(dataset), timeout=10)
    name = MNIST_NAMES[("test", "images")]
    (dest / f"{name}.gz").write_bytes(damage)
    requests.clear()
    report = fetch_mnist(dest, source=url, files=specs_for(dataset), timeout=10)
    assert requests == [f"/{name}.gz"]
    assert report[name]["origin"] == f"{url}{name}.gz"
    assert {v["origin"] for k, v in report.items() if k != name} == {"present"}
    assert_fetched(dest, dataset)


def test_present_but_corrupt_file_with_failing_source_raises(
    tmp_path: Path, dataset: SyntheticDataset, corrupt_dir: Path
) -> None:
    dest = tmp_path / "dest"
    fetch_mnist(dest, source=str(dataset.raw_dir), files=specs_for(dataset))
    name = MNIST_NAMES[("train", "labels")]
    (dest / f"{name}.gz").write_bytes(b"garbage")
    with pytest.raises(ChecksumError, match=name):
        fetch_mnist(dest, source=str(corrupt_dir), files=specs_for(dataset))
    assert leftovers(dest) == []


def test_errors_are_pipeline_errors_with_exit_code_1() -> None:
    assert issubclass(ChecksumError, PipelineError) and ChecksumError.exit_code == 1
    assert issubclass(FetchError, PipelineError) and FetchError.exit_code == 1


# ----------------------------------------------------------------------------- real MNIST


@pytest.mark.mnist
def test_fetch_real_mnist(tmp_path: Path, real_mnist_dir: Path) -> None:
    dest = tmp_path / "raw"
    result = fetch(dest_dir=dest, source=str(real_mnist_dir), lock_timeout=0)
    assert not result.skipped
    files = result.result["files"]
    assert set(files) == {spec.name for spec in MNIST_FILES}
    for spec in MNIST_FILES:
        path = dest / f"{spec.name}.gz"
        assert files[spec.name]["origin"] == str(real_mnist_dir / f"{spec.name}.gz")
        assert content_digest(path) == (spec.sha256, spec.bytes)
    assert manifest_path(dest).is_file()
    assert leftovers(dest) == []
    again = fetch(dest_dir=dest, source=str(real_mnist_dir), lock_timeout=0)
    assert again.skipped
    # a different source is a different parameter: the stage runs, but files are present
    other = fetch(dest_dir=dest, source=str(dest), lock_timeout=0)
    assert not other.skipped
    assert {v["origin"] for v in other.result["files"].values()} == {"present"}
