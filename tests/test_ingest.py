"""idx -> zarr v3 store: exact content, chunking, attributes, bad inputs, kills mid-ingest."""

from __future__ import annotations

import gzip
import hashlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import MNIST_NAMES, REPO_ROOT, SyntheticDataset

from pipeline.errors import DatasetMismatchError, IdxFormatError, InputError
from pipeline.fetch import MNIST_FILES, fetch_mnist
from pipeline.idx import encode_idx, read_idx, write_idx
from pipeline.ingest import SplitFiles, build_store, default_sources, ingest
from pipeline.stage import manifest_path, read_manifest, temp_path
from pipeline.store import STORE_FORMAT, open_store, split_arrays


def sources_of(ds: SyntheticDataset) -> dict[str, SplitFiles]:
    return {
        split: SplitFiles(ds.paths[(split, "images")], ds.paths[(split, "labels")])
        for split in ("train", "test")
    }


def assert_store_matches(out: Path, ds: SyntheticDataset, *, chunk_size: int) -> None:
    root = open_store(out)
    for split in ("train", "test"):
        images, labels = split_arrays(root, split)
        expected = ds.images(split)
        n = len(expected)
        assert images.shape == expected.shape
        assert images.dtype == expected.dtype
        assert images.chunks == (min(chunk_size, n), *expected.shape[1:])
        assert labels.chunks == (min(chunk_size, n),)
        assert labels.dtype == np.uint8
        np.testing.assert_array_equal(images[:], expected)
        np.testing.assert_array_equal(labels[:], ds.labels(split))
        assert images.metadata.dimension_names == ("image", "y", "x")


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not temp_path(out).exists()
    assert not manifest_path(out).exists()


# ----------------------------------------------------------------------------- content


