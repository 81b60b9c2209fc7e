"""The features stage (pipeline.features) and the ``features`` command."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.catalogue import FeatureConfig, load_config
from pipeline.errors import InputError, StoreError
from pipeline.extract import extract_features
from pipeline.features import features
from pipeline.parquet import part_files, read_features
from pipeline.stage import manifest_path, read_manifest
from pipeline.store import open_store, split_arrays

CONFIG: dict[str, Any] = {
    "views": {"d": [{"op": "deskew"}], "b": [{"op": "binarize", "method": "otsu"}]},
    "features": [
        {"name": "hog_c7", "family": "hog", "view": "d"},
        {"name": "moments", "family": "moments", "view": "b"},
        {"name": "px", "family": "pixels", "factor": 2},
    ],
}


@pytest.fixture
def config() -> FeatureConfig:
    return load_config(CONFIG)


def store_images(store: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = split_arrays(open_store(store), split)
    return images[:], labels[:]


def per_chunk(images: np.ndarray, config: FeatureConfig, chunk: int) -> np.ndarray:
    """extract_features of each store chunk, concatenated: what the stage computes."""
    parts = [extract_features(images[a : a + chunk], config) for a in range(0, len(images), chunk)]
    return np.concatenate(parts)


def read_both(folder: Path, config: FeatureConfig) -> dict[str, Any]:
    return {s: read_features(folder, split=s, expected_hash=config.hash) for s in ("train", "test")}


def snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- stage


def test_features_stage_writes_what_extract_features_computes(
    make_store: Callable[..., Path], tmp_path: Path, config: FeatureConfig
) -> None:
    store = make_store(chunk_size=16, n_train=40, n_test=15)
    out = tmp_path / "features"
    result = features(store=store, out=out, config=config, workers=2)
    assert not result.skipped
    r = result.result
    assert r["rows"] == {"train": 40, "test": 15}
    assert r["parts"] == 3 + 1
    assert r["config_hash"] == config.hash
    assert r["features"] == sum(r["widths"].values())
    for split, fs in read_both(out, config).items():
        images, labels = store_images(store, split)
        np.testing.assert_array_equal(fs.X, per_chunk(images, config, 16))
        np.testing.assert_array_equal(fs.y, labels)
        assert fs.X.shape[1] == r["features"]
    manifest = read_manifest(out)
    assert manifest is not None and manifest["status"] == "complete"
    assert manifest["params"]["config_hash"] == config.hash
    assert not list(tmp_path.glob(".features.partial*"))


def test_features_stage_is_skipped_when_up_to_date_and_rebuilt_with_force(
    make_store: Callable[..., Path], tmp_path: Path, config: FeatureConfig
) -> None:
    store = make_store(n_train=20, n_test=10)
    out = tmp_path / "features"
    first = features(store=store, out=out, config=config, workers=1)
    before = snapshot(out)
    again = features(store=store, out=out, config=config, workers=1)
    assert again.skipped
    assert again.result == first.result
    assert snapshot(out) == before
    time.sleep(0.01)  # distinct mtimes
    forced = features(store=store, out=out, config=config, workers=1, force=True)
    assert not forced.skipped
    assert snapshot(out) != before
    assert features(store=store, out=out, config=config, workers=1).skipped


@pytest.mark.parametrize("codec", ["lz4", "zstd", "snappy"])
def test_compressed_features_hold_the_same_values(
    make_store: Callable[..., Path], tmp_path: Path, config: FeatureConfig, codec: str
) -> None:
    store = make_store(n_train=30, n_test=10)
    plain = tmp_path / "plain"
    features(store=store, out=plain, config=config, workers=1)
    packed = tmp_path / codec
    features(store=store, out=packed, config=config, workers=1, compression=codec)
    for split in ("train", "test"):
        np.testing.assert_array_equal(
            read_features(packed, split=split).X, read_features(plain, split=split).X
        )
    files = part_files(packed)
    assert {pq.ParquetFile(f).metadata.row_group(0).column(3).compression for f in files} == {
        codec.upper()
    }
    assert pq.ParquetFile(part_files(plain)[0]).metadata.row_group(0).column(3).compression == (
        "UNCOMPRESSED"
    )
    manifest = read_manifest(packed)
    assert manifest is not None and manifest["params"]["compression"] == codec
    # Another codec is another output: not up to date.
    assert not features(store=store, out=packed, config=config, workers=1).skipped


def test_features_stage_rejects_an_unknown_codec(
    make_store: Callable[..., Path], tmp_path: Path, config: FeatureConfig
) -> None:
    store = make_store(n_train=5, n_test=5)
    with pytest.raises(InputError, match=r"expected one of .* got 'brotli'"):
        features(store=store, out=tmp_path / "f", config=config, compression="brotli")
    assert not (tmp_path / "f").exists()


def test_features_stage_rebuilds_when_the_store_changes(
    make_store: Callable[..., Path], tmp_path: Path, config: FeatureConfig
) -> None:
    store = make_store(n_train=20, n_test=10, seed=1)
    out = tmp_path / "features"
    features(store=store, out=out, config=config, workers=1)
    old = read_features(out, split="train").X
    make_store(n_train=20, n_test=10, seed=2)  # same path, other images
    result = features(store=store, out=out, config=config, workers=1)
    assert not result.skipped
    new = read_features(out, split="train").X
    assert not np.array_equal(old, new)
    images, _ = store_images(store, "train")
    np.testing.assert_array_equal(new, per_chunk(images, config, 16))


def test_features_stage_rebuilds_when_the_configuration_changes(
    make_store: Callable[..., Path], tmp_path: Path, config: FeatureConfig
) -> None:
    store = make_store(n_train=20, n_test=10)
    out = tmp_path / "features"
    features(store=store, out=out, config=config, workers=1)
    other = load_config({"features": [{"name": "zones", "family": "zoning"}]})
    result = features(store=store, out=out, config=other, workers=1)
    assert not result.skipped
    assert read_features(out, split="test", expected_hash=other.hash).X.shape == (10, 16)


def test_features_stage_is_independent_of_the_store_chunk_size(
    make_store: Callable[..., Path], tmp_path: Path
) -> None:
    config = load_config()  # the default: every default family
    results = {}
    for chunk in (7, 64):
        store = make_store(f"chunk{chunk}.zarr", chunk_size=chunk, n_train=60, n_test=20)
        out = tmp_path / f"features-{chunk}"
        features(store=store, out=out, config=config, workers=2)
        results[chunk] = (read_both(out, config), len(part_files(out)))
    (a, parts_a), (b, parts_b) = results[7], results[64]
    assert parts_a == 9 + 3 and parts_b == 1 + 1
    for split in ("train", "test"):
        np.testing.assert_array_equal(a[split].X, b[split].X)
        np.testing.assert_array_equal(a[split].y, b[split].y)
        np.testing.assert_array_equal(a[split].image_id, b[split].image_id)


def test_features_stage_on_non_square_images(
    make_store: Callable[..., Path], tmp_path: Path
) -> None:
    store = make_store(image_shape=(20, 32), n_train=12, n_test=5, chunk_size=5)
    config = load_config(
        {"features": [{"family": "hog", "cell": 4}, {"family": "zoning"}, {"family": "profiles"}]}
    )
    out = tmp_path / "features"
    features(store=store, out=out, config=config, workers=1)
    fs = read_features(out, split="train")
    images, _ = store_images(store, "train")
    np.testing.assert_array_equal(fs.X, per_chunk(images, config, 5))
    assert fs.meta["image_shape"] == [20, 32]


def test_features_stage_with_an_empty_split(
    make_store: Callable[..., Path], tmp_path: Path
) -> None:
    # ingest refuses an empty split since issue 10; a store can still hold one (made by an
    # earlier version, or by hand): empty the test split of an ingested store.
    import zarr

    from pipeline.store import create_split

    store = make_store(n_train=12, n_test=3)
    root = zarr.open_group(str(store), mode="r+", zarr_format=3)
    del root["test"]
    create_split(
        root, "test", count=0, image_shape=(28, 28), image_dtype=np.dtype(np.uint8),
        label_dtype=np.dtype(np.uint8), chunk_size=16,
    )  # fmt: skip
    out = tmp_path / "features"
    result = features(store=store, out=out, config=load_config(), workers=1)
    assert result.result["rows"] == {"train": 12, "test": 0}


def test_features_stage_needs_a_store(tmp_path: Path, config: FeatureConfig) -> None:
    with pytest.raises(InputError, match="expected store"):
        features(store=tmp_path / "missing.zarr", out=tmp_path / "f", config=config)
    (tmp_path / "not-a-store").mkdir()
    with pytest.raises(StoreError, match="expected"):
        features(store=tmp_path / "not-a-store", out=tmp_path / "f", config=config)
    assert not (tmp_path / "f").exists()


# ----------------------------------------------------------------------------- distributed


@pytest.mark.distributed
def test_features_on_a_real_distributed_cluster(
    make_store: Callable[..., Path], tmp_path: Path, config: FeatureConfig
) -> None:
    """Two worker processes on 127.0.0.1; the result equals the local threaded run."""
    distributed = pytest.importorskip("distributed")
    store = make_store(chunk_size=16, n_train=50, n_test=20)
    local = tmp_path / "local"
    features(store=store, out=local, config=config, workers=2)
    t0 = time.monotonic()
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        worker_dashboard_address=None,
    ) as cluster:
        remote = tmp_path / "remote"
        result = features(
            store=store, out=remote, config=config, scheduler=cluster.scheduler_address
        )
    elapsed = time.monotonic() - t0
    assert not result.skipped
    assert result.result["parts"] == 4 + 2
    assert sorted(p.name for p in remote.iterdir()) == sorted(p.name for p in local.iterdir())
    for split, fs in read_both(remote, config).items():
        ref = read_features(local, split=split)
        np.testing.assert_array_equal(fs.X, ref.X)
        np.testing.assert_array_equal(fs.y, ref.y)
        np.testing.assert_array_equal(fs.image_id, ref.image_id)
    assert elapsed < 30, f"the distributed run took {elapsed:.1f} s"


# ----------------------------------------------------------------------------- CLI

runner = CliRunner()


@pytest.fixture
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the CLI in an empty folder without settings from the caller's environment."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("MNIST_PIPELINE"):
            monkeypatch.delenv(name)


def invoke(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def assert_one_error_line(result: Any, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.usefixtures("_isolated")
def test_cli_features_with_an_unknown_codec(
    make_store: Callable[..., Path], tmp_path: Path
) -> None:
    store = make_store(n_train=5, n_test=5)
    args = ("features", "--store", store, "--out", tmp_path / "f", "--compression", "gzip9")
    result = invoke(*args)
    assert_one_error_line(result, 2, "--compression", "gzip9", "lz4")
    assert not (tmp_path / "f").exists()


@pytest.mark.usefixtures("_isolated")
def test_cli_features_with_a_missing_store(tmp_path: Path) -> None:
    result = invoke("features", "--store", tmp_path / "nope.zarr", "--out", tmp_path / "f")
    assert_one_error_line(result, 2, "nope.zarr", "expected")


@pytest.mark.usefixtures("_isolated")
@pytest.mark.parametrize(
    "content",
    ["[[features]\nfamily = 'hog'\n", "[[features]]\nfamily = 'wavelets'\n",
     "[[features]]\nfamily = 'hog'\ncells = 7\n", "[[features]]\nfamily = 'pixels'\nfactor = 3\n"],
    ids=["bad-toml", "unknown-family", "unknown-parameter", "impossible-factor"],
)  # fmt: skip
def test_cli_features_with_a_bad_feature_config(
    make_store: Callable[..., Path], tmp_path: Path, content: str
) -> None:
    store = make_store(n_train=5, n_test=5)
    cfg = tmp_path / "features.toml"
    cfg.write_text(content)
    result = invoke("features", "--store", store, "--out", tmp_path / "f", "--feature-config", cfg)
    assert_one_error_line(result, 2, "expected")
    assert not (tmp_path / "f").exists()


@pytest.mark.usefixtures("_isolated")
def test_cli_features_success_and_up_to_date(
    make_store: Callable[..., Path], tmp_path: Path
) -> None:
    store = make_store(n_train=20, n_test=10)
    cfg = tmp_path / "features.toml"
    cfg.write_text(
        '[views]\nd = [{op = "deskew"}]\n\n'
        '[[features]]\nname = "hog_c7"\nfamily = "hog"\nview = "d"\ncell = 7\n\n'
        '[[features]]\nname = "m"\nfamily = "moments"\n'
    )
    out = tmp_path / "f"
    args = ["features", "--store", store, "--out", out, "--feature-config", cfg, "--workers", 1]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    config = load_config(cfg)
    lines = [line for line in result.stdout.splitlines() if line.startswith("features:")]
    assert len(lines) == 1, result.stdout
    assert "written" in lines[0]
    assert "train 20" in lines[0] and "test 10" in lines[0]
    assert config.hash[:12] in lines[0]
    assert read_features(out, split="train", expected_hash=config.hash).X.shape[0] == 20
    assert manifest_path(out).is_file()
    again = invoke(*args)
    assert again.exit_code == 0
    assert "up to date" in again.stdout


@pytest.mark.parametrize("cut", [0.5, 0.0])
def test_a_truncated_chunk_is_a_store_error_naming_the_store(
    make_store: Callable[..., Path], tmp_path: Path, config: FeatureConfig, cut: float
) -> None:
    """A chunk file cut short made the zstd codec raise RuntimeError inside a dask task."""
    store = make_store(chunk_size=16, n_train=40, n_test=15)
    chunk = store / "train" / "images" / "c" / "1" / "0" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: int(len(data) * cut)] if cut else data[:7])
    out = tmp_path / "features"
    with pytest.raises(StoreError, match="expected readable chunks in train/images") as info:
        features(store=store, out=out, config=config, workers=2)
    assert str(store) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".features")) == [
        ".features.lock"
    ]
    assert not out.exists()
