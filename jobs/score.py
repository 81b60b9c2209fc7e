"""``mnist-pipeline score``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

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
    error_line,
    interrupted_by,
    interrupted_exit,
    job,
    one_blas_thread,
    option_origin,
    report,
)
from pipeline.images import DEFAULT_GLOBS
from pipeline.stage import temp_path

# Keep in step with pipeline.score.DEFAULT_BATCH_SIZE (not imported here: pipeline.score
# pulls in dask and the feature kernels, which would slow every CLI start-up).
DEFAULT_BATCH_SIZE = 2048


@app.command()
def score(
    ctx: typer.Context,
    source: Annotated[
        list[Path],
        typer.Argument(
            metavar="INPUT...",
            help="Image files and folders of them (walked recursively), or one zarr store "
            "written by ingest, or one idx images file (raw or .gz).",
            show_default=False,
        ),
    ],
    model: Annotated[Path, typer.Option("--model", help="Model folder written by train.")] = Path(
        "data/models/default"
    ),
    out: Annotated[
        Path,
        typer.Option("--out", help="Parquet dataset folder to write (one part per batch)."),
    ] = Path("data/predictions.parquet"),
    glob: Annotated[
        list[str] | None,
        typer.Option(
            "--glob",
            metavar="PATTERN",
            help="Folder input: file name pattern to score, repeatable, case-insensitive; "
            "a pattern with '/' matches the path relative to INPUT. "
            f"Default: {' '.join(DEFAULT_GLOBS)}.",
        ),
    ] = None,
    split: Annotated[
        str, typer.Option("--split", help="zarr store input: the split to score.")
    ] = "test",
    normalize: Annotated[
        Literal["auto", "always", "never"],
        typer.Option(
            "--normalize",
            help="Folder input: bring images to MNIST format (gray, light ink on black, "
            "longer side 20 px, centred by mass in 28x28). 'auto' keeps images that "
            "already are 28x28 with a dark background as they are; 'always' normalizes "
            "every image; 'never' uses 28x28 images as they are and rejects other sizes.",
        ),
    ] = "auto",
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", help="Images per task and per output part.", min=1),
    ] = DEFAULT_BATCH_SIZE,
    max_failures: Annotated[
        int | None,
        typer.Option(
            "--max-failures",
            help="Exit 1 when more inputs than this cannot be scored (default: no limit). "
            "The output is written either way.",
            min=0,
        ),
    ] = None,
    allow_empty: Annotated[
        bool,
        typer.Option(
            "--allow-empty",
            help="Write an empty output for an input without images (else exit 2).",
        ),
    ] = False,
    output_format: Annotated[
        Literal["none", "table", "csv", "jsonl"],
        typer.Option(
            "--format",
            help="Also print the predictions on stdout: an aligned table, CSV or JSON lines "
            "(the summary line then goes to stderr).",
        ),
    ] = "none",
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the partial output of a run that was killed, skipping finished "
            "batches; without it a partial output is discarded.",
        ),
    ] = False,
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
    """Predict the digits of image files, a zarr store or an idx file -> parquet.

    Bad files never stop the run: each gets a row whose status column says what is wrong.

    Example: mnist-pipeline score --model data/models/default digits/ --out predictions.parquet
    """
    one_blas_thread()
    from pipeline.score import check_failures  # lazy: see DEFAULT_BATCH_SIZE above
    from pipeline.score import score as score_stage

    with job(log_format, log_level, scheduler=scheduler, worker_timeout=worker_timeout):
        try:
            # Typed on the command line: a config/env value is a standing default instead.
            given = [
                name
                for name, option in (
                    ("globs", "glob"),
                    ("split", "split"),
                    ("normalize", "normalize"),
                )
                if option_origin(ctx, option) == "cli"
            ]
            with dask_cluster(
                ctx, stage="score", cluster=cluster, options=cluster_option, scheduler=scheduler
            ) as address:
                result = score_stage(
                    given=given,
                    model=model,
                    source=source,
                    out=out,
                    globs=tuple(glob) if glob else DEFAULT_GLOBS,
                    split=split,
                    normalize=normalize,
                    batch_size=batch_size,
                    resume=resume,
                    allow_empty=allow_empty,
                    scheduler=address,
                    workers=workers,
                    force=force,
                    lock_timeout=lock_timeout,
                )
        except KeyboardInterrupt as e:  # Ctrl-C (130) or SIGTERM (143)
            error_line(
                f"{interrupted_by(e)}; finished batches are kept in {temp_path(out)}; "
                "run again with --resume to continue",
                exit_code=interrupted_exit(e),
            )
            raise typer.Exit(interrupted_exit(e)) from None
        r = result.result
        summary = f"score: {r.get('ok', 0)} ok, {r.get('failed', 0)} failed -> {out}" + (
            " (up to date)" if result.skipped else ""
        )
        if output_format == "none":
            report(summary)
        else:
            from pipeline.predictions import format_predictions

            typer.echo(format_predictions(out, fmt=output_format), nl=False)
            typer.echo(summary, err=True)
        check_failures(result, max_failures=max_failures)
