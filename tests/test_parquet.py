"""The feature parquet dataset (pipeline.parquet): schema, metadata, readers, read_features."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_synthetic_dataset

from pipeline.catalogue import FeatureConfig, load_config
from pipeline.errors import ConfigMismatchError, InputError, StoreError
from pipeline.extract import extract_features, feature_widths
from pipeline.features import features
from pipeline.ingest import default_sources, ingest
from pipeline.parquet import META_KEY, part_checksum, part_files, read_features, read_meta
from pipeline.paths import manifest_path
from pipeline.shape_features import MOMENT_NAMES, TOPOLOGY_NAMES
from pipeline.store import open_store, split_arrays

#: Both layouts: vector families (list columns) and scalar families (one column each).
CONFIG: dict[str, Any] = {
    "views": {"d": [{"op": "deskew"}]},
    "features": [
        {"name": "hog_c7", "family": "hog", "view": "d", "cell": 7},
        {"name": "moments", "family": "moments"},
        {"name": "zones", "family": "zoning", "grid": 2},
        {"name": "px", "family": "pixels", "factor": 4},
        {"name": "topo", "family": "topology", "view": "d"},
    ],
}
N = {"train": 50, "test": 20}
CHUNK = 16
SCALARS = (
    [f"moments_{n}" for n in MOMENT_NAMES]
    + [f"zones_r{r}_c{c}" for r in range(2) for c in range(2)]
    + [f"topo_{n}" for n in TOPOLOGY_NAMES]
)
VECTORS = ("hog_c7", "px")
#: Stored feature columns in configuration order.
FEATURE_COLUMNS = ["hog_c7", *SCALARS[:16], "px", *SCALARS[16:]]


@dataclass(frozen=True)
class Built:
    store: Path
    folder: Path
    config: FeatureConfig
    widths: dict[str, int]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("parquet")
    ds = write_synthetic_dataset(root / "raw", n_train=N["train"], n_test=N["test"])
    store = root / "mnist.zarr"
    ingest(out=store, sources=default_sources(ds.raw_dir), chunk_size=CHUNK)
    config = load_config(CONFIG)
    folder = root / "features"
    features(store=store, out=folder, config=config, workers=2)
    return Built(store, folder, config, dict(feature_widths(config, (28, 28))))


def store_split(store: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = split_arrays(open_store(store), split)
    return images[:], labels[:]


# ----------------------------------------------------------------------------- files + schema


def test_one_part_per_chunk(built: Built) -> None:
    names = sorted(p.name for p in built.folder.iterdir())
    expected = [
        f"{split}-{i:05d}.parquet"
        for split in ("test", "train")
        for i in range(-(-N[split] // CHUNK))
    ]
    assert names == expected
    assert part_files(built.folder, "train") == sorted(built.folder.glob("train-*.parquet"))


def test_arrow_schema(built: Built) -> None:
    for path in part_files(built.folder):
        schema = pq.read_schema(path)
        assert schema.names == ["image_id", "split", "label", *FEATURE_COLUMNS]
        assert schema.field("image_id").type == pa.int64()
        assert schema.field("split").type == pa.dictionary(pa.int8(), pa.string())
        assert schema.field("label").type == pa.int16()
        for name in SCALARS:
            assert schema.field(name).type == pa.float32(), name
        item = pa.field("item", pa.float32(), nullable=False)
        for name in VECTORS:
            assert schema.field(name).type == pa.list_(item, built.widths[name]), name
        for name in schema.names:  # nothing is ever null
            assert not schema.field(name).nullable, name


def test_schema_metadata(built: Built) -> None:
    raw = pq.read_schema(part_files(built.folder)[0]).metadata[META_KEY]
    meta = json.loads(raw)
    assert meta == read_meta(built.folder)
    assert meta["config"] == built.config.to_dict()
    assert meta["config_hash"] == built.config.hash
    assert load_config(meta["config"]).hash == meta["config_hash"]
    assert meta["image_shape"] == [28, 28]
    assert meta["num_classes"] == 10
    names = [c["name"] for c in meta["columns"]]
    assert names == FEATURE_COLUMNS
    assert meta["columns"][-1]["stop"] == sum(built.widths.values())
    # Every part carries the same schema (and so the same metadata).
    schemas = {pq.read_schema(p) for p in part_files(built.folder)}
    assert all(s.equals(next(iter(schemas)), check_metadata=True) for s in schemas)


# ----------------------------------------------------------------------------- readers


def test_pandas_reads_the_folder(built: Built) -> None:
    df = pd.read_parquet(built.folder)
    assert len(df) == N["train"] + N["test"]
    assert df["image_id"].dtype == np.int64
    assert df["label"].dtype == np.int16
    assert set(df["split"].astype(str)) == {"train", "test"}
    for name in SCALARS:
        assert df[name].dtype == np.float32, name
    for name in VECTORS:
        lengths = df[name].map(len)
        assert (lengths == built.widths[name]).all(), name
    train = df[df["split"].astype(str) == "train"].sort_values("image_id")
    assert train["image_id"].tolist() == list(range(N["train"]))


def test_polars_reads_the_glob(built: Built) -> None:
    df = pl.read_parquet(str(built.folder / "*.parquet"))
    assert df.height == N["train"] + N["test"]
    assert df.schema["image_id"] == pl.Int64
    assert df.schema["label"] == pl.Int16
    assert df.schema["split"] in (pl.Categorical, pl.String, pl.Enum) or isinstance(
        df.schema["split"], pl.Categorical | pl.Enum
    )
    for name in SCALARS:
        assert df.schema[name] == pl.Float32, name
    for name in VECTORS:
        dtype = df.schema[name]
        assert dtype in (pl.Array(pl.Float32, built.widths[name]), pl.List(pl.Float32)), dtype
    assert sorted(df["split"].cast(pl.String).unique().to_list()) == ["test", "train"]


def test_duckdb_reads_the_glob(built: Built) -> None:
    con = duckdb.connect()
    try:
        source = f"read_parquet('{built.folder}/*.parquet')"
        types = {
            row[0]: row[1] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()
        }
        assert list(types) == ["image_id", "split", "label", *FEATURE_COLUMNS]
        assert types["image_id"] == "BIGINT"
        assert types["label"] == "SMALLINT"
        assert types["split"] == "VARCHAR"
        for name in SCALARS:
            assert types[name] == "FLOAT", name
        for name in VECTORS:
            assert types[name] in (f"FLOAT[{built.widths[name]}]", "FLOAT[]"), types[name]
        counts = dict(
            con.execute(f"SELECT split, count(*) FROM {source} GROUP BY split").fetchall()
        )
        assert counts == N
        _, labels = store_split(built.store, "train")
        by_label = dict(
            con.execute(
                f"SELECT label, count(*) FROM {source} WHERE split = 'train' GROUP BY label"
            ).fetchall()
        )
        assert by_label == {int(k): int(v) for k, v in enumerate(np.bincount(labels)) if v}
    finally:
        con.close()


# ----------------------------------------------------------------------------- read_features


@pytest.mark.parametrize("split", ["train", "test"])
def test_read_features_equals_extract_features(built: Built, split: str) -> None:
    fs = read_features(built.folder, split=split, expected_hash=built.config.hash)
    images, labels = store_split(built.store, split)
    assert fs.X.dtype == np.float32
    # One extract_features call per store chunk (chunk independence: see test_features).
    want = [
        extract_features(images[a : a + CHUNK], built.config) for a in range(0, N[split], CHUNK)
    ]
    np.testing.assert_array_equal(fs.X, np.concatenate(want))
    np.testing.assert_array_equal(fs.y, labels.astype(np.int64))
    assert fs.y.dtype == np.int64
    np.testing.assert_array_equal(fs.image_id, np.arange(N[split]))
    assert fs.meta["config_hash"] == built.config.hash


def test_read_features_refuses_another_configuration(built: Built) -> None:
    with pytest.raises(ConfigMismatchError, match="expected features of configuration") as info:
        read_features(built.folder, split="train", expected_hash="wrong")
    assert isinstance(info.value, InputError)
    other = load_config({"features": [{"family": "moments"}]})
    with pytest.raises(ConfigMismatchError):
        read_features(built.folder, split="train", expected_hash=other.hash)


def relist(folder: Path, like: Path) -> None:
    """Give a hand-made copy of a feature dataset a features manifest listing its parts."""
    manifest = json.loads(manifest_path(like).read_text())
    manifest["result"]["part_files"] = [
        {
            "name": p.name,
            "split": p.name.split("-")[0],
            "rows": pq.read_metadata(p).num_rows,
            "crc32c": part_checksum(p.read_bytes()),
        }
        for p in part_files(folder)
    ]
    manifest_path(folder).write_text(json.dumps(manifest))


def test_read_features_without_parts(tmp_path: Path, built: Built) -> None:
    with pytest.raises(StoreError, match="expected parquet part files"):
        read_features(tmp_path, split="train")
    # A folder with only the test split.
    only_test = tmp_path / "only-test"
    only_test.mkdir()
    for p in part_files(built.folder, "test"):
        (only_test / p.name).write_bytes(p.read_bytes())
    relist(only_test, built.folder)
    with pytest.raises(StoreError, match="train"):
        read_features(only_test, split="train")


def test_read_features_of_multi_chunk_columns(built: Built, tmp_path: Path) -> None:
    """Parts written with several row groups (chunked arrow columns) read the same."""
    folder = tmp_path / "rowgroups"
    folder.mkdir()
    for p in part_files(built.folder):
        pq.write_table(pq.read_table(p), folder / p.name, row_group_size=5)
    relist(folder, built.folder)
    a = read_features(built.folder, split="train")
    b = read_features(folder, split="train")
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.y, b.y)


# ----------------------------------------------------------------------------- damaged parts


def _damaged_copy(built: Built, tmp_path: Path, damage: str, part: str) -> Path:
    import shutil

    folder = tmp_path / "features"
    shutil.copytree(built.folder, folder)
    path = folder / part
    data = bytearray(path.read_bytes())
    if damage == "cut":
        data = data[: len(data) // 2]
    elif damage == "garbage-pages":  # footer intact, page headers destroyed
        data[4 : len(data) // 2] = bytes(len(data) // 2 - 4)
    else:
        data = data[:10]
    path.write_bytes(bytes(data))
    # A manifest that lists the damaged bytes (as if features had written them so): the
    # part then reaches the parquet decoder instead of failing its checksum.
    manifest = json.loads(manifest_path(built.folder).read_text())
    for entry in manifest["result"]["part_files"]:
        if entry["name"] == part:
            entry["crc32c"] = part_checksum(bytes(data))
    manifest_path(folder).write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("damage", ["cut", "garbage-pages", "ten-bytes"])
@pytest.mark.parametrize("part", ["train-00000.parquet", "train-00002.parquet"])
def test_a_damaged_part_is_a_store_error_naming_it(
    built: Built, tmp_path: Path, damage: str, part: str
) -> None:
    """Was pyarrow's ArrowInvalid/OSError traceback out of train. Part 0 is also the one
    :func:`read_meta` reads the schema of."""
    folder = _damaged_copy(built, tmp_path, damage, part)
    with pytest.raises(StoreError, match="expected a readable parquet part") as info:
        read_features(folder, split="train")
    assert str(folder / part) in str(info.value)
    assert "\n" not in str(info.value)


def test_a_system_error_reading_a_part_stays_an_os_error(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EIO, "Input/output error", "x.parquet")

    monkeypatch.setattr(pq, "read_table", fail)
    with pytest.raises(OSError, match="Input/output error") as info:
        read_features(built.folder, split="train")
    assert not isinstance(info.value, StoreError)
