"""Feature tables in parquet: schema, writing one part per chunk, reading back as ``X, y``.

A feature dataset is a folder of part files ``<split>-<chunk:05d>.parquet`` that all share
one schema::

    image_id   int64     row of the image in its split of the zarr store
    split      string    "train" or "test" (dictionary-encoded)
    label      int16     true class
    <name>_<sub>  float32                 one column per scalar feature (e.g. moments_ink)
    <name>     fixed_size_list<float32>[k]  one column per vector family (e.g. hog_c7)

The schema metadata key ``mnist_pipeline`` holds JSON with the feature configuration, its
hash, the column layout and the source store. It reads with ``pandas.read_parquet(folder)``,
``polars.read_parquet(folder + "/*.parquet")`` and duckdb's ``read_parquet('folder/*.parquet')``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.catalogue import Column
from pipeline.errors import ConfigMismatchError, StoreError
from pipeline.paths import manifest_path, read_manifest

META_KEY = b"mnist_pipeline"
#: Parquet codecs the features stage offers (every parquet reader supports them).
COMPRESSIONS = ("none", "lz4", "zstd", "snappy")
# Default "none": the feature floats compress poorly (lz4 ~1.7x, zstd ~1.75x) and
# compressing costs about as much CPU as extracting them (measured 24 vs 14 us per image
# with lz4); the dataset is an intermediate read once by `train`. `--compression zstd`
# for archiving.
COMPRESSION = "none"
#: Rows handed to the parquet encoder at a time (see :func:`write_table`).
WRITE_SLICE = 512


def feature_schema(columns: list[Column], meta: dict[str, Any]) -> pa.Schema:
    """The arrow schema of a feature table with ``meta`` as JSON schema metadata."""
    fields = [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("split", pa.dictionary(pa.int8(), pa.string()), nullable=False),
        pa.field("label", pa.int16(), nullable=False),
    ]
    # Required (non-null) fields and list items: parquet then needs no null bookkeeping per
    # value, which makes writing the list columns about a quarter faster.
    item = pa.field("item", pa.float32(), nullable=False)
    for col in columns:
        if col.layout == "list":
            fields.append(pa.field(col.name, pa.list_(item, col.stop - col.start), nullable=False))
        else:
            fields.append(pa.field(col.name, pa.float32(), nullable=False))
    return pa.schema(fields, metadata={META_KEY: json.dumps(meta, sort_keys=True).encode()})


def feature_table(
    X: np.ndarray,
    *,
    image_id: np.ndarray,
    split: str,
    labels: np.ndarray,
    columns: list[Column],
    schema: pa.Schema,
) -> pa.Table:
    """Arrow table of one block of features ``X`` (n, K) float32."""
    n = X.shape[0]
    name = split.encode()
    split_values = _from_buffers(pa.utf8(), 1, np.array([0, len(name)], np.int32), name)
    arrays: list[pa.Array] = [
        _primitive(np.asarray(image_id, np.int64)),
        pa.DictionaryArray.from_arrays(_primitive(np.zeros(n, np.int8)), split_values),
        _primitive(np.asarray(labels, np.int16)),
    ]
    for col in columns:
        block = np.ascontiguousarray(X[:, col.start : col.stop], dtype=np.float32)
        if col.layout == "list":
            list_type = schema.field(col.name).type
            arrays.append(pa.FixedSizeListArray.from_arrays(_primitive(block), type=list_type))
        else:
            arrays.append(_primitive(block[:, 0]))
    return pa.Table.from_arrays(arrays, schema=schema)


def _primitive(a: np.ndarray) -> pa.Array:
    """Zero-copy arrow array of a numpy array's values (flattened, C order).

    Not ``pa.array``: its first call imports pandas (0.2 s, a tenth of the features stage).
    """
    a = np.ascontiguousarray(a)
    return _from_buffers(pa.from_numpy_dtype(a.dtype), a.size, a)


def _from_buffers(kind: pa.DataType, n: int, *buffers: Any) -> pa.Array:
    return pa.Array.from_buffers(kind, n, [None, *(pa.py_buffer(b) for b in buffers)])


def write_table(path: Path, table: pa.Table, *, compression: str = COMPRESSION) -> str:
    """Write one parquet file (a single row group) with ``compression`` in
    :data:`COMPRESSIONS`; returns the file's :func:`part_checksum`."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"expected compression in {COMPRESSIONS}, got {compression!r}")
    rows = max(1, table.num_rows)
    # Still one row group, but arrow encodes it a slice at a time: its per-value level
    # buffers then stay in cache instead of being regrown for the whole part.
    table = pa.Table.from_batches(table.to_batches(max_chunksize=WRITE_SLICE), table.schema)
    pq.write_table(
        table,
        path,
        compression=compression,
        row_group_size=rows,
        # Dictionary-encoding float features is wasted work (every value is distinct).
        use_dictionary=["split"],
        write_statistics=["image_id", "split", "label"],
    )
    # Read back (from the page cache) rather than encoding into memory first: that took
    # ~90 MB more peak memory in the features stage and was no faster.
    return part_checksum(Path(path).read_bytes())


