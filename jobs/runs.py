"""``mnist-pipeline runs`` and ``runs diff``: the model runs as experiments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from jobs.app import LogFormatOpt, LogLevel, app, job, report

runs_app = typer.Typer(
    help="List model runs and compare two (from the manifests and metrics train writes).",
    invoke_without_command=True,
)
app.add_typer(runs_app, name="runs")

ModelsDir = Annotated[
    Path, typer.Option("--models", help="Folder the model runs live under (any depth).")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Plain aligned columns (readable in a terminal, a log file or a notebook)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, ["-" * w for w in widths], *rows]]  # fmt: skip
    return "\n".join(lines)


@runs_app.callback()
def runs(
    ctx: typer.Context,
    models: ModelsDir = Path("data/models"),
    as_json: AsJson = False,
    log_format: LogFormatOpt = "human",
    log_level: LogLevel = "INFO",
) -> None:
    """List every model run: name, dataset, features, parameters, test accuracy, date, time.

    Example: mnist-pipeline runs --models data/models
    """
    if ctx.invoked_subcommand is not None:
        return
    from pipeline.runs import find_runs

    with job(log_format, log_level):
        found = find_runs(models)
    if as_json:
        report(json.dumps([r.summary() for r in found], indent=2, default=str))
        return
    if not found:
        report(f"runs: no model runs under {models}")
        return
    rows = [
        [
            r.name,
            _fmt(r.dataset),
            (r.feature_config_hash or "-")[:12],
            _fmt(r.best_params),
            "-" if r.accuracy is None else f"{r.accuracy:.2%}",
            (r.finished or "-").replace("T", " ")[:19],
            "-" if r.seconds is None else f"{r.seconds:.1f} s",
        ]
        for r in found
    ]
    header = ["run", "dataset", "features", "best", "test acc", "finished", "time"]
    report(_table(header, rows))


@runs_app.command("diff")
def runs_diff(
    a: Annotated[str, typer.Argument(help="Run name (under --models) or model folder.")],
    b: Annotated[str, typer.Argument(help="Run name (under --models) or model folder.")],
    models: ModelsDir = Path("data/models"),
    all_metrics: Annotated[
        bool, typer.Option("--all", help="Show every metric, also those that are equal.")
    ] = False,
    as_json: AsJson = False,
    log_format: LogFormatOpt = "human",
    log_level: LogLevel = "INFO",
) -> None:
    """Parameters and test metrics (overall and per class) that differ between two runs.

    Example: mnist-pipeline runs diff default fashion
    """
    from pipeline.runs import diff_runs, resolve_run

    with job(log_format, log_level):
        diff = diff_runs(resolve_run(models, a), resolve_run(models, b), all_metrics=all_metrics)
    if as_json:
        report(json.dumps(diff.to_dict(), indent=2, default=str))
        return
    out = [f"runs diff: {diff.a.name} -> {diff.b.name}", ""]
    if diff.params:
        rows = [[c.key, _fmt(c.old), _fmt(c.new)] for c in diff.params]
        out.append(_table(["parameter", diff.a.name, diff.b.name], rows))
    else:
        out.append("parameters: identical")
    out.append("")
    if diff.metrics:
        rows = [
            [c.key, _fmt(c.old), _fmt(c.new), "-" if c.delta is None else f"{c.delta:+.4f}"]
            for c in diff.metrics
        ]
        out.append(_table(["metric", diff.a.name, diff.b.name, "change"], rows))
    else:
        out.append("test metrics: identical")
    report("\n".join(out))
