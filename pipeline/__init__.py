"""MNIST batch pipeline: idx -> zarr v3 -> hand-crafted features -> logistic regression.

The library layer. Every job of the ``mnist-pipeline`` CLI is one call into this package;
nothing here imports Typer.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mnist-pipeline")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
