"""idx files -> one zarr v3 dataset store (both splits), streamed chunk by chunk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ChecksumError, DatasetMismatchError, IdxFormatError, InputError
from pipeline.fetch import MNIST_FILES, content_digest
from pipeline.idx import iter_idx, read_header, read_idx
from pipeline.logs import get_logger, progress
from pipeline.stage import StageResult, run_stage, signals_deferred
from pipeline.store import create_split, create_store

log = get_logger("ingest")


@dataclass(frozen=True)
class SplitFiles:
    """The idx image and label files of one split."""

    images: Path
    labels: Path


def default_sources(raw_dir: Path) -> dict[str, SplitFiles]:
    """The MNIST file names in ``raw_dir`` (``<name>.gz``, or uncompressed ``<name>``)."""

    def pick(name: str) -> Path:
        gz = raw_dir / f"{name}.gz"
        return gz if gz.exists() or not (raw_dir / name).exists() else raw_dir / name

    names = [spec.name for spec in MNIST_FILES]
    return {
        "train": SplitFiles(pick(names[0]), pick(names[1])),
        "test": SplitFiles(pick(names[2]), pick(names[3])),
    }


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> np.ndarray:
    if labels.ndim != 1:
        raise DatasetMismatchError(f"{path}: expected a 1-D label file, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise DatasetMismatchError(f"{path}: expected integer labels, got dtype {labels.dtype}")
    if labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise DatasetMismatchError(
                f"{path}: expected labels in [0, {num_classes - 1}], got values in [{lo}, {hi}]"
            )
    return labels.astype(np.uint8 if num_classes <= 256 else np.int32)


def _check_split(split: str, files: SplitFiles) -> tuple[int, tuple[int, ...], np.dtype]:
    header = read_header(files.images)
    if len(header.shape) != 3:
        raise IdxFormatError(
            f"{files.images}: expected 3 dimensions (N, height, width) for {split} images, "
            f"got {len(header.shape)} {header.shape}"
        )
    if header.count == 0:
        raise DatasetMismatchError(f"{files.images}: expected at least one {split} image, got 0")
    if 0 in header.item_shape:
        raise IdxFormatError(
            f"{files.images}: expected {split} images of at least 1x1 pixels, "
            f"got shape {header.shape}"
        )
    labels = read_header(files.labels)
    if labels.count != header.count:
        raise DatasetMismatchError(
            f"{split}: expected as many labels as images ({header.count} in {files.images}), "
            f"got {labels.count} in {files.labels}"
        )
    return header.count, header.item_shape, header.dtype


def _source_digest(path: Path) -> tuple[str, int]:
    """sha256 and size of the uncompressed content; a corrupt gzip stream is bad input here
    (``content_digest`` says ChecksumError, exit 1, which fits a download, not a given file)."""
    try:
        return content_digest(path)
    except ChecksumError as e:
        raise IdxFormatError(str(e)) from None


def check_finite(chunk: np.ndarray, *, path: Path, split: str, start: int) -> None:
    """Refuse NaN and infinite pixels (float idx images): they would pass through every
    stage and give meaningless features and predictions.

    ``chunk`` has shape (n, H, W); ``start`` is the index of its first image in the split.
    """
    if chunk.dtype.kind != "f":
        return
    bad = ~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        values = chunk[i][~np.isfinite(chunk[i])]
        kind = "NaN" if np.isnan(values).any() else "infinite values"
        raise IdxFormatError(
            f"{path}: expected finite pixel values, got {kind} in {split} image {start + i} "
            f"({int(bad.sum())} such images in rows {start}-{start + len(chunk) - 1})"
        )


def build_store(
    out: Path,
    *,
    sources: dict[str, SplitFiles],
    chunk_size: int,
    dataset: str,
    num_classes: int,
) -> dict[str, Any]:
    """Write the dataset store at ``out`` from idx files; returns a summary.

    Every header is checked before anything is written; images are then streamed one chunk
    (``chunk_size`` images) at a time, so memory use is one chunk, not the file.
    """
    if chunk_size < 1:
        raise InputError(f"--chunk-size: expected a positive number of images, got {chunk_size}")
    headers = {split: _check_split(split, files) for split, files in sources.items()}
    shapes = {shape for _, shape, _ in headers.values()}
    if len(shapes) != 1:
        raise DatasetMismatchError(f"expected one image shape across splits, got {sorted(shapes)}")
    image_shape = shapes.pop()
    files_meta = {}
    for split, files in sources.items():
        for kind, path in (("images", files.images), ("labels", files.labels)):
            digest, size = _source_digest(path)
            files_meta[f"{split}_{kind}"] = {
                "file": path.name,
                "content_sha256": digest,
                "content_bytes": size,
            }
    with signals_deferred():
        root = create_store(
            out,
            attributes={
                "dataset": dataset,
                "num_classes": num_classes,
                "image_shape": list(image_shape),
                "sources": files_meta,
                "splits": {s: headers[s][0] for s in sources},
            },
        )
    summary: dict[str, Any] = {"image_shape": list(image_shape), "splits": {}}
    for split, files in sources.items():
        count, _, dtype = headers[split]
        labels = _check_labels(files.labels, read_idx(files.labels), num_classes)
        with signals_deferred():
            images_arr, labels_arr = create_split(
                root,
                split,
                count=count,
                image_shape=image_shape,
                image_dtype=dtype,
                label_dtype=labels.dtype,
                chunk_size=chunk_size,
            )
            labels_arr[:] = labels
        start = 0
        with progress(log, f"ingest {split} images", total=count, unit="images") as advance:
            for chunk in iter_idx(files.images, rows_per_chunk=images_arr.chunks[0]):
                check_finite(chunk, path=files.images, split=split, start=start)
                with signals_deferred():
                    images_arr[start : start + len(chunk)] = chunk
                start += len(chunk)
                advance(len(chunk))
        counts = np.bincount(labels.astype(np.int64), minlength=num_classes)
        summary["splits"][split] = {"images": count, "label_counts": counts.tolist()}
    return summary


def ingest(
    *,
    out: Path,
    sources: dict[str, SplitFiles],
    chunk_size: int = 4096,
    dataset: str = "mnist",
    num_classes: int = 10,
    force: bool = False,
    lock_timeout: float = 60.0,
) -> StageResult:
    """The ``ingest`` stage: idx files of both splits -> zarr v3 store at ``out``."""
    inputs = {
        f"{split}_{kind}": getattr(files, kind)
        for split, files in sources.items()
        for kind in ("images", "labels")
    }
    params = {"chunk_size": chunk_size, "dataset": dataset, "num_classes": num_classes}
    return run_stage(
        "ingest",
        output=out,
        inputs=inputs,
        params=params,
        force=force,
        lock_timeout=lock_timeout,
        build=lambda tmp: build_store(
            tmp,
            sources=sources,
            chunk_size=chunk_size,
            dataset=dataset,
            num_classes=num_classes,
        ),
    )
