"""``mnist-pipeline features``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jobs.app import (
    Cluster,
    ClusterOption,
    Force,
    LockTimeout,
    LogFormatOpt,
    LogLevel,
    Scheduler,
    Workers,
    WorkerTimeout,
    app,
    dask_cluster,
    job,
    one_blas_thread,
    report,
)


@app.command()
def features(
    ctx: typer.Context,
    store: Annotated[Path, typer.Option("--store", help="zarr store written by ingest.")] = Path(
        "data/mnist.zarr"
    ),
    out: Annotated[Path, typer.Option("--out", help="Parquet dataset folder to write.")] = Path(
        "data/features"
    ),
    feature_config: Annotated[
        Path | None,
        typer.Option(
            "--feature-config",
            help="TOML/JSON feature configuration (views + families); default: the built-in "
            "most accurate set. See README 'Feature catalogue'.",
            dir_okay=False,
        ),
    ] = None,
    compression: Annotated[
        str,
        typer.Option(
            "--compression",
            help="Parquet codec: none (fastest; default), lz4, zstd (smallest) or snappy.",
        ),
    ] = "none",
    cluster: Cluster = None,
    cluster_option: ClusterOption = None,
    scheduler: Scheduler = None,
    worker_timeout: WorkerTimeout = 60.0,
    workers: Workers = None,
    force: Force = False,
    lock_timeout: LockTimeout = 60.0,
    log_format: LogFormatOpt = "human",
    log_level: LogLevel = "INFO",
) -> None:
    """Preprocess images and extract hand-crafted features in parallel -> parquet.

    Example: mnist-pipeline features --store data/mnist.zarr --out data/features
    """
    one_blas_thread()
    from pipeline.catalogue import load_config  # lazy: keeps `--help` and other jobs fast to start
    from pipeline.features import features as features_stage

    with job(log_format, log_level, scheduler=scheduler, worker_timeout=worker_timeout):
        config = load_config(feature_config)
        with dask_cluster(
            ctx, stage="features", cluster=cluster, options=cluster_option, scheduler=scheduler
        ) as address:
            result = features_stage(
                store=store,
                out=out,
                config=config,
                compression=compression,
                scheduler=address,
                workers=workers,
                force=force,
                lock_timeout=lock_timeout,
            )
    r = result.result
    report(
        f"features: {out} {'up to date' if result.skipped else 'written'} "
        f"({', '.join(f'{k} {v}' for k, v in r.get('rows', {}).items())} rows, "
        f"{r.get('features')} features, config {config.hash[:12]})"
    )
