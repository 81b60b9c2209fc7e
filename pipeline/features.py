"""The ``features`` stage: zarr dataset store -> parquet feature dataset, in parallel with dask.

Each zarr chunk of images becomes one dask task that extracts the features of that chunk
and writes one parquet part, so memory is bounded by the chunk size, not the dataset.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from pipeline import __version__
from pipeline.catalogue import FeatureConfig, columns
from pipeline.errors import InputError, PipelineError, StoreError
from pipeline.extract import feature_widths, features_dask
from pipeline.logs import get_logger
from pipeline.parallel import compute_tasks
from pipeline.parquet import COMPRESSION, COMPRESSIONS, feature_schema, feature_table, write_table
from pipeline.stage import StageResult, run_stage
from pipeline.store import SPLITS, open_store, split_arrays

FORMAT = "mnist-pipeline/features/1"
log = get_logger("features")


class _ChunkReader:
    """A zarr array whose reads, run inside the dask tasks, fail as :class:`StoreError`
    naming the store: a chunk file cut short makes the codec raise (zstd: RuntimeError)
    deep in a task, which was a traceback. System errors (OSError) pass unchanged."""

    def __init__(self, array: Any, store: Path) -> None:
        self.array, self.store = array, str(store)
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return np.asarray(self.array[key])
        except (OSError, MemoryError, PipelineError):
            raise
        except Exception as e:
            raise StoreError(
                f"{self.store}: expected readable chunks in {self.array.path}, "
                f"got {type(e).__name__}: {' '.join(str(e).split())}"
            ) from None


def _write_part(
    X: np.ndarray, labels: np.ndarray, start: int, path: Path, *, compression: str, **kw: Any
) -> int:
    image_id = np.arange(start, start + X.shape[0], dtype=np.int64)
    write_table(
        path, feature_table(X, image_id=image_id, labels=labels, **kw), compression=compression
    )
    return X.shape[0]


def build_features(
    out: Path,
    *,
    store: Path,
    config: FeatureConfig,
    splits: tuple[str, ...] = SPLITS,
    compression: str = COMPRESSION,
    scheduler: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write the feature dataset of ``splits`` of ``store`` into the folder ``out``."""
    root = open_store(store)
    shape_attr: Any = root.attrs["image_shape"]
    image_shape = tuple(int(s) for s in shape_attr)
    if len(image_shape) != 2:
        raise AssertionError(f"store image_shape {image_shape}")
    widths = feature_widths(config, (image_shape[0], image_shape[1]))
    layout = columns(config, widths, (image_shape[0], image_shape[1]))
    meta = {
        "format": FORMAT,
        "config": config.to_dict(),
        "config_hash": config.hash,
        "columns": [asdict(c) for c in layout],
        "image_shape": list(image_shape),
        "num_classes": root.attrs.get("num_classes"),
        "dataset": root.attrs.get("dataset"),
        "store": str(store),
        "store_sources": root.attrs.get("sources"),
        "pipeline_version": __version__,
    }
    schema = feature_schema(layout, meta)
    out.mkdir(parents=True)
    tasks, weights, rows = [], [], {}
    for split in splits:
        images_z, labels_z = split_arrays(root, split)
        labels = np.asarray(labels_z[:])
        images = da.from_array(
            _ChunkReader(images_z, store),
            chunks=images_z.chunks,
            name="from-zarr-" + dask.base.tokenize(images_z),
            asarray=False,
        )
        X = features_dask(images, config)
        starts = np.cumsum((0, *X.chunks[0]))
        for i, block in enumerate(X.to_delayed().ravel()):
            a, b = int(starts[i]), int(starts[i + 1])
            part_labels: np.ndarray = labels[a:b]
            path = out / f"{split}-{i:05d}.parquet"
            tasks.append(
                dask.delayed(_write_part, pure=False)(
                    block,
                    part_labels,
                    a,
                    path,
                    split=split,
                    columns=layout,
                    schema=schema,
                    compression=compression,
                )
            )
            weights.append(b - a)
        rows[split] = int(images.shape[0])
    compute_tasks(
        tasks,
        weights=weights,
        logger=log,
        description="features",
        scheduler=scheduler,
        workers=workers,
    )
    return {
        "rows": rows,
        "features": int(sum(widths.values())),
        "columns": len(layout) + 3,
        "parts": len(tasks),
        "config_hash": config.hash,
        "widths": widths,
    }


def features(
    *,
    store: Path,
    out: Path,
    config: FeatureConfig,
    splits: tuple[str, ...] = SPLITS,
    compression: str = COMPRESSION,
    scheduler: str | None = None,
    workers: int | None = None,
    force: bool = False,
    lock_timeout: float = 60.0,
) -> StageResult:
    """The ``features`` stage (see the module docstring)."""
    if compression not in COMPRESSIONS:
        raise InputError(f"--compression: expected one of {COMPRESSIONS}, got {compression!r}")
    return run_stage(
        "features",
        output=out,
        inputs={"store": store},
        params={
            "config_hash": config.hash,
            "config": config.to_dict(),
            "splits": list(splits),
            "compression": compression,
        },
        force=force,
        lock_timeout=lock_timeout,
        build=lambda tmp: build_features(
            tmp,
            store=store,
            config=config,
            splits=splits,
            compression=compression,
            scheduler=scheduler,
            workers=workers,
        ),
    )
