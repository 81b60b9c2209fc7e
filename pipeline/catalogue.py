"""The feature catalogue and feature configurations.

A feature configuration says which preprocessed *views* of the images to make (chains of
preprocessing steps applied to the raw images) and which feature *families* to compute on
which view. It is plain data (JSON/TOML), normalised with every default filled in, and
identified by the sha256 of its canonical JSON: the hash is stored with the features and
the model, and ``train``/``score`` refuse features whose hash differs from what they expect.

Example (TOML, for ``features --feature-config``)::

    [views]
    deskewed = [{op = "deskew"}]
    binary = [{op = "median_blur", size = 3}, {op = "binarize", method = "otsu"}]

    [[features]]
    name = "hog_cell7"
    family = "hog"
    view = "deskewed"
    cell = 7
    bins = 9

The view ``gray`` (the raw images as floats in [0, 1]) always exists.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline import preprocess, shape_features
from pipeline.errors import InputError
from pipeline.hog import hog_features

Layout = Literal["columns", "list"]


class FeatureConfigError(InputError):
    """A feature configuration names an unknown step/family or has bad parameters."""


@dataclass(frozen=True)
class Family:
    """A feature family: a kernel ``(n, H, W) -> (n, k) float32`` and how it is stored.

    ``layout="columns"``: one named float32 column per output (interpretable scalars);
    ``layout="list"``: one fixed-size list column (large vectors such as HOG).
    """

    kernel: Callable[..., np.ndarray]
    layout: Layout
    meaning: str
    column_names: Callable[..., list[str]] | None = None


def _zone_names(H: int, W: int, *, grid: int = 4) -> list[str]:
    return [f"r{r}_c{c}" for r in range(grid) for c in range(grid)]


FAMILIES: dict[str, Family] = {
    "hog": Family(
        hog_features, "list", "histograms of oriented gradients in cells, block-normalised"
    ),
    "pixels": Family(
        shape_features.pixel_grid, "list", "down-sampled pixel grid (mean over f x f blocks)"
    ),
    "profiles": Family(
        shape_features.projection_profiles, "list", "mean ink per row, then per column"
    ),
    "crossings": Family(
        shape_features.crossings, "list", "background-to-ink transitions per row, then column"
    ),
    "zoning": Family(
        shape_features.zoning, "columns", "ink density in a grid x grid partition", _zone_names
    ),
    "moments": Family(
        shape_features.moment_features,
        "columns",
        "ink, centroid, spread, correlation, skew, slant, bounding box, aspect",
        lambda H, W: list(shape_features.MOMENT_NAMES),
    ),
    "topology": Family(
        shape_features.topology,
        "columns",
        "8-connected components, enclosed holes, Euler number",
        lambda H, W, **_: list(shape_features.TOPOLOGY_NAMES),
    ),
}

#: Preprocessing steps usable in a view, each ``(n, H, W) -> (n, H, W)``.
STEPS: dict[str, Callable[..., np.ndarray]] = {
    "median_blur": preprocess.median_blur,
    "binarize": preprocess.binarize,
    "deskew": preprocess.deskew,
    "center": preprocess.center_of_mass_shift,
}

BASE_VIEW = "gray"

#: Columns every feature table starts with; no feature column may take their names.
FIXED_COLUMNS = ("image_id", "split", "label")

#: Inclusive bounds of every numeric parameter of a step or family, by parameter name.
#: ``"side"``: at most the shorter image side (checked with the image shape by
#: :func:`check_image_shape`; e.g. ``median_blur size=999`` would allocate 36 GiB for a
#: chunk of 28x28 images). Bounds keep every parameter where the kernels stay finite and
#: memory stays proportional to the images; a test checks every parameter has one.
PARAMETER_BOUNDS: dict[str, tuple[float, float | Literal["side"]]] = {
    "size": (1, "side"),  # median window, pixels
    "cell": (1, "side"),  # HOG cell, pixels
    "grid": (1, "side"),  # zoning cells per side
    "factor": (1, "side"),  # pixel-grid block, pixels
    "block": (0, "side"),  # HOG block, cells (the kernel checks it against the cell count)
    "bins": (2, 360),  # orientation bins: the output width grows with them
    "threshold": (0.0, 1.0),  # fraction of full intensity
    "eps": (1e-12, 1e3),  # block-norm regulariser: 0 divides blank blocks by zero
    "power": (0.01, 4.0),  # histogram power: large powers overflow float32
}

#: The default: the configuration that made logistic regression most accurate on MNIST
#: (see README, "Accuracy"): on moment-deskewed images, square-root HOG with soft
#: orientation bins and bilinear (triangle) cell pooling at two scales, plus a 14x14 pixel
#: grid. 1,492 features.
_ROOT_HOG = {"family": "hog", "view": "deskewed", "power": 0.5, "eps": 0.0316}
DEFAULT_CONFIG: dict[str, Any] = {
    "views": {"deskewed": [{"op": "deskew"}]},
    "features": [
        {"name": "hog_c7", **_ROOT_HOG, "cell": 7, "bins": 4, "signed": False},
        {"name": "hog_c4", **_ROOT_HOG, "cell": 4, "bins": 8, "signed": True},
        {"name": "pixels_f2", "family": "pixels", "view": "deskewed", "factor": 2},
    ],
}


def _defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _fill(kind: str, what: str, fn: Callable[..., Any], given: Mapping[str, Any]) -> dict:
    defaults = _defaults(fn)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise FeatureConfigError(
            f"{kind} {what!r}: expected parameters among {sorted(defaults)}, got {unknown}"
        )
    out = dict(defaults)
    for key, value in given.items():
        # bool is an int subclass: `threshold = true` must not become 1.0.
        int_for_float = (
            isinstance(value, int)
            and not isinstance(value, bool)
            and isinstance(defaults[key], float)
        )
        if type(value) is not type(defaults[key]) and not int_for_float:
            raise FeatureConfigError(
                f"{kind} {what!r}: expected {key} of type {type(defaults[key]).__name__}, "
                f"got {value!r}"
            )
        value = float(value) if isinstance(defaults[key], float) else value
        if isinstance(value, float) and not math.isfinite(value):
            # TOML has nan and inf literals; `hog eps = nan` made all-NaN features.
            raise FeatureConfigError(
                f"{kind} {what!r}: expected a finite number for {key}, got {value!r}"
            )
        if isinstance(value, int | float) and not isinstance(value, bool):
            if key not in PARAMETER_BOUNDS:  # a developer's omission, caught by a test
                raise AssertionError(f"{kind} {what!r}: no PARAMETER_BOUNDS for {key}")
            lo, hi = PARAMETER_BOUNDS[key]
            if value < lo or (hi != "side" and value > hi):
                limits = f">= {lo:g}" if hi == "side" else f"in [{lo:g}, {hi:g}]"
                raise FeatureConfigError(f"{kind} {what!r}: expected {key} {limits}, got {value!r}")
        out[key] = value
    return out


def check_image_shape(config: FeatureConfig, image_shape: tuple[int, int]) -> None:
    """Refuse parameters measured in pixels that exceed the shorter image side.

    Call it before running any kernel on images of ``image_shape`` (H, W).
    """
    side = min(image_shape)
    users = {f.view: f.name for f in reversed(config.features)}
    checks = [
        (f"view {view!r} step {op!r} (used by feature {users.get(view, 'none')!r})", params)
        for view, steps in config.views
        for op, params in steps
    ]
    checks += [(f"feature {f.name!r} ({f.family})", f.params) for f in config.features]
    for where, params in checks:
        for key, value in params:
            if PARAMETER_BOUNDS.get(key, (0, 0))[1] == "side" and value > side:
                raise FeatureConfigError(
                    f"{where}: expected {key} <= image side {side}, got {value} "
                    f"(images of shape {tuple(image_shape)})"
                )


@dataclass(frozen=True)
class FeatureSpec:
    """One configured feature family: ``name`` (column prefix), family, view, parameters."""

    name: str
    family: str
    view: str
    params: tuple[tuple[str, Any], ...]

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)


@dataclass(frozen=True)
class FeatureConfig:
    """A normalised feature configuration. Build it with :func:`load_config`."""

    views: tuple[tuple[str, tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]], ...]
    features: tuple[FeatureSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "views": {
                name: [{"op": op, **dict(params)} for op, params in steps]
                for name, steps in self.views
            },
            "features": [
                {"name": f.name, "family": f.family, "view": f.view, **f.kwargs}
                for f in self.features
            ],
        }

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON of the normalised configuration."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def view_steps(self, view: str) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
        return dict(self.views)[view] if view != BASE_VIEW else ()


def load_config(source: Mapping[str, Any] | Path | None = None) -> FeatureConfig:
    """Validate and normalise a feature configuration (dict, TOML/JSON file, or default)."""
    if source is None:
        raw: Mapping[str, Any] = DEFAULT_CONFIG
    elif isinstance(source, Path):
        try:
            text = source.read_bytes()
        except OSError as e:
            raise FeatureConfigError(
                f"expected a readable feature config at {source}, got {e.strerror or e}"
            ) from None
        try:
            raw = json.loads(text) if source.suffix == ".json" else tomllib.loads(text.decode())
        except (ValueError, UnicodeDecodeError) as e:
            raise FeatureConfigError(
                f"{source}: expected a TOML (or .json) feature config, got {e}"
            ) from None
    else:
        raw = source
    if not isinstance(raw, Mapping):
        raise FeatureConfigError(f"expected a table with 'views' and 'features', got {raw!r}")
    extra = sorted(set(raw) - {"views", "features"})
    if extra:
        raise FeatureConfigError(f"expected keys 'views' and 'features', got also {extra}")
    raw_views = raw.get("views") or {}
    raw_features = raw.get("features") or []
    if not isinstance(raw_views, Mapping):
        raise FeatureConfigError(
            f"expected 'views' to be a table of step lists, got {type(raw_views).__name__}"
        )
    if not isinstance(raw_features, list) or not all(isinstance(f, Mapping) for f in raw_features):
        raise FeatureConfigError(
            "expected 'features' to be a list of tables (TOML [[features]]), got "
            f"{type(raw_features).__name__}"
        )
    views = []
    for name, steps in raw_views.items():
        if name == BASE_VIEW:
            raise FeatureConfigError(
                f"expected a view name other than {BASE_VIEW!r} (reserved for the raw "
                f"images), got {name!r}"
            )
        if not isinstance(steps, list) or not all(isinstance(x, Mapping) for x in steps):
            raise FeatureConfigError(
                f'view {name!r}: expected a list of steps like [{{op = "deskew"}}], got {steps!r}'
            )
        norm_steps = []
        for step in steps:
            step = dict(step)
            op = step.pop("op", None)
            if not isinstance(op, str) or op not in STEPS:
                raise FeatureConfigError(
                    f"view {name!r}: expected op in {sorted(STEPS)}, got {op!r}"
                )
            norm_steps.append((op, tuple(sorted(_fill("step", op, STEPS[op], step).items()))))
        views.append((name, tuple(norm_steps)))
    view_names = {BASE_VIEW, *(n for n, _ in views)}
    features = []
    for item in raw_features:
        item = dict(item)
        family, view = item.pop("family", None), item.pop("view", BASE_VIEW)
        if not isinstance(family, str) or family not in FAMILIES:
            raise FeatureConfigError(f"expected family in {sorted(FAMILIES)}, got {family!r}")
        if not isinstance(view, str) or view not in view_names:
            raise FeatureConfigError(
                f"feature family {family!r}: expected view in {sorted(view_names)}, got {view!r}"
            )
        name = str(item.pop("name", f"{family}_{view}"))
        if name in FIXED_COLUMNS:
            raise FeatureConfigError(
                f"feature family {family!r}: expected a name other than {FIXED_COLUMNS} "
                f"(columns every feature table has), got {name!r}"
            )
        params = _fill("family", family, FAMILIES[family].kernel, item)
        features.append(FeatureSpec(name, family, view, tuple(sorted(params.items()))))
    if not features:
        raise FeatureConfigError("expected at least one feature family, got none")
    names = [f.name for f in features]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FeatureConfigError(f"expected unique feature names, got duplicates {dupes}")
    return FeatureConfig(views=tuple(views), features=tuple(features))


@dataclass(frozen=True)
class Column:
    """One stored column: its name, the slice of the feature matrix it holds, its layout."""

    name: str
    start: int
    stop: int
    layout: Layout
    feature: str


def columns(
    config: FeatureConfig, widths: Mapping[str, int], image_shape: tuple[int, int]
) -> list[Column]:
    """The stored columns of ``config`` in feature-matrix order."""
    H, W = image_shape
    out: list[Column] = []
    pos = 0
    for spec in config.features:
        family = FAMILIES[spec.family]
        k = widths[spec.name]
        if family.layout == "list":
            out.append(Column(spec.name, pos, pos + k, "list", spec.name))
        else:
            assert family.column_names is not None
            params = {key: v for key, v in spec.kwargs.items() if key == "grid"}
            names = family.column_names(H, W, **params)
            if len(names) != k:
                raise AssertionError(f"{spec.family}: {len(names)} names for {k} outputs")
            out.extend(
                Column(f"{spec.name}_{sub}", pos + i, pos + i + 1, "columns", spec.name)
                for i, sub in enumerate(names)
            )
        pos += k
    taken = [*FIXED_COLUMNS, *(c.name for c in out)]
    clashes = sorted({n for n in taken if taken.count(n) > 1})
    if clashes:
        raise FeatureConfigError(
            f"expected distinct column names, got {clashes} more than once (rename a feature)"
        )
    return out


def describe() -> list[dict[str, str]]:
    """The catalogue as rows (family, layout, parameters with defaults, meaning)."""
    return [
        {
            "family": name,
            "layout": fam.layout,
            "parameters": ", ".join(f"{k}={v!r}" for k, v in _defaults(fam.kernel).items()),
            "meaning": fam.meaning,
        }
        for name, fam in FAMILIES.items()
    ]
