"""Model runs as experiments: list them and compare two (like ``dvc exp show`` / ``dvc
metrics diff``), from what ``train`` already writes.

A run is a model folder (``model.json`` + ``model.npz``) with ``metrics.json`` inside and
the train manifest ``<folder>.manifest.json`` beside it. Nothing here trains or scores.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.paths import read_manifest


@dataclass(frozen=True)
class Run:
    """One model run as its files describe it.

    Attributes
    ----------
    name : str
        The folder's path relative to the folder the runs were found under.
    path : Path
    dataset : str or None
        Dataset name of the store the features were made from.
    feature_config_hash : str or None
    params : dict
        Training parameters as the train manifest records them (grid, seed, ...).
    best_params : dict
        The selected hyper-parameters.
    accuracy : float or None
        Test accuracy.
    finished : str or None
        ISO time the run finished.
    seconds : float or None
        Wall time of the train stage.
    metrics : dict
        The whole ``metrics.json``.
    """

    name: str
    path: Path
    dataset: str | None
    feature_config_hash: str | None
    params: dict[str, Any]
    best_params: dict[str, Any]
    accuracy: float | None
    finished: str | None
    seconds: float | None
    metrics: dict[str, Any] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """The run as one JSON-ready row (without the full metrics)."""
        return {
            "name": self.name,
            "path": str(self.path),
            "dataset": self.dataset,
            "feature_config_hash": self.feature_config_hash,
            "best_params": self.best_params,
            "params": self.params,
            "accuracy": self.accuracy,
            "finished": self.finished,
            "seconds": self.seconds,
        }


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _dataset(manifest: dict[str, Any], model: dict[str, Any]) -> str | None:
    """The dataset's name: recorded in the model, else in the store train read."""
    if model.get("dataset"):
        return str(model["dataset"])
    store = ((manifest.get("inputs") or {}).get("store") or {}).get("path")
    attrs = _json(Path(store) / "zarr.json").get("attributes") or {} if store else {}
    return str(attrs["dataset"]) if attrs.get("dataset") else None


def load_run(folder: Path, *, name: str | None = None) -> Run:
    """The run in ``folder``; raises :class:`InputError` when it is not a model folder."""
    folder = Path(folder)
    model = _json(folder / "model.json")
    if not model:
        raise InputError(f"expected a model folder with model.json at {folder}, got none")
    metrics = _json(folder / "metrics.json")
    manifest = read_manifest(folder.absolute()) or {}
    run = manifest.get("run") or {}
    return Run(
        name=name or folder.name,
        path=folder,
        dataset=_dataset(manifest, model),
        feature_config_hash=model.get("feature_config_hash"),
        params=dict(manifest.get("params") or {}),
        best_params=dict(metrics.get("best_params") or model.get("best_params") or {}),
        accuracy=metrics.get("accuracy"),
        finished=run.get("finished"),
        seconds=run.get("wall_seconds"),
        metrics=metrics,
    )


def find_runs(root: Path) -> list[Run]:
    """Every run under ``root`` (any depth), oldest first (then by name)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"expected a folder of model runs at {root}, got no such folder")
    runs = [
        load_run(p.parent, name=p.parent.relative_to(root).as_posix() or p.parent.name)
        for p in sorted(root.rglob("model.json"))
        if not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(runs, key=lambda r: (r.finished or "", r.name))


def resolve_run(root: Path, name_or_path: str) -> Run:
    """A run by its name under ``root`` or by its folder path."""
    path = Path(name_or_path)
    if (path / "model.json").is_file():
        return load_run(path)
    if (Path(root) / name_or_path / "model.json").is_file():
        return load_run(Path(root) / name_or_path, name=name_or_path)
    known = [r.name for r in find_runs(root)] if Path(root).is_dir() else []
    raise InputError(
        f"expected a run name under {root} or a model folder, got {name_or_path!r} "
        f"(runs: {', '.join(known) or 'none'})"
    )


@dataclass(frozen=True)
class Change:
    """One compared value: ``old`` in run A, ``new`` in run B."""

    key: str
    old: Any
    new: Any

    @property
    def delta(self) -> float | None:
        numbers = [
            isinstance(v, int | float) and not isinstance(v, bool) for v in (self.old, self.new)
        ]
        return float(self.new) - float(self.old) if all(numbers) else None


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k in sorted(value):
            yield from _flatten(f"{prefix}.{k}" if prefix else str(k), value[k])
    else:
        yield prefix, value


def _metric_values(metrics: dict[str, Any]) -> dict[str, Any]:
    test = metrics.get("test") or {}
    out: dict[str, Any] = {}
    for key in ("accuracy", "error_rate", "log_loss"):
        if key in test:
            out[key] = test[key]
    for avg in ("macro", "weighted"):
        for k, v in (test.get(avg) or {}).items():
            out[f"{avg}.{k}"] = v
    for cls, row in sorted((test.get("per_class") or {}).items()):
        for k in ("precision", "recall", "f1"):
            if k in row:
                out[f"class {cls}.{k}"] = row[k]
    return out


@dataclass(frozen=True)
class RunDiff:
    """What differs between two runs: parameters (everything that shaped the model) and
    test metrics (overall, averaged, per class)."""

    a: Run
    b: Run
    params: list[Change]
    metrics: list[Change]

    def to_dict(self) -> dict[str, Any]:
        def rows(changes: list[Change]) -> list[dict[str, Any]]:
            return [{"key": c.key, "a": c.old, "b": c.new, "delta": c.delta} for c in changes]

        return {
            "a": self.a.summary(),
            "b": self.b.summary(),
            "params": rows(self.params),
            "metrics": rows(self.metrics),
        }


def diff_runs(a: Run, b: Run, *, all_metrics: bool = False) -> RunDiff:
    """Parameters that differ, and metrics (all of them, or only those that differ)."""

    def shaping(run: Run) -> dict[str, Any]:
        return dict(
            _flatten(
                "",
                {
                    "dataset": run.dataset,
                    "feature_config_hash": run.feature_config_hash,
                    "best": run.best_params,
                    **run.params,
                },
            )
        )

    pa, pb = shaping(a), shaping(b)
    params = [
        Change(k, pa.get(k), pb.get(k)) for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)
    ]
    ma, mb = _metric_values(a.metrics), _metric_values(b.metrics)
    keys = [k for k in ma if k in mb] + [k for k in mb if k not in ma]
    metrics = [
        Change(k, ma.get(k), mb.get(k)) for k in keys if all_metrics or ma.get(k) != mb.get(k)
    ]
    return RunDiff(a=a, b=b, params=params, metrics=metrics)
