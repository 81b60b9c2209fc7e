"""The zarr v3 dataset store: layout, writing, and lazy reading with dask.

Layout of a store (default ``data/mnist.zarr``)::

    /                    attributes: dataset, num_classes, image_shape, sources, ...
    /train/images        (N_train, H, W) image dtype (uint8 for MNIST), chunks (C, H, W)
    /train/labels        (N_train,) int, chunks (C,)
    /test/images         (N_test, H, W)
    /test/labels         (N_test,)

Image ids are the row positions inside each split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.errors import StoreError

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
    )
    labels = group.create_array(
        "labels", shape=(count,), chunks=(chunk,), dtype=label_dtype, dimension_names=("image",)
    )
    return images, labels


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
    return root


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
