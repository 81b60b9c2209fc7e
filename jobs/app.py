"""The Typer application, the options every job shares, and ``config show``.

Each command parses its options, calls one library function from :mod:`pipeline`, and
reports. Settings come from (highest first) command-line options, environment variables
``MNIST_PIPELINE_<JOB>_<OPTION>`` (e.g. ``MNIST_PIPELINE_INGEST_CHUNK_SIZE``), a TOML
config file (``--config``, ``MNIST_PIPELINE_CONFIG``, or ``./pipeline.toml``), then defaults.

Exit codes: 0 success (or nothing to do), 1 the run failed, 2 bad usage or bad input.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from pipeline.errors import PipelineError
from pipeline.logs import LOGGER_NAME, JsonFormatter, LogFormat, configure_logging

app = typer.Typer(
    name="mnist-pipeline",
    help="Batch pipeline for MNIST-style digits: fetch -> ingest -> features -> train -> score.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={
        "auto_envvar_prefix": "MNIST_PIPELINE",
        "help_option_names": ["-h", "--help"],
    },
)
config_app = typer.Typer(help="Inspect the effective settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")

DEFAULT_CONFIG = Path("pipeline.toml")

# Options every job shares.
Force = Annotated[bool, typer.Option("--force", help="Rebuild even when the output is up to date.")]
LockTimeout = Annotated[
    float,
    typer.Option(
        "--lock-timeout",
        help="Seconds to wait when another run is writing the same output, then fail.",
        min=0,
    ),
]
Scheduler = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        help="dask.distributed scheduler address (tcp://host:8786); the same as "
        "--cluster tcp://host:8786.",
    ),
]
Workers = Annotated[
    int | None,
    typer.Option("--workers", help="Threads of the local scheduler (default: all CPUs).", min=1),
]
LogFormatOpt = Annotated[
    Literal["human", "json"],
    typer.Option(
        "--log-format",
        help="'human' lines, or 'json' lines for cron/HPC log collectors. "
        "MNIST_PIPELINE_LOG_FORMAT sets it for every job (LOG_FORMAT=json make pipeline).",
        envvar="MNIST_PIPELINE_LOG_FORMAT",
    ),
]
LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR"],
    typer.Option("--log-level", help="Least severe messages to log.", case_sensitive=False),
]


def _load_config(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise typer.BadParameter(f"expected a TOML file at {path}, got no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise typer.BadParameter(f"{path}: expected valid TOML, got {e}") from None
    default_map: dict[str, Any] = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise typer.BadParameter(
                f"{path}: expected [job] tables such as [ingest], got top-level key {section!r}"
            )
        default_map[section] = {k.replace("-", "_"): v for k, v in values.items()}
    return default_map


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="TOML file with a [job] table per job (keys are option names); "
            "default ./pipeline.toml if present.",
            envvar="MNIST_PIPELINE_CONFIG",
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Batch jobs for MNIST-style digit classification with hand-crafted features."""
    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    if config is not None:
        ctx.default_map = _load_config(config)
    ctx.obj = {"config": str(config) if config else None}


def option_origin(ctx: Any, name: str) -> str:
    """Where option ``name`` got its value: ``cli``, ``env``, ``config`` or ``default``."""
    source = ctx.get_parameter_source(name)
    return {"COMMANDLINE": "cli", "ENVIRONMENT": "env", "DEFAULT_MAP": "config"}.get(
        getattr(source, "name", ""), "default"
    )


def one_blas_thread() -> None:
    """Make BLAS libraries loaded from now on start a single thread (a user's own
    ``OPENBLAS_NUM_THREADS`` / ``MKL_NUM_THREADS`` win).

    For jobs whose BLAS work runs one thread per dask worker anyway (features, score): an
    OpenBLAS loaded mid-run (scipy's, which numba's start-up loads) would otherwise start a
    thread per core that busy-waits for a while, taking a core from the workers (measured:
    features stage 1.47 s -> 1.36 s on 2 cores).
    """
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


