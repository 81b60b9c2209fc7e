"""The zarr v3 dataset store: layout, writing, and lazy reading with dask.

Layout of a store (default ``data/mnist.zarr``)::

    /                    attributes: dataset, num_classes, image_shape, sources, ...
    /train/images        (N_train, H, W) image dtype (uint8 for MNIST), chunks (C, H, W)
    /train/labels        (N_train,) int, chunks (C,)
    /test/images         (N_test, H, W)
    /test/labels         (N_test,)

Image ids are the row positions inside each split.

Reading is strict. zarr reads a chunk that is not in the store as the array's fill value,
so a deleted chunk file, or a relative store path that a dask worker resolves against
another working directory, would silently turn images into zeros. Stores are written with
every chunk present (``write_empty_chunks``); :func:`open_store` checks that each array has
all its chunks, and :class:`StrictArray`, what tasks read through, checks the chunks it
reads exist, inside the task, wherever it runs.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from pipeline.errors import PipelineError, StoreError

SPLITS = ("train", "test")
STORE_FORMAT = "mnist-pipeline/dataset/1"


def create_store(path: Path, *, attributes: dict[str, Any]) -> zarr.Group:
    """Create an empty zarr v3 group at ``path`` with root ``attributes``."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs.update({"format": STORE_FORMAT, **attributes})
    return root


def create_split(
    root: zarr.Group,
    split: str,
    *,
    count: int,
    image_shape: tuple[int, ...],
    image_dtype: np.dtype,
    label_dtype: np.dtype,
    chunk_size: int,
) -> tuple[zarr.Array, zarr.Array]:
    """Create the empty ``images`` and ``labels`` arrays of one split, chunked along N."""
    group = root.create_group(split)
    chunk = max(1, min(chunk_size, count)) if count else 1
    images = group.create_array(
        "images",
        shape=(count, *image_shape),
        chunks=(chunk, *image_shape),
        dtype=image_dtype,
        dimension_names=("image", "y", "x"),
        config=_EVERY_CHUNK,
    )
    labels = group.create_array(
        "labels",
        shape=(count,),
        chunks=(chunk,),
        dtype=label_dtype,
        dimension_names=("image",),
        config=_EVERY_CHUNK,
    )
    return images, labels


#: Write chunks that hold only the fill value too (zarr skips them by default), so that a
#: missing chunk always means a damaged store, never a chunk of zeros.
_EVERY_CHUNK: Any = {"write_empty_chunks": True}


def open_store(path: Path) -> zarr.Group:
    """Open a dataset store read-only; raises :class:`StoreError` when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"expected a zarr store at {path}, got no such folder (run ingest first)")
    try:
        root = zarr.open_group(str(path), mode="r", zarr_format=3)
    except Exception as e:  # zarr raises several types for a non-store folder
        raise StoreError(
            f"expected a zarr v3 store at {path}, got {type(e).__name__}: {e}"
        ) from None
    fmt = root.attrs.get("format")
    if fmt != STORE_FORMAT:
        raise StoreError(f"{path}: expected store format {STORE_FORMAT!r}, got {fmt!r}")
    for split in SPLITS:
        for name in ("images", "labels"):
            array = root.get(f"{split}/{name}")
            if isinstance(array, zarr.Array):
                _check_all_chunks(path, array)
    return root


def _check_all_chunks(store: Path, array: zarr.Array) -> None:
    present, expected = array.nchunks_initialized, array.nchunks
    if present != expected:
        raise StoreError(
            f"{store}: expected {expected} chunks in {array.path}, got {present} "
            "(chunk files are missing; run ingest again)"
        )


def split_arrays(root: zarr.Group, split: str) -> tuple[zarr.Array, zarr.Array]:
    """The ``images`` and ``labels`` arrays of ``split``."""
    if split not in SPLITS:
        raise StoreError(f"expected split in {SPLITS}, got {split!r}")
    try:
        images = root[f"{split}/images"]
        labels = root[f"{split}/labels"]
    except KeyError:
        raise StoreError(
            f"{root.store}: expected arrays {split}/images and {split}/labels"
        ) from None
    assert isinstance(images, zarr.Array) and isinstance(labels, zarr.Array)
    return images, labels


class StrictArray:
    """One array of a dataset store, read only where its chunks exist.

    Stands in for the ``zarr.Array`` in dask graphs and tasks (``dask.array.from_array``
    accepts it): it pickles as the store's absolute path and the array's name, and each
    process opens the array on first use. Reading a region whose chunk is missing or
    cannot be decoded raises :class:`StoreError` naming the store and the chunk.

    Parameters
    ----------
    store : Path
        The dataset store (made absolute here).
    name : str
        Array path inside the store, e.g. ``"train/images"``.
    """

    def __init__(self, store: Path, name: str) -> None:
        self.store = Path(store).absolute()
        self.name = name
        array = self._open()
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.chunks: tuple[int, ...] = tuple(array.chunks)
        self._array: zarr.Array | None = array

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _open(self) -> zarr.Array:
        try:
            array = zarr.open_array(str(self.store), path=self.name, mode="r", zarr_format=3)
        except Exception as e:  # zarr raises several types for a missing or broken array
            raise StoreError(
                f"{self.store}: expected a readable array {self.name}, got {type(e).__name__}: {e}"
            ) from None
        return array

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __getitem__(self, key: Any) -> np.ndarray:
        array = self._array = self._array or self._open()
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        ranges = []
        for k, n, c in zip(key, self.shape, self.chunks, strict=True):
            if not isinstance(k, slice) or k.step not in (None, 1):
                raise TypeError(f"expected slices with step 1, got {key!r}")
            start, stop, _ = k.indices(n)
            ranges.append(range(start // c, -(-stop // c)) if stop > start else range(0))
        for coords in itertools.product(*ranges):
            chunk_key = f"{array.path}/{array.metadata.encode_chunk_key(coords)}"
            if not sync(array.store.exists(chunk_key)):
                raise StoreError(
                    f"{self.store}: expected chunk {chunk_key} in the store, got no such chunk "
                    "(the store is damaged or not visible from this machine; run ingest again "
                    "or check the path)"
                )
        try:
            return np.asarray(array[key])
        except (OSError, MemoryError, PipelineError):
            raise  # the machine's problem (exit 1), or already one line
        except Exception as e:  # a truncated or corrupt chunk: codecs raise many types
            raise StoreError(
                f"{self.store}: expected readable chunks in {self.name}, got "
                f"{type(e).__name__}: {' '.join(str(e).split())}"
            ) from None


def strict_arrays(store: Path, split: str) -> tuple[StrictArray, StrictArray]:
    """The ``images`` and ``labels`` arrays of ``split`` as :class:`StrictArray`."""
    if split not in SPLITS:
        raise StoreError(f"expected split in {SPLITS}, got {split!r}")
    return StrictArray(store, f"{split}/images"), StrictArray(store, f"{split}/labels")
