"""Logging and progress reporting shared by every stage.

Human-readable lines by default, JSON lines (one object per line) for cron/HPC log
collectors. Progress is a rich progress bar only when stderr is a terminal; otherwise a
plain log line at most every few seconds, so batch logs stay readable.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["human", "json"]
LOGGER_NAME = "mnist_pipeline"
_LOG_EVERY_S = 5.0


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, stage, msg, plus any ``extra={"data": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "stage": getattr(record, "stage", None) or record.name.rpartition(".")[2],
            "msg": record.getMessage(),
        }
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            obj.update(data)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


class HumanFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(stage_name)s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.stage_name = f"[{getattr(record, 'stage', None) or record.name.rpartition('.')[2]}]"
        return super().format(record)


def configure_logging(*, fmt: LogFormat = "human", level: str = "INFO") -> logging.Logger:
    """Set up the pipeline's logger on stderr; returns it. Safe to call more than once."""
    if fmt not in ("human", "json"):
        raise ValueError(f"expected log format 'human' or 'json', got {fmt!r}")
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    logger.log_format = fmt  # type: ignore[attr-defined]
    return logger


def get_logger(stage: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{stage}")


def _interactive(logger: logging.Logger) -> bool:
    root = logging.getLogger(LOGGER_NAME)
    if getattr(root, "log_format", "human") != "human" or not root.isEnabledFor(logging.INFO):
        return False
    return sys.stderr.isatty()


@contextmanager
def progress(
    logger: logging.Logger, description: str, *, total: int, unit: str = "items"
) -> Iterator[Callable[[int], None]]:
    """Report progress of ``total`` units of work; yields ``advance(n)``.

    A rich progress bar on a terminal; elsewhere an info line every few seconds and one at
    the end, with rate, so cron and HPC logs show that the job is alive.
    """
    start = time.perf_counter()
    done = 0
    if _interactive(logger):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        with bar:
            task = bar.add_task(description, total=total)

            def advance_bar(n: int) -> None:
                nonlocal done
                done += n
                bar.update(task, advance=n)

            yield advance_bar
    else:
        last = start

        def advance_log(n: int) -> None:
            nonlocal done, last
            done += n
            now = time.perf_counter()
            if now - last >= _LOG_EVERY_S and done < total:
                last = now
                logger.info(
                    "%s: %d/%d %s (%.0f%%)",
                    description,
                    done,
                    total,
                    unit,
                    100.0 * done / max(total, 1),
                    extra={"data": {"done": done, "total": total}},
                )

        yield advance_log
    elapsed = time.perf_counter() - start
    rate = done / elapsed if elapsed > 0 else float("inf")
    logger.info(
        "%s: %d %s in %.2f s (%.0f %s/s)",
        description,
        done,
        unit,
        elapsed,
        rate,
        unit,
        extra={"data": {"done": done, "seconds": round(elapsed, 3), "rate": round(rate, 1)}},
    )
