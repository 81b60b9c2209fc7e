"""``mnist-pipeline status``: which stages are stale and why, without running them."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from jobs.app import LogFormatOpt, LogLevel, app, job, report

#: The stages ``make pipeline`` runs, in order.
PIPELINE = ("fetch", "ingest", "features", "train")


@app.command()
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of lines.")] = False,
    log_format: LogFormatOpt = "human",
    log_level: LogLevel = "INFO",
) -> None:
    """Show which pipeline stages are up to date and why the others are not (like
    ``dvc status``), with the settings a run would use (options from pipeline.toml and
    the environment). Nothing is built, locked or written.

    Example: mnist-pipeline status
    """
    from pipeline.errors import PipelineError
    from pipeline.stage import StageStatus, planning

    root = ctx.find_root()
    group: Any = root.command
    statuses: list[StageStatus] = []
    problems: dict[str, str] = {}
    with job(log_format, log_level):
        for name in PIPELINE:
            cmd = group.get_command(root, name)
            sub = cmd.make_context(name, [], parent=root)
            # The job itself, with its effective settings; its own report lines and logs
            # are not the status (they would say "up to date" for every stage).
            quiet = io.StringIO()
            with (
                planning() as plan,
                contextlib.redirect_stdout(quiet),
                contextlib.redirect_stderr(quiet),
            ):
                try:
                    cmd.invoke(sub)
                except (typer.Exit, SystemExit, PipelineError) as e:
                    problems[name] = _last_error(quiet.getvalue()) or str(e)
            statuses.extend(plan)
    rows = _with_upstream(statuses)
    for name in PIPELINE:
        if name in problems and not any(r["stage"] == name for r in rows):
            rows.append(
                {"stage": name, "output": None, "status": "unknown", "reason": problems[name]}
            )
    rows.sort(key=lambda r: PIPELINE.index(r["stage"]))
    if as_json:
        report(json.dumps(rows, indent=2))
        return
    width = max(len(r["stage"]) for r in rows)
    for r in rows:
        where = f" {r['output']}" if r["output"] else ""
        report(f"{r['stage']:<{width}}  {r['status']:<10}{where}: {r['reason']}")


def _last_error(text: str) -> str | None:
    errors = [line.removeprefix("error: ") for line in text.splitlines() if "error:" in line]
    return errors[-1] if errors else None


def _with_upstream(statuses: list[Any]) -> list[dict[str, Any]]:
    """Rows per stage; a stage whose input is the output of a stage that will be rebuilt
    is stale too, whatever its own manifest says."""
    rows: list[dict[str, Any]] = []
    changing: dict[Path, str] = {}
    for st in statuses:
        upstream = sorted(
            {
                name
                for out, name in changing.items()
                for p in st.inputs.values()
                if p == out or out in p.parents
            }
        )
        if st.up_to_date and upstream:
            state, reason = "stale", f"upstream {', '.join(upstream)} is not up to date"
        elif st.up_to_date:
            state, reason = "up to date", st.reason
        elif st.up_to_date is None:
            state, reason = "blocked", st.reason
        else:
            state, reason = "stale", st.reason
        if state != "up to date":
            changing[st.output] = st.stage
        rows.append(
            {"stage": st.stage, "output": str(st.output), "status": state, "reason": reason}
        )
    return rows
