"""``mnist-pipeline bench``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jobs.app import LogFormatOpt, LogLevel, app, job, report


@app.command()
def bench(
    source: Annotated[
        Path,
        typer.Option(
            "--source", envvar="MNIST_SOURCE", help="Folder with the real MNIST idx .gz files."
        ),
    ] = Path("../shared/data/mnist"),
    results: Annotated[
        Path, typer.Option("--results", help="Where to write the JSON results.")
    ] = Path("bench/results.json"),
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Scratch folder (deleted and re-created).")
    ] = Path("bench/work"),
    quick: Annotated[
        bool, typer.Option("--quick", help="12,000 images and 2 repetitions (about a minute).")
    ] = False,
    scale: Annotated[
        int,
        typer.Option("--scale", help="Also run features and score on 1..K times the data.", min=0),
    ] = 0,
    reps: Annotated[
        int | None, typer.Option("--reps", help="Repetitions of the short stages.", min=1)
    ] = None,
    log_format: LogFormatOpt = "human",
    log_level: LogLevel = "INFO",
) -> None:
    """Measure every stage beside a peer baseline in one run; print a Markdown table.

    Example: mnist-pipeline bench --source ../shared/data/mnist
    """
    from pipeline.bench import (
        markdown_table,
        run_benchmark,
    )  # lazy: keeps `--help` and other jobs fast to start

    with job(log_format, log_level):
        records = run_benchmark(
            source=source, workdir=workdir, results=results, quick=quick, scale=scale, reps=reps
        )
    report(markdown_table(records))
    report(f"\nresults: {results}")
