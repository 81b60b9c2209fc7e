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
import pyarrow as pa

from pipeline import __version__
from pipeline.catalogue import FeatureConfig, columns
from pipeline.errors import InputError
from pipeline.extract import feature_widths, features_dask
from pipeline.logs import get_logger
from pipeline.parallel import compute_tasks
from pipeline.parquet import COMPRESSION, COMPRESSIONS, feature_schema, feature_table, write_table
from pipeline.paths import local_path
from pipeline.stage import StageResult, run_stage
from pipeline.store import SPLITS, open_store, strict_arrays

FORMAT = "mnist-pipeline/features/1"
log = get_logger("features")


def _write_part(
    X: np.ndarray,
    labels: np.ndarray,
    start: int,
    path: Path,
    *,
    schema_ipc: bytes,
    compression: str,
    **kw: Any,
) -> dict[str, Any]:
    """Write one part; returns its manifest entry (name, split, rows, crc32c)."""
    # The schema travels serialized: a pickled pyarrow schema loses the `not null` of its
    # list items on the way to a dask.distributed worker.
    schema = pa.ipc.read_schema(pa.py_buffer(schema_ipc))
    image_id = np.arange(start, start + X.shape[0], dtype=np.int64)
    crc = write_table(
        path, feature_table(X, image_id=image_id, labels=labels, schema=schema, **kw),
        compression=compression,
    )  # fmt: skip
    return {"name": path.name, "split": kw["split"], "rows": int(X.shape[0]), "crc32c": crc}


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
    """Write the feature dataset of ``splits`` of ``store`` into the folder ``out``.

    ``store`` and ``out`` must be absolute: tasks may run on workers whose working
    directory is another.
    """
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
    schema_ipc = feature_schema(layout, meta).serialize().to_pybytes()
    out.mkdir(parents=True)
    tasks, weights, rows = [], [], {}
    for split in splits:
        images_s, labels_s = strict_arrays(store, split)
        labels = labels_s[:]
        # Strict reads inside the tasks: a chunk missing on the worker is an error there.
        images = da.from_array(images_s, chunks=images_s.chunks, asarray=True, lock=False)
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
                    schema_ipc=schema_ipc,
                    compression=compression,
                )
            )
            weights.append(b - a)
        rows[split] = int(images.shape[0])
    parts = compute_tasks(
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
        "parts": len(parts),
        "part_files": parts,
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
    store, out = local_path(store, what="store"), local_path(out, what="output")
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
