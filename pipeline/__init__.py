"""MNIST batch pipeline: idx -> zarr v3 -> hand-crafted features -> logistic regression.

The library layer. Every job of the ``mnist-pipeline`` CLI is one call into this package;
nothing here imports Typer. The names below are the public Python API (imported on first
use, so that ``import pipeline`` stays cheap for the CLI)::

    from pipeline import Classifier, read_features
    clf = Classifier.load("data/models/default")
    clf.predict(images)                                   # (n, 28, 28) -> (n,) labels
    X, y = read_features("data/features", split="test")   # checked against its manifest
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("mnist-pipeline")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

#: Public name -> module that defines it.
_API = {
    "Classifier": "pipeline.classifier",
    "read_features": "pipeline.parquet",
    "FeatureSet": "pipeline.parquet",
    "PipelineError": "pipeline.errors",
    "InputError": "pipeline.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
