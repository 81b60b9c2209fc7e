"""Entry point of the ``mnist-pipeline`` command line (also ``python -m jobs``).

One thin Typer command per stage lives in its own module; importing it registers it.
"""

from __future__ import annotations

import sys

from jobs import bench, features, fetch, ingest, runs, score, train  # noqa: F401  (registers the commands)
from jobs.app import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
