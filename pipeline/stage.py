"""The stage runner every job goes through, so batch behaviour is the same everywhere.

A stage turns input files into one output (a file or a folder). :func:`run_stage`

* takes a lock beside the output, so two runs on the same output cannot interleave
  (the second waits up to ``lock_timeout`` seconds, then fails with :class:`LockError`);
* skips the work when the manifest beside the output says it was built from the same
  inputs (content checksums), parameters and pipeline version, and the output is unchanged;
* builds into a hidden temporary path beside the output and renames it into place only
  when complete (a crash or kill never leaves something that looks finished);
* writes a run manifest ``<output>.manifest.json``: inputs with checksums, parameters,
  library versions, start/end time, host, wall time, peak memory, and the stage's result.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import os
import platform
import resource
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.errors import InputError, LockError
from pipeline.fingerprint import content_fingerprint, disk_usage, fsync_dir, stat_fingerprint
from pipeline.logs import get_logger
from pipeline.paths import check_output, local_path, manifest_path, read_manifest, temp_path

MANIFEST_VERSION = 1
_TRACKED_LIBRARIES = (
    "numpy",
    "scipy",
    "scikit-learn",
    "dask",
    "distributed",
    "pyarrow",
    "zarr",
    "Pillow",
)

BuildFn = Callable[[Path], Mapping[str, Any] | None]


@dataclass(frozen=True)
class StageResult:
    """What a stage run did. ``skipped`` is True when the output was already up to date."""

    stage: str
    output: Path
    skipped: bool
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def result(self) -> dict[str, Any]:
        return dict(self.manifest.get("result") or {})


@dataclass(frozen=True)
class StageStatus:
    """Whether a stage's output is up to date, found without running the stage.

    ``up_to_date`` is None when it cannot be told (a missing input, a refused output).
    """

    stage: str
    output: Path
    inputs: dict[str, Path]
    up_to_date: bool | None
    reason: str


_planned: contextvars.ContextVar[list[StageStatus] | None] = contextvars.ContextVar(
    "planned", default=None
)


@contextlib.contextmanager
def planning() -> Iterator[list[StageStatus]]:
    """Within this block :func:`run_stage` builds nothing, takes no lock and creates no
    file: it appends each stage's :class:`StageStatus` to the yielded list and returns
    as if the output were up to date. What ``mnist-pipeline status`` runs the jobs in, so
    that the status comes from the same inputs, parameters and checks as a real run."""
    plan: list[StageStatus] = []
    token = _planned.set(plan)
    try:
        yield plan
    finally:
        _planned.reset(token)


def _plan_status(
    stage: str,
    output: Path,
    *,
    inputs: Mapping[str, Path],
    params: Mapping[str, Any],
    replaces: bool,
    input_fingerprint: Callable[[Path], str],
) -> StageStatus:
    def status(fresh: bool | None, reason: str) -> StageStatus:
        return StageStatus(stage, output, dict(inputs), fresh, reason)

    missing = [f"{name} {path}" for name, path in inputs.items() if not path.exists()]
    if missing:
        return status(None, f"missing input {', '.join(missing)}")
    try:
        check_output(stage, output, inputs=inputs, replaces=replaces)
    except InputError as e:
        return status(None, str(e))
    fingerprints = {name: input_fingerprint(p) for name, p in inputs.items()}
    return status(*is_up_to_date(output, inputs=fingerprints, params=params))


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "mnist-pipeline": __version__}
    for name in _TRACKED_LIBRARIES:
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB.

    On Linux, ``VmHWM`` from ``/proc/self/status``: the high-water mark of this program's
    own address space. ``getrusage``'s ``ru_maxrss`` is not used there because it carries
    over the parent's resident size from before ``exec`` (a job started by a big process
    would report the parent's memory). Elsewhere, ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return round(own * scale / 2**20, 1)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and rename (the temporary file is
    removed when the write fails)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:  # disk full, interrupted: no stray temporary file
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def output_lock(output: Path, *, timeout: float) -> Iterator[None]:
    """Hold an exclusive lock for ``output``; wait up to ``timeout`` seconds for it.

    Uses ``flock`` on a hidden ``.<name>.lock`` file beside the output. The holder's pid and
    host are written into it so the waiting run can say who holds it.
    """
    lock_file = output.with_name(f".{output.name}.lock")
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    acquired = False
    try:
        deadline = time.monotonic() + max(timeout, 0.0)
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = Path(lock_file).read_text().strip() or "another run"
                if time.monotonic() >= deadline:
                    raise LockError(
                        f"{output}: expected to get the lock within {timeout:g} s, "
                        f"got it held by {holder} (raise --lock-timeout to wait longer)"
                    ) from None
                if not announced:
                    get_logger("lock").info("waiting for %s, held by %s", output, holder)
                    announced = True
                time.sleep(0.2)
        acquired = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        if acquired:  # a run that timed out must not erase the holder's note
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        os.close(fd)  # closing releases the flock


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM so cleanup code runs as for Ctrl-C."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a batch scheduler's kill) raises :class:`Terminated` in the main thread,
    like Ctrl-C raises KeyboardInterrupt, so the runner cleans up the temporary output
    either way. Writes that must not be cut short use :func:`signals_deferred`."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"received signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back during one write; they take effect right after it.

    The other half of the runner's signal handling (see :func:`terminate_as_interrupt`):
    a stage's build may wrap a write that runs on another thread in this block. zarr, for
    one, writes on its own event-loop thread while the main thread waits; a signal handled
    during that wait would raise in the main thread and the runner would remove the
    temporary output while the write goes on, leaving stray chunks behind.
    The Python-level handlers are swapped (blocking the signal in the main thread is not
    enough: another thread may receive it and the handler still runs in the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def record(signum: int, frame: Any) -> None:
        received.append(signum)

    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is not None:  # None: installed outside Python, leave it alone
            previous[signum] = handler
            signal.signal(signum, record)
    try:
        yield
    finally:
        for num, old in previous.items():
            signal.signal(num, old)
        if received:
            first = previous[received[0]]
            if callable(first):
                first(received[0], None)
            elif first == signal.SIG_DFL:
                signal.raise_signal(received[0])


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _remove_settled(path: Path, *, attempts: int = 20, pause: float = 0.25) -> None:
    """Remove a temporary output that worker threads may still be writing into.

    After an interrupt, tasks already running on a thread pool (dask, zarr's I/O loop)
    finish their current write; a single ``rmtree`` can race with them and leave a
    half-removed folder behind. Retry until the path stays gone.
    """
    for _ in range(attempts):
        _remove(path)
        if not (path.exists() or path.is_symlink()):
            return
        time.sleep(pause)


def _remove_leftovers(output: Path, *, partial: bool) -> None:
    """Remove what killed runs of this stage left beside ``output`` (the caller holds the
    lock, so no other run can still be using them): ``.<name>.old-<pid>`` from a crash
    between the two renames of a rebuild, manifest temporary files, and the temporary
    output itself when ``partial`` (stages that cannot resume), even when the output
    turns out to be up to date."""
    leftovers = [
        *output.parent.glob(f".{output.name}.old-*"),
        *output.parent.glob(f".{manifest_path(output).name}.tmp-*"),
    ]
    if partial and (temp_path(output).exists() or temp_path(output).is_symlink()):
        leftovers.append(temp_path(output))
    for path in leftovers:
        get_logger("stage").info("removing %s, left by an interrupted run", path)
        _remove_settled(path)


def _mark_replacing(stage: str, output: Path) -> None:
    """Replace the manifest of ``output`` by one that says ``stage`` is rebuilding it."""
    write_json_atomic(
        manifest_path(output),
        {
            "manifest_version": MANIFEST_VERSION,
            "stage": stage,
            "status": "replacing",
            "pipeline_version": __version__,
            "output": {"path": str(output)},
        },
    )


def _swap_into_place(tmp: Path, output: Path) -> None:
    """Rename ``tmp`` to ``output``, replacing an existing output (file or folder)."""
    if output.exists() or output.is_symlink():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
        tmp.rename(output)
        _remove(old)
    else:
        tmp.rename(output)
    fsync_dir(output.parent)


def is_up_to_date(
    output: Path, *, inputs: Mapping[str, str], params: Mapping[str, Any]
) -> tuple[bool, str]:
    """Whether ``output`` was built from these input fingerprints and parameters.

    Returns ``(up_to_date, reason)``; the reason says what differs.
    """
    manifest = read_manifest(output)
    if not output.exists():
        return False, "no output yet"
    if manifest is None or manifest.get("status") != "complete":
        return False, "no complete manifest beside the output"
    if manifest.get("pipeline_version") != __version__:
        return False, f"built by pipeline {manifest.get('pipeline_version')}, now {__version__}"
    old_inputs = {k: v.get("sha256") for k, v in (manifest.get("inputs") or {}).items()}
    if old_inputs != dict(inputs):
        return False, "inputs changed"
    if manifest.get("params") != _jsonable(params):
        return False, "parameters changed"
    if (manifest.get("output") or {}).get("fingerprint") != stat_fingerprint(output):
        return False, "output was modified after it was built"
    return True, "up to date"


def run_stage(
    stage: str,
    *,
    output: Path,
    inputs: Mapping[str, Path],
    params: Mapping[str, Any],
    build: BuildFn,
    force: bool = False,
    lock_timeout: float = 60.0,
    atomic: bool = True,
    resume: bool = False,
    input_fingerprint: Callable[[Path], str] = content_fingerprint,
) -> StageResult:
    """Run one stage with the shared batch behaviour (see the module docstring).

    Parameters
    ----------
    stage : str
        Stage name, used in logs and the manifest.
    output : Path
        The file or folder this stage produces.
    inputs : mapping of name to Path
        Files or folders the output depends on; they must exist.
    params : mapping
        JSON-serialisable parameters that change the output.
    build : callable
        ``build(path)`` writes the output at ``path`` (a temporary path beside ``output``
        when ``atomic``, else ``output`` itself, for stages that write each file atomically
        on their own). It may return a mapping recorded as the manifest's ``result``.
    force : bool
        Rebuild even when up to date.
    lock_timeout : float
        Seconds to wait for another run on the same output.
    resume : bool
        Keep a temporary output left by a killed run (the build continues it) and keep it
        when this run fails, instead of starting afresh.
    input_fingerprint : callable
        How inputs are fingerprinted; content sha256 by default.
    """
    log = get_logger(stage)
    output = local_path(output, what="output")
    inputs = {name: local_path(p, what=name) for name, p in inputs.items()}
    plan = _planned.get()
    if plan is not None:
        plan.append(
            _plan_status(
                stage,
                output,
                inputs=inputs,
                params=params,
                replaces=atomic,
                input_fingerprint=input_fingerprint,
            )
        )
        return StageResult(stage, output, True, read_manifest(output) or {})
    for name, path in inputs.items():
        if not path.exists():
            raise InputError(f"{stage}: expected {name} at {path}, got no such file or folder")
    # Before anything is created beside it (the lock, the parent folder).
    check_output(stage, output, inputs=inputs, replaces=atomic)
    output.parent.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    with output_lock(output, timeout=lock_timeout), terminate_as_interrupt():
        # Under the lock: another run may have replaced the output while this one waited.
        check_output(stage, output, inputs=inputs, replaces=atomic)
        _remove_leftovers(output, partial=atomic and not resume)
        fingerprints = {name: input_fingerprint(p) for name, p in inputs.items()}
        if not force:
            fresh, reason = is_up_to_date(output, inputs=fingerprints, params=params)
            if fresh:
                log.info("%s is up to date; nothing to do (use --force to rebuild)", output)
                return StageResult(stage, output, True, read_manifest(output) or {})
            log.info("building %s (%s)", output, reason)
        else:
            log.info("building %s (--force)", output)
        target = temp_path(output) if atomic else output
        if not atomic:
            _mark_replacing(stage, output)
        try:
            result = build(target)
        except BaseException:
            if atomic and not resume:
                _remove_settled(target)
            raise
        # Mark the old manifest first: a crash between here and the new manifest leaves an
        # output that the next run knows as this stage's (so it may replace it) but not as
        # complete (so it rebuilds it rather than trusts it).
        _mark_replacing(stage, output)
        if atomic:
            _swap_into_place(target, output)
        finished = datetime.now(UTC)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "stage": stage,
            "status": "complete",
            "pipeline_version": __version__,
            "inputs": {
                name: {"path": str(p), "sha256": fingerprints[name], "bytes": disk_usage(Path(p))}
                for name, p in inputs.items()
            },
            "params": _jsonable(params),
            "output": {
                "path": str(output),
                "bytes": disk_usage(output),
                "fingerprint": stat_fingerprint(output),
            },
            "result": _jsonable(dict(result or {})),
            "versions": library_versions(),
            "run": {
                "started": started.isoformat(timespec="seconds"),
                "finished": finished.isoformat(timespec="seconds"),
                "wall_seconds": round(time.perf_counter() - t0, 3),
                "peak_rss_mb": peak_rss_mb(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "cpus": os.cpu_count(),
                "argv": sys.argv,
            },
        }
        write_json_atomic(manifest_path(output), manifest)
        log.info(
            "wrote %s in %.2f s (peak memory %.0f MiB)",
            output,
            manifest["run"]["wall_seconds"],
            manifest["run"]["peak_rss_mb"],
            extra={"data": {"output": str(output), **manifest["run"]}},
        )
        return StageResult(stage, output, False, manifest)
