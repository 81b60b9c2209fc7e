"""Entry point of the ``mnist-pipeline`` command line (also ``python -m jobs``).

One thin Typer command per stage lives in its own module; importing it registers it.
"""

from __future__ import annotations

import sys

from jobs import (  # noqa: F401  (importing a job module registers its command)
    bench,
    features,
    fetch,
    ingest,
    runs,
    score,
    status,
    train,
)
from jobs.app import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
