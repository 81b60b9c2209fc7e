"""Where a job's dask tasks run: this machine, an existing scheduler, or SLURM worker jobs.

:func:`cluster_settings` turns the ``--cluster`` value, the ``[cluster]`` config table and
``--cluster-option KEY=VALUE`` strings into a validated :class:`ClusterSettings`;
:func:`open_cluster` yields the scheduler address the stages take as ``scheduler=``. For
``slurm`` it starts a dask scheduler in this process, submits the worker jobs through
dask-jobqueue's ``SLURMCluster``, waits for the workers (with a timeout), and cancels the
jobs on every way out of the block: success, error, Ctrl-C and SIGTERM (``scancel``).

No dask import at module level: the CLI imports this module to validate its options.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pipeline
from pipeline.errors import ClusterError, InputError
from pipeline.stage import signals_deferred, terminate_as_interrupt

LOCAL, SLURM = "local", "slurm"
# What dask's Client takes: scheme://... (tcp, tls, ucx, ws, inproc) or host:port.
_ADDRESS = re.compile(r"^([a-z][a-z0-9+]*://\S+|[\w.\-]+:\d+)$")
# SLURM time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_WALLTIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_MEMORY = re.compile(r"^\s*\d+(\.\d+)?\s*([kKmMgGtT]i?)?[bB]?\s*$")


@dataclass(frozen=True)
class SlurmOptions:
    """Settings of the worker jobs (dask-jobqueue ``SLURMCluster``); see :data:`SLURM_KEYS`."""

    queue: str | None = None
    account: str | None = None
    cores: int = 1
    processes: int = 1
    memory: str = "2GB"
    walltime: str = "01:00:00"
    job_extra_directives: tuple[str, ...] = ()
    interface: str | None = None
    jobs: int = 1
    wait_timeout: float = 120.0
    log_directory: str | None = None
    local_directory: str | None = None

    @property
    def workers(self) -> int:
        """dask workers expected once every job runs."""
        return self.jobs * self.processes


@dataclass(frozen=True)
class ClusterSettings:
    """Where tasks run. ``kind`` is ``local``, ``slurm`` or ``scheduler`` (``address`` set)."""

    kind: str = LOCAL
    address: str | None = None
    slurm: SlurmOptions = field(default_factory=SlurmOptions)


#: Keys of the ``[cluster]`` table and ``--cluster-option`` (``partition`` = ``queue``),
#: with what each must be.
SLURM_KEYS: dict[str, str] = {
    "queue": "a partition name",
    "partition": "a partition name",
    "account": "an account name",
    "cores": "a whole number >= 1 (CPUs per worker job)",
    "processes": "a whole number >= 1 and <= cores (dask workers per job)",
    "memory": "a size such as 4GB (memory per worker job)",
    "walltime": "a SLURM time such as 01:30:00 or 1-00:00:00",
    "job_extra_directives": "a list of sbatch options such as ['--exclusive']",
    "interface": "a network interface name such as ib0",
    "jobs": "a whole number >= 1 (worker jobs to submit)",
    "wait_timeout": "seconds > 0 to wait for the workers",
    "log_directory": "a folder for the worker jobs' logs",
    "local_directory": "a folder for the workers' scratch files",
}
TABLE_KEYS = ("kind", *SLURM_KEYS)


def _fail(origin: str, key: str, value: Any) -> InputError:
    return InputError(f"{origin} {key}: expected {SLURM_KEYS[key]}, got {value!r}")


def _positive_int(origin: str, key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise _fail(origin, key, value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or value < 1:
        raise _fail(origin, key, value)
    return value


def _text(origin: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or "\n" in value:
        raise _fail(origin, key, value)
    return value.strip()


def _coerce(origin: str, key: str, value: Any) -> Any:
    """``value`` of ``key`` checked and converted (strings from the command line)."""
    if key in ("cores", "processes", "jobs"):
        return _positive_int(origin, key, value)
    if key == "wait_timeout":
        try:
            seconds = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            raise _fail(origin, key, value) from None
        if not (seconds > 0 and math.isfinite(seconds)):
            raise _fail(origin, key, value)
        return seconds
    if key == "memory":
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(text, str) or not _MEMORY.match(text):
            raise _fail(origin, key, value)
        return text.strip()
    if key == "walltime":
        if not isinstance(value, str) or not _WALLTIME.match(value.strip()):
            raise _fail(origin, key, value)
        return value.strip()
    if key == "job_extra_directives":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(
            isinstance(v, str) and v.strip().startswith("-") and "\n" not in v for v in items
        ):
            raise _fail(origin, key, value)
        return tuple(v.strip() for v in items)
    if key in ("log_directory", "local_directory"):
        # Absolute: the workers' working directory is not necessarily this one.
        return str(Path(_text(origin, key, value)).expanduser().absolute())
    return _text(origin, key, value)


def _unknown(origin: str, key: str, known: Sequence[str]) -> InputError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return InputError(f"{origin}: unknown key {key!r}; {hint}(known: {', '.join(known)})")


def parse_kind(value: str, *, origin: str = "--cluster") -> tuple[str, str | None]:
    """``(kind, address)`` of a ``--cluster`` value: ``local``, ``slurm`` or an address."""
    text = value.strip()
    if text.lower() in (LOCAL, SLURM):
        return text.lower(), None
    if _ADDRESS.match(text):
        return "scheduler", text
    close = difflib.get_close_matches(text.lower(), (LOCAL, SLURM), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise InputError(
        f"{origin}: expected local, slurm or a scheduler address tcp://host:port, "
        f"got {value!r}{hint}"
    )


def cluster_settings(
    cluster: str | None,
    *,
    table: Mapping[str, Any] | None = None,
    options: Sequence[str] = (),
    scheduler: str | None = None,
) -> ClusterSettings:
    """Validated settings from the job's options and the ``[cluster]`` config table.

    Parameters
    ----------
    cluster : str, optional
        ``--cluster``: ``local``, ``slurm`` or ``tcp://host:port``; default the table's
        ``kind``, else ``local``.
    table : mapping, optional
        The ``[cluster]`` table: ``kind`` and the keys of :data:`SLURM_KEYS`.
    options : sequence of str
        ``--cluster-option KEY=VALUE`` strings; they override the table. A list key
        (``job_extra_directives``) given more than once collects every value.
    scheduler : str, optional
        ``--scheduler`` (the older spelling of ``--cluster tcp://...``).

    Raises
    ------
    InputError
        One line naming the key and what it must be (unknown keys get a did-you-mean).
    """
    table = dict(table or {})
    for key in table:
        if key not in TABLE_KEYS:
            raise _unknown("[cluster] table", key, TABLE_KEYS)
    if scheduler is not None:
        kind, address = parse_kind(scheduler, origin="--scheduler")
        if kind != "scheduler":
            raise InputError(f"--scheduler: expected tcp://host:port, got {scheduler!r}")
        if cluster is not None and parse_kind(cluster) != (kind, address):
            raise InputError(
                f"--scheduler: expected the same as --cluster or nothing, "
                f"got --scheduler {scheduler} with --cluster {cluster}"
            )
        cluster = scheduler
    if cluster is None:
        cluster = table.get("kind", LOCAL)
        if not isinstance(cluster, str):
            raise InputError(
                f"[cluster] table kind: expected local, slurm or tcp://host:port, got {cluster!r}"
            )
        kind, address = parse_kind(cluster, origin="[cluster] table kind")
    else:
        kind, address = parse_kind(cluster)
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key != "kind":
            values[key] = _coerce("[cluster] table", key, value)
    given: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InputError(f"--cluster-option: expected KEY=VALUE, got {option!r}")
        if key not in SLURM_KEYS:
            raise _unknown("--cluster-option", key, tuple(SLURM_KEYS))
        if key == "job_extra_directives":
            given[key] = (*given.get(key, ()), *_coerce("--cluster-option", key, value))
        else:
            given[key] = _coerce("--cluster-option", key, value)
    if given and kind != SLURM:
        raise InputError(
            f"--cluster-option: expected --cluster slurm, got --cluster {cluster} "
            f"(options: {', '.join(sorted(given))})"
        )
    values.update(given)
    if "partition" in values:
        if "queue" in values and values["queue"] != values["partition"]:
            raise InputError(
                f"cluster partition: expected the same as queue or only one of them, "
                f"got queue {values['queue']!r} and partition {values['partition']!r}"
            )
        values["queue"] = values.pop("partition")
    slurm = SlurmOptions(**values)
    if slurm.processes > slurm.cores:
        raise _fail("cluster", "processes", slurm.processes)
    return ClusterSettings(kind=kind, address=address, slurm=slurm)


def usable_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by ``SLURM_CPUS_PER_TASK``
    and by a cgroup CPU quota (``cpu.max``, or cgroup v1's ``cpu.cfs_quota_us``).

    A container limited to 2 CPUs on a 64-core host still sees 64 in its affinity mask;
    sizing a thread pool from that oversubscribes the quota.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        n = min(n, int(slurm))
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def cgroup_cpu_quota(
    root: Path = Path("/sys/fs/cgroup"), *, cgroup: str | None = None
) -> float | None:
    """The tightest cgroup CPU quota of this process in CPUs (e.g. 1.5), or None.

    cgroup v2: ``cpu.max`` (``"QUOTA PERIOD"`` or ``"max PERIOD"``) of this process's cgroup
    (``cgroup``, default from ``/proc/self/cgroup``) and its ancestors; cgroup v1:
    ``cpu/cpu.cfs_quota_us`` over ``cpu.cfs_period_us``.
    """
    quotas: list[float] = []
    if cgroup is None:
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            lines = []
        cgroup = next((line[3:] for line in lines if line.startswith("0::")), "/")
    own = cgroup
    folder = root / own.lstrip("/")
    candidates = [folder, *folder.parents] if folder.is_relative_to(root) else [root]
    for path in candidates:
        if not path.is_relative_to(root):
            break
        with contextlib.suppress(OSError, ValueError, IndexError):
            quota, period = (path / "cpu.max").read_text().split()[:2]
            if quota != "max" and float(period) > 0:
                quotas.append(float(quota) / float(period))
    with contextlib.suppress(OSError, ValueError):
        quota_us = float((root / "cpu/cpu.cfs_quota_us").read_text())
        period_us = float((root / "cpu/cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            quotas.append(quota_us / period_us)
    return min(quotas) if quotas else None


def worker_environment() -> list[str]:
    """Shell lines run in each worker job before the worker starts: the same ``PYTHONPATH``
    as this process (this checkout of the package first) and this working directory."""
    package_root = str(Path(pipeline.__file__).resolve().parents[1])
    paths = [package_root, *(p for p in os.environ.get("PYTHONPATH", "").split(":") if p)]
    pythonpath = ":".join(dict.fromkeys(str(Path(p).absolute()) for p in paths))
    return [f"export PYTHONPATH={shlex.quote(pythonpath)}", f"cd {shlex.quote(str(Path.cwd()))}"]


def _job_ids(cluster: Any) -> list[str]:
    return [str(job.job_id) for job in list(cluster.workers.values()) if job.job_id]


def _import_slurm_cluster() -> Any:
    """dask-jobqueue's ``SLURMCluster``, imported without its side effect on signals.

    Importing dask_jobqueue runs ``signal.signal(SIGINT, lambda *_: sys.exit())`` (its
    ``runner`` module, for its own processes): in this job Ctrl-C would then end the run
    through ``SystemExit`` with exit code 0. The previous handler is put back.
    """
    previous = signal.getsignal(signal.SIGINT)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ClusterError(
            "--cluster slurm: expected the dask-jobqueue package, got none installed "
            "(pip install dask-jobqueue)"
        ) from None
    finally:
        if previous is not None and signal.getsignal(signal.SIGINT) is not previous:
            with contextlib.suppress(ValueError):  # not the main thread: it could not set it
                signal.signal(signal.SIGINT, previous)
    return SLURMCluster


def _slurm_cluster(options: SlurmOptions) -> Any:
    SLURMCluster = _import_slurm_cluster()
    if options.interface is not None:
        import psutil

        names = sorted(psutil.net_if_addrs())
        if options.interface not in names:
            raise InputError(
                f"cluster interface: expected a network interface of this machine "
                f"({', '.join(names)}), got {options.interface!r}"
            )
    try:
        return SLURMCluster(
            queue=options.queue,
            account=options.account,
            cores=options.cores,
            processes=options.processes,
            memory=options.memory,
            walltime=options.walltime,
            job_extra_directives=list(options.job_extra_directives),
            interface=options.interface,
            log_directory=options.log_directory,
            local_directory=options.local_directory,
            job_name="mnist-pipeline-worker",
            python=sys.executable,
            job_script_prologue=worker_environment(),
            # Dashboards on loopback only (by default they listen on every interface).
            scheduler_options={"dashboard_address": "127.0.0.1:0"},
            worker_extra_args=["--dashboard-address", "127.0.0.1:0"],
        )
    except (RuntimeError, ValueError, OSError) as e:  # e.g. no address on that interface
        raise ClusterError(
            f"--cluster slurm: expected the dask scheduler to start, got {e}"
        ) from None


def _check_submittable(cluster: Any) -> None:
    """Fail with sbatch's own words when it would refuse the worker job (bad partition,
    too many cores): dask-jobqueue submits in the background and only logs such errors."""
    script = cluster.job_script()
    result = subprocess.run(
        ["sbatch", "--test-only"], input=script, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        reason = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
        raise ClusterError(
            f"--cluster slurm: expected sbatch to accept the worker job, got {reason}"
        )


def _wait_for_workers(cluster: Any, *, options: SlurmOptions, logger: logging.Logger) -> None:
    from distributed import Client

    expected = options.workers
    with Client(cluster, set_as_default=False, timeout="30s") as client:
        start = time.monotonic()
        deadline = start + options.wait_timeout
        next_note = start + 10.0
        while True:
            got = len(client.scheduler_info().get("workers", {}))
            if got >= expected:
                logger.info(
                    "%d dask workers connected in %.1f s (SLURM jobs %s)",
                    got,
                    time.monotonic() - start,
                    ", ".join(_job_ids(cluster)),
                    extra={"data": {"workers": got, "jobs": _job_ids(cluster)}},
                )
                return
            now = time.monotonic()
            if now >= deadline:
                raise ClusterError(
                    f"--cluster slurm: expected {expected} workers within "
                    f"{options.wait_timeout:g} s, got {got}: check squeue "
                    f"(jobs {', '.join(_job_ids(cluster)) or 'not submitted'})"
                )
            if now >= next_note:
                logger.info("waiting for dask workers: %d of %d connected", got, expected)
                next_note = now + 10.0
            time.sleep(0.2)


def _close(cluster: Any, *, logger: logging.Logger) -> None:
    """Cancel the worker jobs and stop the scheduler; a signal waits until this is done."""
    with signals_deferred():
        ids = _job_ids(cluster)
        if ids:
            # scancel first and ourselves: closing the cluster cancels them too, but only
            # after its scheduler shut down, which can take seconds.
            subprocess.run(["scancel", *ids], capture_output=True, check=False)
        try:
            cluster.close(timeout=30)
        except Exception as e:  # never hide the job's own outcome behind a cleanup error
            logger.warning("closing the dask cluster: %s", e)
        if ids:
            logger.info("cancelled SLURM worker jobs %s", ", ".join(ids))


@contextlib.contextmanager
def open_cluster(settings: ClusterSettings, *, logger: logging.Logger) -> Iterator[str | None]:
    """Yield the scheduler address for the stages' ``scheduler=`` (None: this machine).

    For ``slurm``: submits ``jobs`` worker jobs, waits up to ``wait_timeout`` seconds for
    all their workers (else :class:`~pipeline.errors.ClusterError`, naming the job ids),
    and cancels the jobs when the block ends in any way (SIGTERM included).
    """
    if settings.kind == LOCAL:
        yield None
        return
    if settings.kind != SLURM:
        yield settings.address
        return
    options = settings.slurm
    for command in ("sbatch", "squeue", "scancel"):
        if shutil.which(command) is None:
            raise ClusterError(f"--cluster slurm: expected {command} on PATH, got none")
    with terminate_as_interrupt():
        cluster = None
        try:
            cluster = _slurm_cluster(options)
            _check_submittable(cluster)
            logger.info(
                "submitting %d SLURM worker job(s): %d cores, %s, walltime %s%s",
                options.jobs,
                options.cores,
                options.memory,
                options.walltime,
                f", partition {options.queue}" if options.queue else "",
            )
            cluster.scale(jobs=options.jobs)
            _wait_for_workers(cluster, options=options, logger=logger)
            yield str(cluster.scheduler_address)
        finally:
            if cluster is not None:
                _close(cluster, logger=logger)