@pytest.mark.parametrize("chunk_size", [1, 7, 20, 1000])
def test_store_equals_idx_content(
    tmp_path: Path, dataset: SyntheticDataset, chunk_size: int
) -> None:
    out = tmp_path / "mnist.zarr"
    result = ingest(
        out=out, sources=default_sources(dataset.raw_dir), chunk_size=chunk_size, lock_timeout=0
    )
    assert not result.skipped
    assert_store_matches(out, dataset, chunk_size=chunk_size)
    for split in ("train", "test"):
        images, _ = split_arrays(open_store(out), split)
        n = len(dataset.images(split))
        assert images.nchunks == -(-n // min(chunk_size, n))
    assert result.result["splits"]["train"] == {
        "images": 50,
        "label_counts": np.bincount(dataset.labels("train"), minlength=10).tolist(),
    }
    assert result.result["image_shape"] == [28, 28]
    assert not temp_path(out).exists()


def test_store_attributes(tmp_path: Path, dataset: SyntheticDataset) -> None:
    out = tmp_path / "mnist.zarr"
    ingest(out=out, sources=sources_of(dataset), chunk_size=16, dataset="digits", lock_timeout=0)
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    assert attrs["format"] == STORE_FORMAT
    assert attrs["dataset"] == "digits"
    assert attrs["num_classes"] == 10
    assert attrs["image_shape"] == [28, 28]
    assert attrs["splits"] == {"train": 50, "test": 20}
    expected_sources = {}
    for (split, kind), array in dataset.arrays.items():
        raw = encode_idx(array)
        expected_sources[f"{split}_{kind}"] = {
            "file": dataset.paths[(split, kind)].name,
            "content_sha256": hashlib.sha256(raw).hexdigest(),
            "content_bytes": len(raw),
        }
    assert attrs["sources"] == expected_sources
    # the content checksum is that of the uncompressed idx, not of the .gz file
    gz = dataset.paths[("train", "images")]
    assert (
        attrs["sources"]["train_images"]["content_sha256"]
        == hashlib.sha256(gzip.decompress(gz.read_bytes())).hexdigest()
    )


def test_non_28x28_raw_images(tmp_path: Path, dataset_12x17: SyntheticDataset) -> None:
    ds = dataset_12x17
    assert not ds.compressed
    srcs = default_sources(ds.raw_dir)  # uncompressed names are picked when no .gz exists
    assert srcs["train"].images == ds.raw_dir / MNIST_NAMES[("train", "images")]
    out = tmp_path / "small.zarr"
    result = ingest(out=out, sources=srcs, chunk_size=7, lock_timeout=0)
    assert result.result["image_shape"] == [12, 17]
    assert_store_matches(out, ds, chunk_size=7)
    assert open_store(out).attrs["image_shape"] == [12, 17]


def test_mixed_raw_and_gzip_inputs(
    tmp_path: Path, make_dataset: Callable[..., SyntheticDataset]
) -> None:
    gz = make_dataset("gz", compress=True, seed=3)
    raw = make_dataset("raw", compress=False, seed=3)  # same content
    sources = {
        "train": SplitFiles(gz.paths[("train", "images")], raw.paths[("train", "labels")]),
        "test": SplitFiles(raw.paths[("test", "images")], gz.paths[("test", "labels")]),
    }
    out = tmp_path / "mixed.zarr"
    ingest(out=out, sources=sources, chunk_size=9, lock_timeout=0)
    assert_store_matches(out, gz, chunk_size=9)


def test_other_image_dtype_and_num_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    paths = {}
    arrays = {}
    for split, n in (("train", 13), ("test", 4)):
        arrays[split] = rng.standard_normal((n, 5, 6)).astype(">f4")
        labels = rng.integers(0, 3, n).astype(">i2")
        write_idx(tmp_path / f"{split}-i", arrays[split])
        write_idx(tmp_path / f"{split}-l", labels, compress=True)
        paths[split] = SplitFiles(tmp_path / f"{split}-i", tmp_path / f"{split}-l")
    out = tmp_path / "f.zarr"
    ingest(out=out, sources=paths, chunk_size=5, num_classes=3, lock_timeout=0)
    images, labels = split_arrays(open_store(out), "train")
    assert images.dtype == np.float32 and labels.dtype == np.uint8
    np.testing.assert_array_equal(images[:], arrays["train"])
    assert set(np.unique(labels[:])) <= {0, 1, 2}


def test_up_to_date_then_rebuilt_on_new_chunk_size(
    tmp_path: Path, dataset: SyntheticDataset
) -> None:
    out = tmp_path / "mnist.zarr"
    srcs = sources_of(dataset)
    ingest(out=out, sources=srcs, chunk_size=8, lock_timeout=0)
    assert ingest(out=out, sources=srcs, chunk_size=8, lock_timeout=0).skipped
    again = ingest(out=out, sources=srcs, chunk_size=3, lock_timeout=0)
    assert not again.skipped
    assert_store_matches(out, dataset, chunk_size=3)
    manifest = read_manifest(out)
    assert manifest is not None
    assert manifest["params"] == {"chunk_size": 3, "dataset": "mnist", "num_classes": 10}
    assert set(manifest["inputs"]) == {"train_images", "train_labels", "test_images", "test_labels"}


# ----------------------------------------------------------------------------- bad inputs


def _replace(ds: SyntheticDataset, key: tuple[str, str], array: np.ndarray) -> None:
    write_idx(ds.paths[key], array, compress=ds.compressed)


def test_count_mismatch(tmp_path: Path, dataset: SyntheticDataset) -> None:
    _replace(dataset, ("train", "labels"), dataset.labels("train")[:49])
    out = tmp_path / "mnist.zarr"
    with pytest.raises(
        DatasetMismatchError, match=r"train: expected as many labels as images \(50"
    ):
        ingest(out=out, sources=sources_of(dataset), lock_timeout=0)
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("labels", "num_classes", "message"),
    [
        (np.full(20, 10, np.uint8), 10, r"expected labels in \[0, 9\], got values in \[10, 10\]"),
        (
            np.arange(20, dtype=np.uint8) % 4,
            3,
            r"expected labels in \[0, 2\], got values in \[0, 3\]",
        ),
        (np.full(20, -1, np.int8), 10, r"expected labels in \[0, 9\], got values in \[-1, -1\]"),
        (np.zeros(20, ">f4"), 10, "expected integer labels"),
        (np.zeros((20, 2), np.uint8), 10, "expected a 1-D label file"),
    ],
    ids=["too-large", "num-classes", "negative", "float", "2-D"],
)
def test_bad_labels(
    tmp_path: Path, dataset: SyntheticDataset, labels: np.ndarray, num_classes: int, message: str
) -> None:
    if num_classes == 3:
        _replace(dataset, ("train", "labels"), dataset.labels("train") % 3)
    _replace(dataset, ("test", "labels"), labels)
    out = tmp_path / "mnist.zarr"
    with pytest.raises(DatasetMismatchError, match=message) as info:
        ingest(out=out, sources=sources_of(dataset), num_classes=num_classes, lock_timeout=0)
    assert MNIST_NAMES[("test", "labels")] in str(info.value)
    assert_nothing_written(out)


