"""Running dask task lists on local threads, local worker processes or a distributed cluster.

Every path reports progress per finished task (weighted, e.g. by images) through
:func:`pipeline.logs.progress`.

Failures of the processes themselves are one-line :class:`~pipeline.errors.ClusterError` errors:
a scheduler that cannot be reached, a cluster left without workers for
``no_worker_timeout`` seconds, workers killed while running a task (often for memory), a
local worker process that died. Local worker processes never outlive the job: they exit
when it dies, even by ``kill -9``, ignore Ctrl-C (the job stops them) and exit quietly on
SIGTERM.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import dask
import dask.threaded
from dask.callbacks import Callback
from dask.delayed import Delayed
from threadpoolctl import threadpool_limits

from pipeline.errors import ClusterError, InputError
from pipeline.logs import progress
from pipeline.stage import signals_deferred


class TaskProgress(Callback):
    """Advance a progress reporter when one of the watched dask keys finishes (local
    schedulers; callbacks run in this process)."""

    def __init__(self, weights: dict[Any, int], advance: Callable[[int], None]) -> None:
        super().__init__()
        self._weights = weights
        self._advance = advance

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        weight = self._weights.get(key)
        if weight:
            self._advance(weight)


def default_workers() -> int:
    """Worker threads for the local scheduler: the CPUs this process may use (affinity
    mask, ``SLURM_CPUS_PER_TASK``, cgroup CPU quota; see :func:`pipeline.cluster.usable_cpus`)."""
    from pipeline.cluster import usable_cpus

    return usable_cpus()


#: ``run(tasks, weights, advance)``: compute the tasks, calling ``advance(weight)`` as each
#: finishes; returns their results in order.
RunTasks = Callable[[list[Delayed], list[int], Callable[[int], None]], list[Any]]


def _blas_one_thread() -> None:
    threadpool_limits(limits=1, user_api="blas")


#: Seconds a distributed run waits while its cluster has no worker before it fails.
DEFAULT_NO_WORKER_TIMEOUT = 60.0
_no_worker_timeout: ContextVar[float] = ContextVar(
    "no_worker_timeout", default=DEFAULT_NO_WORKER_TIMEOUT
)

# Schemes of the comm backends distributed registers (distributed.comm.registry.backends),
# spelled out so checking an address does not import distributed.
_SCHEDULER_SCHEMES = ("tcp", "tls", "inproc", "ucx", "ws", "wss")


def check_scheduler_address(address: str) -> str:
    """``address`` if it is a dask scheduler address (``tcp://host:8786``, ``tls://...``,
    ``inproc://...``, or ``host:port``); else :class:`InputError`.

    Checked before connecting: distributed would take a name such as ``garbage`` for a
    host and retry it until the connect timeout.
    """
    expected = (
        f"--scheduler: expected a dask scheduler address like tcp://host:8786, got {address!r}"
    )
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "tcp", address
    if scheme not in _SCHEDULER_SCHEMES or not rest or any(c.isspace() for c in address):
        raise InputError(expected)
    if scheme == "inproc":
        return address
    host, colon, port = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:8786
    if not (colon and host and "/" not in rest and port.isdigit() and 0 < int(port) < 65536):
        raise InputError(expected)
    return address


@contextlib.contextmanager
def cluster_settings(*, no_worker_timeout: float) -> Iterator[None]:
    """Within the block, :func:`executor` calls that do not pass ``no_worker_timeout``
    use this one (how jobs hand a command-line setting to the stages they run)."""
    if not no_worker_timeout > 0:  # also refuses nan
        raise InputError(
            f"--worker-timeout: expected a positive number of seconds, got {no_worker_timeout}"
        )
    token = _no_worker_timeout.set(float(no_worker_timeout))
    try:
        yield
    finally:
        _no_worker_timeout.reset(token)


@contextlib.contextmanager
def executor(
    *,
    logger: logging.Logger,
    scheduler: str | None = None,
    workers: int | None = None,
    processes: bool = False,
    worker_init: Callable[[], None] | None = None,
    preload: Sequence[str] = (),
    no_worker_timeout: float | None = None,
) -> Iterator[tuple[RunTasks, int]]:
    """Where dask tasks run; yields ``(run, slots)``, slots being how many run at once.

    Parameters
    ----------
    scheduler : str, optional
        Address of a ``dask.distributed`` scheduler (``tcp://host:8786``); one client for
        the whole block. Default: this machine. The connection is given dask's
        ``distributed.comm.timeouts.connect`` (30 s unless configured, e.g. by
        ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=10s``).
    workers : int, optional
        Local threads or processes (default: the CPUs this process may use).
    processes : bool
        Run local tasks in a persistent pool of worker processes instead of threads, for
        Python-bound work that holds the GIL (decoding many small files).
    worker_init, preload
        With ``processes``: a module-level function run in each worker at start (besides
        limiting BLAS to one thread), and modules the forkserver imports once for all.
    no_worker_timeout : float, optional
        With ``scheduler``: seconds the cluster may have no worker at all while tasks are
        pending before the run fails with :class:`ClusterError` (default: the value of the
        enclosing :func:`cluster_settings`, else :data:`DEFAULT_NO_WORKER_TIMEOUT`).
    """
    if scheduler:
        timeout = _no_worker_timeout.get() if no_worker_timeout is None else no_worker_timeout
        with _distributed(scheduler, logger=logger, no_worker_timeout=timeout) as (run, slots):
            yield _memory_error_is_one_line(run), slots
        return
    n = workers or default_workers()
    if processes and n > 1:
        with _process_pool(n, worker_init=worker_init, preload=preload) as run_pool:
            yield _memory_error_is_one_line(run_pool), n
        return

    def run_threads(
        tasks: list[Delayed], weights: list[int], advance: Callable[[int], None]
    ) -> list[Any]:
        keys = {t.key: w for t, w in zip(tasks, weights, strict=True)}
        # One BLAS thread per dask thread: nested BLAS threads oversubscribe the cores and
        # made 2 workers slower than 1 (measured: 5.6 s vs 3.2 s for 60,000 images'
        # features). dask.distributed workers get the same setting from their nanny.
        with threadpool_limits(limits=1, user_api="blas"), TaskProgress(keys, advance):
            # The threaded scheduler's function itself, not the name "threads": naming
            # it makes dask import distributed (0.3 s) to look for a default client.
            return list(dask.compute(*tasks, scheduler=dask.threaded.get, num_workers=n))

    yield _memory_error_is_one_line(run_threads), n


def _memory_error_is_one_line(run: RunTasks) -> RunTasks:
    """``run``, with a task's MemoryError (the machine's limit, not a bug) as one line."""

    def run_tasks(
        tasks: list[Delayed], weights: list[int], advance: Callable[[int], None]
    ) -> list[Any]:
        try:
            return run(tasks, weights, advance)
        except MemoryError as e:
            raise ClusterError(
                f"expected the tasks to fit in memory, got MemoryError{f': {e}' if str(e) else ''}"
                " (use fewer workers or smaller batches)"
            ) from None

    return run_tasks


# ------------------------------------------------------------------- dask.distributed


@contextlib.contextmanager
def _distributed(
    scheduler: str, *, logger: logging.Logger, no_worker_timeout: float
) -> Iterator[tuple[RunTasks, int]]:
    """A client of the scheduler at ``scheduler`` for the block (see :func:`executor`)."""
    check_scheduler_address(scheduler)
    if not no_worker_timeout > 0:
        raise InputError(
            f"--worker-timeout: expected a positive number of seconds, got {no_worker_timeout}"
        )
    from dask.utils import parse_timedelta
    from distributed import Client, KilledWorker, as_completed
    from distributed.client import FutureCancelledError

    connect = float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect")))
    try:
        client = Client(scheduler, timeout=connect, set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise ClusterError(
            f"--scheduler: expected a reachable dask scheduler at {scheduler}, got: {_one_line(e)}"
        ) from None

    def lost(e: BaseException) -> ClusterError:
        return ClusterError(
            f"expected the dask scheduler at {scheduler} to stay reachable, got {_one_line(e)}"
        )

    with client:
        try:
            info = client.scheduler_info().get("workers", {})
        except OSError as e:
            raise lost(e) from None
        slots = max(1, sum(int(w.get("nthreads", 1)) for w in info.values()))
        logger.info(
            "running on dask cluster %s (%d workers, %d threads)", scheduler, len(info), slots
        )

        def run_remote(
            tasks: list[Delayed], weights: list[int], advance: Callable[[int], None]
        ) -> list[Any]:
            futures = client.compute(tasks)
            weight_of = {f.key: w for f, w in zip(futures, weights, strict=True)}
            watch = _WorkerWatch(
                client, futures, scheduler=scheduler, timeout=no_worker_timeout, logger=logger
            )
            try:
                # set_as_default=False: as_completed must be told which loop to use
                for future in as_completed(futures, loop=client.loop):
                    future.result()  # re-raises a task's exception here
                    advance(weight_of[future.key])
            except KilledWorker as e:
                tries = e.allowed_failures + 1
                raise ClusterError(
                    f"dask task {e.task!r}: expected a worker to finish it, got {tries} "
                    f"worker{'s' if tries > 1 else ''} killed while running it (out of "
                    "memory? see the worker logs)"
                ) from None
            except FutureCancelledError as e:  # by the watch, or by a lost connection
                raise (watch.error or lost(e)) from None
            except OSError as e:  # CommClosedError and friends: the scheduler went away
                raise lost(e) from None
            finally:
                watch.stop()
            return list(client.gather(futures))

        yield run_remote, slots


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


class _WorkerWatch:
    """A thread that cancels ``futures`` once the cluster has had no worker for
    ``timeout`` seconds: a scheduler keeps the tasks of a cluster without workers waiting
    forever, and a job must fail instead, and say why (:attr:`error`)."""

    def __init__(
        self,
        client: Any,
        futures: list[Any],
        *,
        scheduler: str,
        timeout: float,
        logger: logging.Logger,
    ) -> None:
        self.error: ClusterError | None = None
        self._client, self._futures = client, futures
        self._scheduler, self._timeout, self._logger = scheduler, timeout, logger
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dask-worker-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)  # a daemon: a hung scheduler call does not hold the job

    def _run(self) -> None:
        # Often enough to fail soon after the timeout, rarely enough to cost nothing.
        poll = min(1.0, self._timeout / 4)
        alone_since: float | None = None  # when the cluster was first seen without workers
        while not self._stopped.wait(poll):
            try:
                workers = len(self._client.nthreads())
            except Exception:  # the client's own reconnection logic cancels the futures
                return
            if workers:
                alone_since = None
            elif alone_since is None:
                alone_since = time.monotonic()
                self._logger.warning(
                    "dask cluster %s has no workers; failing in %g s unless one joins",
                    self._scheduler,
                    self._timeout,
                )
            elif time.monotonic() - alone_since >= self._timeout:
                self.error = ClusterError(
                    f"expected workers on the dask cluster {self._scheduler}, got none for "
                    f"{self._timeout:g} s (raise --worker-timeout to wait longer)"
                )
                with contextlib.suppress(Exception):
                    self._client.cancel(self._futures, reason="no-workers")
                return


# ---------------------------------------------------------------- local worker processes


@contextlib.contextmanager
def _process_pool(
    n: int, *, worker_init: Callable[[], None] | None, preload: Sequence[str]
) -> Iterator[RunTasks]:
    """``n`` local worker processes for the block (see :func:`executor`)."""
    # forkserver: no fork of a parent that already runs threads.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    pool = ProcessPoolExecutor(
        n, mp_context=context, initializer=_init_worker, initargs=(worker_init, os.getpid())
    )
    try:
        # Start every worker now, with Ctrl-C and SIGTERM held back meanwhile (up to the
        # forkserver's start-up, ~1 s): a job ended while the pool started a worker left a
        # half-started one, not yet known to the pool and so not stopped, which printed a
        # traceback when it could not find the job's semaphores any more. Started on
        # demand otherwise (CPython >= 3.9 has _launch_processes; without it, on demand).
        with signals_deferred():
            launch = getattr(pool, "_launch_processes", None)
            manage = getattr(pool, "_start_executor_manager_thread", None)
            if launch is not None and manage is not None:
                launch()
                # Started with the workers, not on the first submit: without it, a pool
                # that runs no task (an empty input) never tells its workers to exit on
                # shutdown, and the interpreter waits for them forever at exit.
                manage()
    except BaseException:
        _stop_workers(pool)
        raise

    def run_pool(
        tasks: list[Delayed], weights: list[int], advance: Callable[[int], None]
    ) -> list[Any]:
        keys = {t.key: w for t, w in zip(tasks, weights, strict=True)}
        try:
            with TaskProgress(keys, advance):
                return list(dask.compute(*tasks, scheduler="processes", pool=pool))
        except BrokenProcessPool:
            # Workers killed by the signal that is stopping the job (a process group's
            # SIGTERM or Ctrl-C): let the job's own handler raise here, so the job says
            # it was interrupted rather than that a worker died.
            time.sleep(0.5)
            raise ClusterError(
                "expected the local worker processes to finish their tasks, got one killed "
                "(out of memory? see the system log)"
            ) from None

    try:
        yield run_pool
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)


def _stop_workers(pool: Any) -> None:
    """Stop a pool's workers at once (an interrupted or failed job does not wait for
    their running tasks, which ``shutdown`` would)."""
    processes = list(getattr(pool, "_processes", None) or {})  # pid -> process
    for pid in processes:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)  # workers exit quietly on it, see _init_worker
    pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(worker_init: Callable[[], None] | None, job_pid: int) -> None:
    """Start-up of a worker process (``worker_init`` must be a module-level function).

    A worker is a child of the forkserver, not of the job, and it holds the job's stdout
    and stderr and the pipes that keep the forkserver and multiprocessing's resource
    tracker alive: so that none of them outlives a job killed with ``kill -9`` (a wrapper
    reading the job's output would wait for them), the worker exits as soon as the job
    is gone; the forkserver and the resource tracker then see end-of-file and exit too.
    """
    _exit_with(job_pid)
    # Ctrl-C reaches the whole process group: the job handles it and stops its workers;
    # SIGTERM (a supervisor's kill, maybe of the whole group) ends a worker without the
    # traceback the default KeyboardInterrupt/SystemExit would print.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)
    _blas_one_thread()
    if worker_init is not None:
        worker_init()


def _exit_quietly(signum: int, frame: Any) -> None:
    os._exit(128 + signum)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _exit_with(job_pid: int) -> None:
    """Make this process exit when process ``job_pid`` or this process's parent ends."""
    # The parent (the forkserver) dying: the kernel kills this process.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The job dying: a pidfd becomes readable when its process ends (Linux >= 5.3).
    try:
        pidfd: int | None = os.pidfd_open(job_pid)
    except ProcessLookupError:
        os._exit(1)  # already gone
    except (AttributeError, OSError):
        pidfd = None
    threading.Thread(
        target=_watch_job, args=(job_pid, pidfd), name="exit-with-job", daemon=True
    ).start()


def _watch_job(job_pid: int, pidfd: int | None) -> None:
    if pidfd is not None:
        select.select([pidfd], [], [])
    else:  # no pidfd: poll (a reused pid would keep this worker alive, a small risk)
        while True:
            time.sleep(0.5)
            try:
                os.kill(job_pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                break  # the pid now belongs to another user's process
    os._exit(1)


def compute_tasks(
    tasks: Sequence[Delayed],
    *,
    weights: Sequence[int],
    logger: logging.Logger,
    description: str,
    unit: str = "images",
    scheduler: str | None = None,
    workers: int | None = None,
) -> list[Any]:
    """Compute ``tasks`` (all at once) with a progress report; results in order.

    Parameters
    ----------
    tasks : sequence of Delayed
        Independent tasks (one per chunk, typically writing one output part each).
    weights : sequence of int
        Progress units each task represents (e.g. its number of images).
    scheduler, workers
        See :func:`executor`.
    """
    with (
        executor(logger=logger, scheduler=scheduler, workers=workers) as (run, _),
        progress(logger, description, total=int(sum(weights)), unit=unit) as advance,
        _long_lived_heap_frozen(),
    ):
        return run(list(tasks), list(weights), advance)


@contextlib.contextmanager
def _long_lived_heap_frozen() -> Iterator[None]:
    """Keep the objects that exist before the tasks run (modules, numba's type registries:
    some 140,000 in the features job) out of the garbage collector's passes meanwhile;
    they are handed back afterwards. Each full collection otherwise walks them all
    (features stage ~4% faster, medians of 6 interleaved runs; memory unchanged)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