def part_checksum(data: bytes) -> str:
    """CRC-32C of a part file's bytes, as 8 hex digits.

    CRC-32C, not sha256: it detects a changed, truncated or swapped part as surely for
    this purpose, and runs on the CPU's CRC instruction (400 MB in 0.08 s here, sha256
    0.29 s: a fifth of the features stage).
    """
    return f"{google_crc32c.value(data):08x}"


def part_files(folder: Path, split: str | None = None) -> list[Path]:
    """The part files of a feature dataset (of one split), in chunk order."""
    pattern = f"{split}-*.parquet" if split else "*.parquet"
    return sorted(Path(folder).glob(pattern))


def _unreadable(path: Path, e: Exception) -> StoreError:
    detail = " ".join(str(e).split()) or type(e).__name__
    return StoreError(f"{path}: expected a readable parquet part, got {detail}")


@contextlib.contextmanager
def _parquet_errors(path: Path) -> Iterator[None]:
    """A cut-short or corrupt part becomes a :class:`StoreError` naming it; errors of the
    system (permission, I/O: an ``OSError`` with an errno) stay as they are (exit 1)."""
    try:
        yield
    except OSError as e:
        if e.errno is not None:
            raise
        raise _unreadable(path, e) from None
    except pa.ArrowException as e:
        raise _unreadable(path, e) from None


def _schema_meta(path: Path, schema: pa.Schema) -> dict[str, Any]:
    meta = schema.metadata or {}
    if META_KEY not in meta:
        raise StoreError(f"{path}: expected '{META_KEY.decode()}' schema metadata, got none")
    try:
        return dict(json.loads(meta[META_KEY]))
    except (ValueError, TypeError) as e:
        raise StoreError(
            f"{path}: expected JSON '{META_KEY.decode()}' schema metadata, got {e}"
        ) from None


def read_meta(folder: Path) -> dict[str, Any]:
    """The ``mnist_pipeline`` schema metadata of a feature dataset (of its first part)."""
    files = part_files(folder)
    if not files:
        raise StoreError(f"expected parquet part files in {folder}, got none (run features first)")
    with _parquet_errors(files[0]):
        schema = pq.read_schema(files[0])
    return _schema_meta(files[0], schema)


@dataclass(frozen=True)
class Part:
    """One part file as the features manifest lists it."""

    name: str
    split: str
    rows: int
    crc32c: str


def listed_parts(folder: Path) -> list[Part]:
    """The parts that the ``features`` manifest beside ``folder`` lists, after checking
    that the folder holds exactly those part files.

    Raises :class:`StoreError` when there is no complete features manifest, or when a
    listed part is missing or an unlisted one is present (a part deleted, or copied in
    from another run).
    """
    folder = Path(folder)
    where = manifest_path(folder.absolute())
    manifest = read_manifest(folder.absolute())
    parts = ((manifest or {}).get("result") or {}).get("part_files")
    if (
        not isinstance(manifest, dict)
        or manifest.get("stage") != "features"
        or manifest.get("status") != "complete"
        or not isinstance(parts, list)
    ):
        raise StoreError(
            f"{folder}: expected a complete features manifest listing its parts at {where}, "
            "got none (run features again to write the dataset with one)"
        )
    try:
        listed = [Part(**p) for p in parts]
    except TypeError as e:
        raise StoreError(
            f"{where}: expected parts with name, split, rows, crc32c, got {e}"
        ) from None
    present = {p.name for p in part_files(folder)}
    names = {p.name for p in listed}
    if present != names:
        missing, extra = sorted(names - present), sorted(present - names)
        raise StoreError(
            f"{folder}: expected the {len(names)} part files its manifest lists, got "
            + "; ".join(
                ([f"missing {missing}"] if missing else [])
                + ([f"unlisted {extra}"] if extra else [])
            )
        )
    return listed