def test_images_with_two_dimensions(tmp_path: Path, dataset: SyntheticDataset) -> None:
    _replace(dataset, ("test", "images"), dataset.images("test").reshape(20, 784))
    out = tmp_path / "mnist.zarr"
    with pytest.raises(IdxFormatError, match=r"expected 3 dimensions .* got 2 \(20, 784\)"):
        ingest(out=out, sources=sources_of(dataset), lock_timeout=0)
    assert_nothing_written(out)


def test_different_image_shapes_across_splits(tmp_path: Path, dataset: SyntheticDataset) -> None:
    _replace(dataset, ("test", "images"), np.zeros((20, 28, 27), np.uint8))
    out = tmp_path / "mnist.zarr"
    with pytest.raises(DatasetMismatchError, match="expected one image shape across splits"):
        ingest(out=out, sources=sources_of(dataset), lock_timeout=0)
    assert_nothing_written(out)


def test_truncated_gzip_images_fail_midway_and_leave_nothing(
    tmp_path: Path, dataset: SyntheticDataset
) -> None:
    """The header of a gzip file looks fine; the payload ends early, after chunks were written."""
    path = dataset.paths[("train", "images")]
    path.write_bytes(gzip.compress(encode_idx(dataset.images("train"))[:-100]))
    out = tmp_path / "mnist.zarr"
    with pytest.raises(IdxFormatError, match="truncated"):
        ingest(out=out, sources=sources_of(dataset), chunk_size=5, lock_timeout=0)
    assert_nothing_written(out)


def test_failed_rebuild_keeps_the_previous_store(tmp_path: Path, dataset: SyntheticDataset) -> None:
    out = tmp_path / "mnist.zarr"
    ingest(out=out, sources=sources_of(dataset), chunk_size=10, lock_timeout=0)
    manifest = manifest_path(out).read_text()
    dataset.paths[("test", "images")].write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(IdxFormatError, match="expected a valid gzip stream"):
        ingest(out=out, sources=sources_of(dataset), chunk_size=10, lock_timeout=0)
    assert manifest_path(out).read_text() == manifest
    assert not temp_path(out).exists()
    np.testing.assert_array_equal(
        split_arrays(open_store(out), "test")[0][:], dataset.arrays[("test", "images")]
    )


def test_missing_input_and_bad_chunk_size(tmp_path: Path, dataset: SyntheticDataset) -> None:
    out = tmp_path / "mnist.zarr"
    with pytest.raises(InputError, match="expected train_images at"):
        ingest(out=out, sources=default_sources(tmp_path / "empty"), lock_timeout=0)
    with pytest.raises(InputError, match="--chunk-size: expected a positive number"):
        build_store(
            tmp_path / "x.zarr",
            sources=sources_of(dataset),
            chunk_size=0,
            dataset="d",
            num_classes=10,
        )
    assert not (tmp_path / "x.zarr").exists()
    assert_nothing_written(out)


# ----------------------------------------------------------------------------- kill mid-ingest


