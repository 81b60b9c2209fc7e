"""The Typer application, the options every job shares, and ``config show``.

Each command parses its options, calls one library function from :mod:`pipeline`, and
reports. Settings come from (highest first) command-line options, environment variables
``MNIST_PIPELINE_<JOB>_<OPTION>`` (e.g. ``MNIST_PIPELINE_INGEST_CHUNK_SIZE``), a TOML
config file (``--config``, ``MNIST_PIPELINE_CONFIG``, or ``./pipeline.toml``), then defaults.

Exit codes: 0 success (or nothing to do), 1 the run failed, 2 bad usage or bad input.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import json
import logging
import math
import os
import re
import signal
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from pipeline.errors import InputError, PipelineError
from pipeline.logs import LOGGER_NAME, JsonFormatter, LogFormat, configure_logging
from pipeline.stage import Terminated, terminate_as_interrupt

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
        help="dask.distributed scheduler address (tcp://host:8786), the same as --cluster "
        "tcp://host:8786; default: this machine. "
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


class SettingError(InputError):
    """A setting in ``pipeline.toml`` or the environment is unknown or of the wrong type."""


def job_options(ctx: Any) -> dict[str, dict[str, Any]]:
    """``{job: {option name: option}}`` of every registered job (not sub-groups such as
    ``config``), from the application itself: the valid sections and keys of the config.

    Duck-typed like :func:`config_show`: recent Typer versions vendor click.
    """
    root_ctx = ctx.find_root()
    group: Any = root_ctx.command
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(group.list_commands(root_ctx)):
        cmd = group.get_command(root_ctx, name)
        if cmd is None or hasattr(cmd, "list_commands"):
            continue
        out[name] = {
            p.name: p
            for p in cmd.params
            if p.param_type_name == "option" and p.name not in (None, "help")
        }
    return out


def _did_you_mean(word: str, candidates: list[str], fmt: str) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {fmt.format(close[0])}?"
    return "; expected one of " + ", ".join(fmt.format(c) for c in candidates)


def _toml(value: Any) -> str:
    """``value`` as it is written in TOML (``true``, ``"7"``), for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _annotation(param: Any) -> Any:
    """The option's Python type without ``None`` (``Path | None`` -> ``Path``); None when
    this Typer does not say (then no check: Typer converts the value as before)."""
    ann = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        ann = args[0] if len(args) == 1 else None
    return ann


def _choices(ann: Any) -> tuple[str, ...] | None:
    return tuple(typing.get_args(ann)) if typing.get_origin(ann) is Literal else None


def _check_choice(param: Any, choices: tuple[str, ...], value: str) -> str | None:
    info = getattr(getattr(param, "type_descriptor", None), "parameter_info", None)
    if getattr(info, "case_sensitive", True):
        fits = value in choices
    else:
        fits = value.lower() in {c.lower() for c in choices}
    return None if fits else "one of " + ", ".join(repr(c) for c in choices)


def _check_range(param: Any, value: float) -> str | None:
    lo, hi = getattr(param, "min", None), getattr(param, "max", None)
    if (lo is None or value >= lo) and (hi is None or value <= hi):
        return None
    kind = "an integer" if isinstance(value, int) else "a number"
    if hi is None:
        return f"{kind} >= {lo:g}"
    return f"{kind} <= {hi:g}" if lo is None else f"{kind} in [{lo:g}, {hi:g}]"


def _scalar_problem(param: Any, ann: Any, value: Any) -> str | None:
    choices = _choices(ann)
    if choices is not None:
        if not isinstance(value, str):
            return "a string, one of " + ", ".join(repr(c) for c in choices)
        return _check_choice(param, choices, value)
    if ann is bool:
        return None if isinstance(value, bool) else "true or false"
    if ann is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return "an integer"
        return _check_range(param, value)
    if ann is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "a number"
        return "a number, not nan" if math.isnan(value) else _check_range(param, value)
    if ann in (str, Path):
        return None if isinstance(value, str) else "a string"
    return None


def _config_value_problem(param: Any, value: Any) -> str | None:
    """What a TOML ``value`` for option ``param`` should have been, or None when it fits.

    Strict: ``chunk_size = true`` is not 1 and ``chunk_size = "7"`` is not 7 (Typer's
    conversion would coerce both).
    """
    ann = _annotation(param)
    if typing.get_origin(ann) is list:
        item = (typing.get_args(ann) or (str,))[0]
        if not isinstance(value, list):
            return "a list"
        return next((p for v in value if (p := _scalar_problem(param, item, v))), None)
    return _scalar_problem(param, ann, value)


_TRUE, _FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})
_INT = re.compile(r"[+-]?[0-9]+")


def _env_value_problem(param: Any, text: str) -> str | None:
    """What an environment variable's ``text`` for ``param`` should have been, or None."""
    ann = _annotation(param)
    choices = _choices(ann)
    if choices is not None:
        return _check_choice(param, choices, text)
    if ann is bool:
        fits = text.strip().lower() in _TRUE | _FALSE
        return None if fits else "true or false (1/0, yes/no, on/off)"
    if ann is int:
        if not _INT.fullmatch(text.strip()):
            return "an integer"
        return _check_range(param, int(text))
    if ann is float:
        try:
            number = float(text)
        except ValueError:
            return "a number"
        return "a number, not nan" if math.isnan(number) else _check_range(param, number)
    return None


