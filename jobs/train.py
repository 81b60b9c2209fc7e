"""``mnist-pipeline train``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from jobs.app import Force, LockTimeout, LogFormatOpt, LogLevel, app, job


@app.command()
def train(
    features: Annotated[
        Path, typer.Option("--features", help="Feature parquet folder written by features.")
    ] = Path("data/features"),
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Model folder to write (default data/models/<run-name>)."),
    ] = None,
    run_name: Annotated[
        str, typer.Option("--run-name", help="Name of the run; the default --out folder.")
    ] = "default",
    store: Annotated[
        Path | None,
        typer.Option(
            "--store", help="zarr store for the pictures of mistakes (default: the features')."
        ),
    ] = None,
    grid: Annotated[
        str,
        typer.Option(
            "--grid",
            help="Hyper-parameter grid, e.g. 'C=0.01,0.03,0.1;class_weight=none,balanced', or "
            "'auto': C=0.003,0.01,0.03 extended by factors of 3 (at most 3 points) while the "
            "best C is on the edge.",
        ),
    ] = "auto",
    validation_size: Annotated[
        int,
        typer.Option(
            "--validation-size", help="Hold out the last N training images for selection.", min=1
        ),
    ] = 10_000,
    cv: Annotated[
        int | None,
        typer.Option("--cv", help="Use stratified K-fold CV instead of the hold-out.", min=2),
    ] = None,
    positive_class: Annotated[
        int | None,
        typer.Option(
            "--positive-class", help="Binary mode: 'is it this digit?' (reports a threshold)."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed for CV shuffling and the selection subsample.")
    ] = 0,
    max_iter: Annotated[
        int, typer.Option("--max-iter", help="lbfgs iteration limit per fit.", min=1)
    ] = 500,
    tol: Annotated[
        float | None,
        typer.Option("--tol", help="lbfgs stopping tolerance of every fit (default 1e-4)."),
    ] = None,
    selection_size: Annotated[
        int | None,
        typer.Option(
            "--selection-size",
            help="Fit the grid points on a seeded subsample of this many fitting rows "
            "(default: the stage's default; 0: all rows).",
            min=0,
        ),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", help="Grid points fitted in parallel (default: CPUs).", min=1),
    ] = None,
    force: Force = False,
    lock_timeout: LockTimeout = 60.0,
    log_format: LogFormatOpt = "human",
    log_level: LogLevel = "INFO",
) -> None:
    """Grid-search logistic regression on the features, refit, and write the model + report.

    Example: mnist-pipeline train --features data/features --run-name default
    """
    # lazy: keeps `--help` and other jobs fast to start
    from pipeline.train import DEFAULT_SELECTION_SIZE, DEFAULT_TOL, parse_grid
    from pipeline.train import train as train_stage

    target = out or Path("data/models") / run_name
    with job(log_format, log_level):
        result = train_stage(
            features=features,
            out=target,
            store=store,
            grid=parse_grid(grid),
            validation_size=validation_size,
            cv=cv,
            positive_class=positive_class,
            seed=seed,
            max_iter=max_iter,
            tol=DEFAULT_TOL if tol is None else tol,
            selection_size=(
                DEFAULT_SELECTION_SIZE if selection_size is None else (selection_size or None)
            ),
            jobs=jobs,
            force=force,
            lock_timeout=lock_timeout,
        )
    r = result.result
    title = f"train: {target} ({'up to date' if result.skipped else 'written'})"
    rows = [
        ("test accuracy", f"{r.get('accuracy', float('nan')):.4%}"),
        ("best parameters", str(r.get("best_params"))),
    ]
    if r.get("selection_rule"):
        rows.append(("selection rule", str(r["selection_rule"])))
    for g in r.get("grid") or []:
        spread = f" +- {g['score_std']:.4f}" if len(g.get("fold_scores") or []) > 1 else ""
        name = ", ".join(f"{k}={v}" for k, v in g["params"].items())
        rows.append(
            (
                f"grid {name}",
                f"{g['score']:.4f}{spread} ({g['n_iter']} it, {g['fit_seconds']:.1f} s)",
            )
        )
    if r.get("grid_warning"):
        rows.append(("warning", str(r["grid_warning"])))
    if r.get("final_iterations") is not None:
        rows.append(("final fit iterations", str(r["final_iterations"])))
    if positive_class is not None:
        rows.append(("decision threshold", f"{r.get('threshold', 0.5):.4f}"))
    rows.append(("features", str(r.get("n_features"))))
    rows += [(f"time: {s}", f"{sec:.2f} s") for s, sec in (r.get("timings") or {}).items()]
    rows.append(("report", str(target / "report.html")))
    if not sys.stdout.isatty():  # batch logs: plain ASCII `key: value` lines, no box drawing
        typer.echo("\n".join([title, *(f"{k}: {v}" for k, v in rows)]))
        return
    table = Table(title=title)
    table.add_column("")
    table.add_column("value", justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=100).print(table)