BIG_TRAIN = 100_000


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """100k raw 28x28 train images (~75 MB, so ingest takes a moment) and 20 test images."""
    folder = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(BIG_TRAIN, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=BIG_TRAIN, dtype=np.uint8)
    write_idx(folder / MNIST_NAMES[("train", "images")], images)
    write_idx(folder / MNIST_NAMES[("train", "labels")], labels)
    write_idx(folder / MNIST_NAMES[("test", "images")], images[:20])
    write_idx(folder / MNIST_NAMES[("test", "labels")], labels[:20])
    return folder, images, labels


def start_ingest(raw_dir: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "jobs", "ingest"),
            *("--raw-dir", str(raw_dir), "--out", str(out)),
            *("--chunk-size", "200", "--lock-timeout", "0"),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell starts background jobs with SIGINT ignored, and Python then keeps it
        # ignored: give the child the default disposition so Ctrl-C semantics are tested.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_until_writing(proc: subprocess.Popen[str], out: Path) -> None:
    """Poll until the hidden temporary store exists and image chunks are being written."""
    chunks = temp_path(out) / "train" / "images" / "c"
    deadline = time.monotonic() + 60
    while not chunks.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"ingest ended (exit {proc.returncode}) before it could be killed: {err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("ingest did not start writing within 60 s")
        time.sleep(0.005)
    assert temp_path(out).name == f".{out.name}.partial"


def test_sigkill_during_ingest_leaves_no_store_and_rerun_completes(
    tmp_path: Path, big_dataset: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    raw_dir, images, labels = big_dataset
    out = tmp_path / "big.zarr"
    proc = start_ingest(raw_dir, out)
    wait_until_writing(proc, out)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed ingest must not leave a store at the output path"
    assert not manifest_path(out).exists()
    assert read_manifest(out) is None
    # the rerun discards the killed run's temporary store and writes a complete one
    result = ingest(out=out, sources=default_sources(raw_dir), chunk_size=200, lock_timeout=0)
    assert not result.skipped
    assert result.result["splits"]["train"]["images"] == BIG_TRAIN
    assert not temp_path(out).exists()
    manifest = read_manifest(out)
    assert manifest is not None and manifest["status"] == "complete"
    root = open_store(out)
    train_images, train_labels = split_arrays(root, "train")
    assert train_images.shape == (BIG_TRAIN, 28, 28)
    np.testing.assert_array_equal(train_images[:], images)
    np.testing.assert_array_equal(train_labels[:], labels)
    np.testing.assert_array_equal(split_arrays(root, "test")[0][:], images[:20])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_during_ingest_cleans_up(
    tmp_path: Path, big_dataset: tuple[Path, np.ndarray, np.ndarray], sig: signal.Signals
) -> None:
    raw_dir, _, _ = big_dataset
    out = tmp_path / "big.zarr"
    proc = start_ingest(raw_dir, out)
    wait_until_writing(proc, out)
    time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), stderr  # 128 + signal
    said = "terminated (SIGTERM)" if sig == signal.SIGTERM else "interrupted"
    assert f"error: {said}; no partial output was kept" in stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not manifest_path(out).exists()
    assert not temp_path(out).exists(), sorted(map(str, temp_path(out).rglob("*")))[:10]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{out.name}.lock"]


# ----------------------------------------------------------------------------- real MNIST


