"""Running dask task lists on the local threaded scheduler or a distributed cluster.

Both paths report progress per finished task (weighted, e.g. by images) through
:func:`pipeline.logs.progress`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import dask
from dask.callbacks import Callback
from dask.delayed import Delayed
from threadpoolctl import threadpool_limits

from pipeline.errors import InputError
from pipeline.logs import progress


class _TaskProgress(Callback):
    """Advance a progress reporter when one of the watched keys finishes."""

    def __init__(self, weights: dict[Any, int], advance: Any) -> None:
        super().__init__()
        self._weights = weights
        self._advance = advance

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        weight = self._weights.get(key)
        if weight:
            self._advance(weight)


def default_workers() -> int:
    """Worker threads for the local scheduler: the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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
    """Compute ``tasks`` and return their results in order.

    Parameters
    ----------
    tasks : sequence of Delayed
        Independent tasks (one per chunk, typically writing one output part each).
    weights : sequence of int
        Progress units each task represents (e.g. its number of images).
    scheduler : str, optional
        Address of a ``dask.distributed`` scheduler (``tcp://host:8786``). Default: dask's
        local threaded scheduler with ``workers`` threads.
    """
    total = int(sum(weights))
    if scheduler:
        from distributed import Client, as_completed

        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise InputError(
                f"--scheduler: expected a reachable dask scheduler at {scheduler}, got {e}"
            ) from None
        with client:
            logger.info(
                "running on dask cluster %s (%d workers)",
                scheduler,
                len(client.scheduler_info().get("workers", {})),
            )
            futures = client.compute(list(tasks))
            weight_of = {f.key: w for f, w in zip(futures, weights, strict=True)}
            with progress(logger, description, total=total, unit=unit) as advance:
                for future in as_completed(futures):
                    future.result()  # re-raises a task's exception here
                    advance(weight_of[future.key])
            return client.gather(futures)
    n = workers or default_workers()
    keys = {t.key: w for t, w in zip(tasks, weights, strict=True)}
    # One BLAS thread per dask thread: nested BLAS threads oversubscribe the cores and made
    # 2 workers slower than 1 (measured: 5.6 s vs 3.2 s for 60,000 images' features).
    # dask.distributed workers get the same setting from their nanny.
    with (
        threadpool_limits(limits=1, user_api="blas"),
        progress(logger, description, total=total, unit=unit) as advance,
        _TaskProgress(keys, advance),
    ):
        return list(dask.compute(*tasks, scheduler="threads", num_workers=n))
