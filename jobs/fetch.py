"""``mnist-pipeline fetch``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jobs.app import Force, LockTimeout, LogFormatOpt, LogLevel, app, job, report
from pipeline.fetch import fetch as fetch_stage


@app.command()
def fetch(
    dest: Annotated[
        Path, typer.Option("--dest", help="Folder to put the four idx .gz files in.")
    ] = Path("data/raw/mnist"),
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            envvar="MNIST_SOURCE",
            help="Local folder or http(s) URL holding the idx files; default: public mirrors.",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Network timeout per request, seconds.", min=1)
    ] = 60.0,
    force: Force = False,
    lock_timeout: LockTimeout = 60.0,
    log_format: LogFormatOpt = "human",
    log_level: LogLevel = "INFO",
) -> None:
    """Get the four MNIST idx files, verified by the sha256 of their uncompressed content.

    Example: mnist-pipeline fetch --source ../shared/data/mnist
    """
    with job(log_format, log_level):
        result = fetch_stage(
            dest_dir=dest, source=source, timeout=timeout, force=force, lock_timeout=lock_timeout
        )
    report(f"fetch: {dest} {'up to date' if result.skipped else 'ready'} (4 files verified)")