@pytest.mark.mnist
def test_real_mnist_ingest(tmp_path: Path, real_mnist_dir: Path) -> None:
    raw = tmp_path / "raw"
    fetch_mnist(raw, source=str(real_mnist_dir), files=MNIST_FILES)
    out = tmp_path / "mnist.zarr"
    result = ingest(out=out, sources=default_sources(raw), lock_timeout=0)
    assert result.result["splits"]["train"]["images"] == 60000
    assert result.result["splits"]["test"]["images"] == 10000
    root = open_store(out)
    assert root.attrs["image_shape"] == [28, 28]
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = split_arrays(root, split)
        expected_images = read_idx(raw / f"{MNIST_NAMES[(split, 'images')]}.gz")
        expected_labels = read_idx(raw / f"{MNIST_NAMES[(split, 'labels')]}.gz")
        assert images.shape == expected_images.shape == (n, 28, 28)
        assert images.dtype == np.uint8
        np.testing.assert_array_equal(images[:], expected_images)
        np.testing.assert_array_equal(labels[:], expected_labels)
        assert (
            result.result["splits"][split]["label_counts"]
            == np.bincount(expected_labels, minlength=10).tolist()
        )
    keys = {name: f"{split}_{kind}" for (split, kind), name in MNIST_NAMES.items()}
    for spec in MNIST_FILES:
        assert root.attrs["sources"][keys[spec.name]]["content_sha256"] == spec.sha256
        assert root.attrs["sources"][keys[spec.name]]["content_bytes"] == spec.bytes
    assert not temp_path(out).exists()


# ----------------------------------------------------------------------------- bad input: issue 10


def _corrupt_payload(path: Path) -> None:
    """Flip bytes of a gzip file's deflate stream well after the idx header, so the header
    reads fine and the stream breaks only while the content is read."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) - 16):
        data[i] ^= 0x55
    path.write_bytes(bytes(data))


def test_corrupt_gzip_payload_is_bad_input(tmp_path: Path, dataset: SyntheticDataset) -> None:
    """Was ChecksumError (exit 1) from the content digest: a corrupt input is bad input."""
    _corrupt_payload(dataset.paths[("train", "images")])
    out = tmp_path / "mnist.zarr"
    with pytest.raises(IdxFormatError, match="expected a valid gzip stream") as info:
        ingest(out=out, sources=sources_of(dataset), lock_timeout=0)
    assert MNIST_NAMES[("train", "images")] in str(info.value)
    assert info.value.exit_code == 2
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("value", "kind"), [(np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite")]
)
@pytest.mark.parametrize("dtype", [">f4", ">f8"])
def test_non_finite_float_images_are_refused(
    tmp_path: Path, dataset: SyntheticDataset, value: float, kind: str, dtype: str
) -> None:
    images = dataset.images("train").astype(dtype) / 255
    images[37, 3, 4] = value  # in the fourth chunk of 10
    _replace(dataset, ("train", "images"), images)
    _replace(dataset, ("test", "images"), dataset.images("test").astype(dtype) / 255)
    out = tmp_path / "mnist.zarr"
    with pytest.raises(IdxFormatError, match=f"expected finite pixel values, got {kind}.*37"):
        ingest(out=out, sources=sources_of(dataset), chunk_size=10, lock_timeout=0)
    assert_nothing_written(out)


def test_finite_float_images_are_accepted(tmp_path: Path, dataset: SyntheticDataset) -> None:
    for split in ("train", "test"):
        _replace(dataset, (split, "images"), dataset.images(split).astype(">f4") / 255)
    out = tmp_path / "mnist.zarr"
    ingest(out=out, sources=sources_of(dataset), chunk_size=10, lock_timeout=0)
    stored = split_arrays(open_store(out), "train")[0][:]
    np.testing.assert_array_equal(stored, dataset.images("train").astype(np.float32) / 255)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((0, 28, 28), np.uint8), "expected at least one train image, got 0"),
        (np.zeros((50, 0, 28), np.uint8), r"at least 1x1 pixels, got shape \(50, 0, 28\)"),
        (np.zeros((50, 28, 0), np.uint8), r"at least 1x1 pixels, got shape \(50, 28, 0\)"),
    ],
    ids=["no-images", "zero-height", "zero-width"],
)
def test_empty_split_and_zero_size_images_are_refused(
    tmp_path: Path, dataset: SyntheticDataset, images: np.ndarray, message: str
) -> None:
    _replace(dataset, ("train", "images"), images)
    _replace(dataset, ("train", "labels"), np.zeros(len(images), np.uint8))
    out = tmp_path / "mnist.zarr"
    with pytest.raises(InputError, match=message):
        ingest(out=out, sources=sources_of(dataset), lock_timeout=0)
    assert_nothing_written(out)
