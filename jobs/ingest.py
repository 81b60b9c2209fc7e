"""``mnist-pipeline ingest``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jobs.app import Force, LockTimeout, LogFormatOpt, LogLevel, app, job, report

IdxPath = Annotated[Path | None, typer.Option(help="idx file (raw or gzip); overrides --raw-dir.")]


@app.command()
def ingest(
    raw_dir: Annotated[
        Path, typer.Option("--raw-dir", help="Folder with the four MNIST idx files (from fetch).")
    ] = Path("data/raw/mnist"),
    out: Annotated[Path, typer.Option("--out", help="zarr v3 store to write.")] = Path(
        "data/mnist.zarr"
    ),
    train_images: IdxPath = None,
    train_labels: IdxPath = None,
    test_images: IdxPath = None,
    test_labels: IdxPath = None,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", help="Images per zarr chunk (along N).", min=1)
    ] = 4096,
    dataset: Annotated[str, typer.Option(help="Dataset name recorded in the store.")] = "mnist",
    num_classes: Annotated[
        int, typer.Option("--num-classes", help="Labels must lie in [0, num_classes).", min=2)
    ] = 10,
    force: Force = False,
    lock_timeout: LockTimeout = 60.0,
    log_format: LogFormatOpt = "human",
    log_level: LogLevel = "INFO",
) -> None:
    """Convert idx files (raw or .gz, any 2-D image size) into one chunked zarr v3 store.

    Example: mnist-pipeline ingest --raw-dir data/raw/mnist --out data/mnist.zarr
    """
    from pipeline.ingest import (
        SplitFiles,
        default_sources,
    )  # lazy: keeps `--help` and other jobs fast to start
    from pipeline.ingest import ingest as ingest_stage

    defaults = default_sources(raw_dir)
    sources = {
        "train": SplitFiles(
            train_images or defaults["train"].images, train_labels or defaults["train"].labels
        ),
        "test": SplitFiles(
            test_images or defaults["test"].images, test_labels or defaults["test"].labels
        ),
    }
    with job(log_format, log_level):
        result = ingest_stage(
            out=out,
            sources=sources,
            chunk_size=chunk_size,
            dataset=dataset,
            num_classes=num_classes,
            force=force,
            lock_timeout=lock_timeout,
        )
    splits = result.result.get("splits", {})
    counts = ", ".join(f"{s} {v['images']}" for s, v in splits.items())
    report(f"ingest: {out} {'up to date' if result.skipped else 'written'} ({counts})")