@contextlib.contextmanager
def job(log_format: str, log_level: str) -> Iterator[None]:
    """Set up logging and turn pipeline errors into a one-line message and an exit code."""
    fmt: LogFormat = "json" if log_format == "json" else "human"
    configure_logging(fmt=fmt, level=log_level)
    try:
        yield
    except PipelineError as e:
        error_line(str(e), exit_code=e.exit_code)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        error_line("interrupted; no partial output was kept", exit_code=130)
        raise typer.Exit(130) from None


def error_line(message: str, *, exit_code: int) -> None:
    """The job's one error line on stderr: ``error: ...``, or in JSON log mode a JSON object
    shaped like the log records (``level`` "error", ``stage`` "job", ``msg``, ``exit_code``)."""
    if getattr(logging.getLogger(LOGGER_NAME), "log_format", "human") != "json":
        typer.echo(f"error: {message}", err=True)
        return
    record = logging.LogRecord(f"{LOGGER_NAME}.job", logging.ERROR, "", 0, message, None, None)
    record.data = {"exit_code": exit_code}
    typer.echo(JsonFormatter().format(record), err=True)


def report(message: str) -> None:
    """The job's result line, on stdout."""
    typer.echo(message)


@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """Print every job's effective settings and where each comes from."""
    root_ctx = ctx.find_root()
    # Duck-typed: recent Typer versions vendor click, so commands and options are not
    # instances of the installed click's Group/Option classes.
    group: Any = root_ctx.command
    typer.echo(f"# config file: {root_ctx.obj.get('config') if root_ctx.obj else None}")
    for name in sorted(group.list_commands(root_ctx)):
        cmd = group.get_command(root_ctx, name)
        if cmd is None or hasattr(cmd, "list_commands"):  # sub-groups such as `config`
            continue
        sub = cmd.make_context(name, [], parent=root_ctx, resilient_parsing=True)
        typer.echo(f"[{name}]")
        for param in cmd.params:
            if param.param_type_name != "option" or param.name in (None, "help"):
                continue
            value = sub.params.get(param.name)
            typer.echo(f"{param.name} = {value!r}  # {option_origin(sub, param.name)}")
        typer.echo("")


# --- Where dask tasks run: --cluster, --cluster-option and the [cluster] table -----------
Cluster = Annotated[
    str | None,
    typer.Option(
        "--cluster",
        help="Where the tasks run: 'local' (this machine; default), 'tcp://host:port' (an "
        "existing dask scheduler) or 'slurm' (worker jobs through dask-jobqueue, set up by "
        "the config file's cluster table and --cluster-option). "
        "Default: that table's kind, else local.",
        show_default=False,
    ),
]
ClusterOption = Annotated[
    list[str] | None,
    typer.Option(
        "--cluster-option",
        metavar="KEY=VALUE",
        help="With --cluster slurm, repeatable, over the config file's cluster table: queue (or "
        "partition), account, cores, processes, memory, walltime, job_extra_directives, "
        "interface, jobs, wait_timeout, log_directory, local_directory.",
        show_default=False,
    ),
]


@contextlib.contextmanager
def dask_cluster(
    ctx: typer.Context,
    *,
    stage: str,
    cluster: str | None,
    options: list[str] | None,
    scheduler: str | None,
) -> Iterator[str | None]:
    """Open the cluster the options and the ``[cluster]`` table ask for (see
    :mod:`pipeline.cluster`); yields the scheduler address for the stage (None: local).
    Use inside :func:`job`, which turns its errors into the one error line."""
    from pipeline.cluster import cluster_settings, open_cluster
    from pipeline.logs import get_logger

    table = (ctx.find_root().default_map or {}).get("cluster") or {}
    settings = cluster_settings(cluster, table=table, options=options or (), scheduler=scheduler)
    with open_cluster(settings, logger=get_logger(stage)) as address:
        yield address