def _load_config(path: Path, options: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Read and check the config file; returns it as Typer's ``default_map``.

    Unknown sections and keys (with a did-you-mean) and values that do not fit their
    option raise :class:`SettingError`; ``options`` is :func:`job_options`.
    """
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SettingError(f"expected a TOML file at {path}, got no such file") from None
    except UnicodeDecodeError as e:
        raise SettingError(
            f"{path}: expected a UTF-8 TOML file, got byte 0x{e.object[e.start]:02x} "
            f"at offset {e.start} that is not UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise SettingError(f"{path}: expected valid TOML, got {e}") from None
    default_map: dict[str, Any] = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise SettingError(
                f"{path}: expected [job] tables such as [ingest], got top-level key {section!r}"
            )
        if section == "cluster":  # values are checked by pipeline.cluster where used
            from pipeline.cluster import TABLE_KEYS

            for raw_key in values:
                if raw_key.replace("-", "_") not in TABLE_KEYS:
                    hint = _did_you_mean(raw_key, sorted(TABLE_KEYS), "{}")
                    raise SettingError(f"unknown key {raw_key} in [cluster] of {path}{hint}")
            default_map[section] = {k.replace("-", "_"): v for k, v in values.items()}
            continue
        if section not in options:
            hint = _did_you_mean(section, [*sorted(options), "cluster"], "[{}]")
            raise SettingError(f"unknown section [{section}] in {path}{hint}")
        known = options[section]
        default_map[section] = {}
        for raw_key, value in values.items():
            key = raw_key.replace("-", "_")
            if key not in known:
                hint = _did_you_mean(key, sorted(known), "{}")
                raise SettingError(f"unknown key {raw_key} in [{section}] of {path}{hint}")
            problem = _config_value_problem(known[key], value)
            if problem:
                raise SettingError(
                    f"{path}: [{section}] {raw_key}: expected {problem}, got {_toml(value)}"
                )
            default_map[section][key] = value
    return default_map


def _check_environment(ctx: Any, options: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse option values from the environment (``MNIST_PIPELINE_<JOB>_<OPTION>`` or an
    option's own ``envvar``) that do not fit their option, in one line: Typer's coercion
    would fail with a multi-line box, or coerce (``"7.0"`` for an integer)."""
    prefix = ctx.find_root().auto_envvar_prefix
    for job_name, params in options.items():
        for name, param in params.items():
            declared = param.envvar or []
            names = [declared] if isinstance(declared, str) else list(declared)
            if not names and prefix and getattr(param, "allow_from_autoenv", True):
                names = [f"{prefix}_{job_name.upper().replace('-', '_')}_{name.upper()}"]
            for var in names:
                text = os.environ.get(var)
                if not text:  # unset or empty: the option's other sources apply (as in click)
                    continue
                problem = _env_value_problem(param, text)
                if problem:
                    raise SettingError(f"{var}: expected {problem}, got {text!r}")


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
    if not ctx.resilient_parsing:
        try:
            options = job_options(ctx)
            _check_environment(ctx, options)
            if config is not None:
                ctx.default_map = _load_config(config, options)
        except SettingError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:  # unreadable config file
            message, code = os_error_message(e)
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(code) from None
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
        with terminate_as_interrupt(), contextlib.ExitStack() as stack:
            if scheduler is not None or worker_timeout is not None:
                # lazy: pipeline.parallel imports dask
                from pipeline.parallel import check_scheduler_address, cluster_settings

                if scheduler is not None:
                    check_scheduler_address(scheduler)
                if worker_timeout is not None:
                    stack.enter_context(cluster_settings(no_worker_timeout=worker_timeout))
            yield
    except PipelineError as e:
        error_line(str(e), exit_code=e.exit_code)
        raise typer.Exit(e.exit_code) from None
    except OSError as e:  # permission, disk full, a file used as a folder, ...: one line
        message, code = os_error_message(e)
        error_line(message, exit_code=code)
        raise typer.Exit(code) from None
    except KeyboardInterrupt as e:
        error_line(
            f"{interrupted_by(e)}; no partial output was kept", exit_code=interrupted_exit(e)
        )
        raise typer.Exit(interrupted_exit(e)) from None


#: errno values meaning the user's path cannot be what it is used as (a file given as a
#: folder, a folder as a file, a name too long): bad input, exit 2. Any other OSError is
#: the machine's (permission, disk full, I/O): exit 1.
_BAD_PATH_ERRNOS = frozenset(
    {errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}
)


def _printable(name: str | bytes | os.PathLike[str]) -> str:
    # A path that is not valid UTF-8 would make printing the error fail in its turn.
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def os_error_message(e: OSError) -> tuple[str, int]:
    """``("<path>: <reason>", exit code)`` for an OSError that reached a job."""
    code = 2 if e.errno in _BAD_PATH_ERRNOS else 1
    reason = e.strerror or " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e.filename, str | bytes | os.PathLike):
        # e.g. pyarrow's "[Errno 28] Error writing bytes to file. Detail: ...": no path
        return " ".join(reason.split()), code
    where = _printable(e.filename)
    if isinstance(e.filename2, str | bytes | os.PathLike):
        where += f" -> {_printable(e.filename2)}"
    if e.errno == errno.EEXIST and Path(os.fsdecode(e.filename)).is_file():
        reason = "expected a folder, got a file"  # mkdir(parents=True) under a file
    return f"{where}: {reason}", code


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
