"""The Typer application, the options every job shares, and ``config show``.

Each command parses its options, calls one library function from :mod:`pipeline`, and
reports. Settings come from (highest first) command-line options, environment variables
``MNIST_PIPELINE_<JOB>_<OPTION>`` (e.g. ``MNIST_PIPELINE_INGEST_CHUNK_SIZE``), a TOML
config file (``--config``, ``MNIST_PIPELINE_CONFIG``, or ``./pipeline.toml``), then defaults.

Exit codes: 0 success (or nothing to do), 1 the run failed, 2 bad usage or bad input.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from pipeline.errors import PipelineError
from pipeline.logs import LogFormat, configure_logging
from pipeline.stage import Terminated

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
        help="dask.distributed scheduler address (tcp://host:8786); default: this machine. "
        "Connecting waits up to dask's distributed.comm.timeouts.connect (30 s; e.g. "
        "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=10s).",
    ),
]
WorkerTimeout = Annotated[
    float,
    typer.Option(
        "--worker-timeout",
        help="With --scheduler: fail when the cluster has had no worker for this many "
        "seconds while tasks wait.",
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(
        "--workers", help="Local threads or processes (default: the CPUs this job may use).", min=1
    ),
]
LogFormatOpt = Annotated[
    Literal["human", "json"],
    typer.Option(
        "--log-format", help="'human' lines, or 'json' lines for cron/HPC log collectors."
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


#: Exit codes of a job stopped by a signal: 128 + the signal's number, as a shell reports.
EXIT_SIGINT = 128 + signal.SIGINT  # 130, Ctrl-C
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143, what scancel, systemd, docker stop... send


def interrupted_exit(e: KeyboardInterrupt) -> int:
    """The exit code of a job stopped by ``e``: SIGTERM (``Terminated``) or Ctrl-C."""
    # CPython run as ``python -m`` kills itself with SIGINT at exit when a KeyboardInterrupt
    # once left code run by exec() of a string, even one handled later (Modules/main.c,
    # _Py_UnhandledKeyboardInterrupt): Ctrl-C then ended the job by a signal instead of
    # exit code 130 in 2 of 10 runs. Every exec() of a string clears that flag.
    exec("pass")
    return EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT


def interrupted_by(e: KeyboardInterrupt) -> str:
    """``terminated (SIGTERM)`` or ``interrupted``, for the job's last line."""
    return "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"


@contextlib.contextmanager
def job(
    log_format: str,
    log_level: str,
    *,
    scheduler: str | None = None,
    worker_timeout: float | None = None,
) -> Iterator[None]:
    """Set up logging and turn pipeline errors into a one-line message and an exit code.

    SIGTERM raises :class:`~pipeline.stage.Terminated` for the whole block (the stage
    runner does the same for its own part) and ends the job with exit code 143, Ctrl-C
    with 130. Jobs that take ``--scheduler`` pass it and ``--worker-timeout``: the address
    is checked before any work starts.
    """
    fmt: LogFormat = "json" if log_format == "json" else "human"
    configure_logging(fmt=fmt, level=log_level)
    try:
        with _sigterm_raises(), contextlib.ExitStack() as stack:
            if scheduler is not None or worker_timeout is not None:
                # lazy: pipeline.parallel imports dask
                from pipeline.parallel import check_scheduler_address, cluster_settings

                if scheduler is not None:
                    check_scheduler_address(scheduler)
                if worker_timeout is not None:
                    stack.enter_context(cluster_settings(no_worker_timeout=worker_timeout))
            yield
    except PipelineError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt as e:
        typer.echo(f"error: {interrupted_by(e)}; no partial output was kept", err=True)
        raise typer.Exit(interrupted_exit(e)) from None


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` in the main thread while the block runs."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"received signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a test runner's): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