@dataclass(frozen=True)
class FeatureSet:
    """Features of one split: ``X`` (n, K) float32, ``y`` (n,) int64, ``image_id`` (n,).

    Unpacks as ``X, y = read_features(folder)``, like scikit-learn's dataset loaders.
    """

    X: np.ndarray
    y: np.ndarray
    image_id: np.ndarray
    meta: dict[str, Any]

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.X, self.y))


def _read_part(folder: Path, part: Part, *, config_hash: str) -> pa.Table:
    """One part, checked against its manifest entry: checksum, rows and configuration."""
    path = folder / part.name
    data = path.read_bytes()  # an OSError here is the machine's: exit 1
    got = part_checksum(data)
    if got != part.crc32c:
        raise StoreError(
            f"{path}: expected crc32c {part.crc32c} as the features manifest lists, got {got} "
            "(the part was changed or replaced after features wrote it)"
        )
    with _parquet_errors(path):
        table = pq.read_table(pa.BufferReader(data))
    if table.num_rows != part.rows:
        raise StoreError(f"{path}: expected {part.rows} rows, got {table.num_rows}")
    got_hash = _schema_meta(path, table.schema).get("config_hash")
    if got_hash != config_hash:
        raise StoreError(
            f"{path}: expected features of configuration {config_hash[:12]} like the rest "
            f"of the dataset, got {str(got_hash)[:12]}"
        )
    return table


def read_features(
    folder: str | os.PathLike[str], *, split: str = "train", expected_hash: str | None = None
) -> FeatureSet:
    """Read one split of a feature dataset into memory as a dense matrix.

    Every part is checked against the features manifest (:func:`listed_parts`): its
    checksum, row count and configuration; the split's ``image_id`` must be ``0 .. n-1``
    in order, so no image is missing or repeated.

    Raises :class:`ConfigMismatchError` when ``expected_hash`` is given and the features
    were made with another configuration, :class:`StoreError` when the dataset is not
    what its manifest says.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    parts = [p for p in listed_parts(folder) if p.split == split]
    config_hash = str(meta.get("config_hash"))
    if expected_hash is not None and config_hash != expected_hash:
        raise ConfigMismatchError(
            f"{folder}: expected features of configuration {expected_hash[:12]}, "
            f"got {config_hash[:12]} (re-run features with the model's "
            "feature configuration)"
        )
    if not parts:
        raise StoreError(f"{folder}: expected {split}-*.parquet part files, got none")
    layout = [Column(**c) for c in meta["columns"]]
    K = layout[-1].stop if layout else 0
    n = sum(p.rows for p in parts)
    X = np.empty((n, K), np.float32)
    y = np.empty(n, np.int64)
    ids = np.empty(n, np.int64)
    row = 0
    for part in parts:
        t = _read_part(folder, part, config_hash=config_hash)
        m = t.num_rows
        y[row : row + m] = t.column("label").to_numpy()
        ids[row : row + m] = t.column("image_id").to_numpy()
        for col in layout:
            k = col.stop - col.start
            r = row
            for chunk in t.column(col.name).chunks:
                c = len(chunk)
                if col.layout == "list":
                    # Zero-copy view of the list's values, then one copy into X.
                    flat = chunk.values.slice(chunk.offset * k, c * k).to_numpy()
                    X[r : r + c, col.start : col.stop] = flat.reshape(c, k)
                else:
                    X[r : r + c, col.start] = chunk.to_numpy(zero_copy_only=False)
                r += c
        row += m
        del t
    if not np.array_equal(ids, np.arange(n)):
        bad = int(np.flatnonzero(ids != np.arange(n))[0])
        raise StoreError(
            f"{folder}: expected {split} image ids 0..{n - 1} in order, got {ids[bad]} at row "
            f"{bad} (parts repeat or miss images)"
        )
    return FeatureSet(X=X, y=y, image_id=ids, meta=meta)
