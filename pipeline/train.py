"""The ``train`` stage: logistic regression selected on held-out data, refit, evaluated, reported.

Selection never sees the test split:

* hold-out (default): grid points are fitted on the first ``n - validation_size`` training
  images (or a seeded subsample of ``selection_size`` of them) and scored on the last
  ``validation_size`` (MNIST: 50,000 / 10,000, as in the original study);
* ``cv=K``: stratified K-fold over the training split (shuffled with ``seed``); a point's
  score is the mean over the folds, reported with its standard deviation.

Each fold standardizes with the mean and spread of its own fitting rows (all of them, also
when the fits use a subsample), so no statistic of the validation rows leaks into a fit.

The selection subsample (:data:`DEFAULT_SELECTION_SIZE` rows, seeded) makes each grid fit
~2.5x cheaper. Measured on MNIST it picks the C that fits on all 50,000 fitting rows pick
(C=0.01: 0.9894 / 0.9906 / 0.9904 on 20,000 rows for C=0.003 / 0.01 / 0.03, against
0.9914 / 0.9920 / 0.9920 on 50,000); 10,000 rows picked C=0.03 and left the final fit 36
iterations from its start instead of 24, so 20,000 it is. ``selection_size=None`` (CLI
``--selection-size 0``) fits on all rows.

**Grid points are independent.** Every fit runs until lbfgs's projected gradient is below
``tol`` (or ``max_iter``) from a start fixed by its own C: from zero when C <=
:data:`ANCHOR_C`, else from the solution at C = ANCHOR_C (the anchor, itself fitted from
zero; fitted on purpose when the grid does not hold it). A point's score is therefore a
function of its parameters (and the data and seed) only: identical whether it is fitted
alone or within a grid, in any order. The anchor saves lbfgs iterations where they are
dearest (measured on MNIST, 20,000 rows, tol 1e-4: C=0.03 from zero 66 iterations, from the
anchor 14). The fits run in ``jobs`` threads with one BLAS thread each; a warm fit starts
as soon as its anchor is done.

**Grid** ``auto`` (the default) starts from C = 0.003, 0.01, 0.03 and, while the best C is
the smallest or the largest of the grid, adds a point a factor :data:`AUTO_FACTOR` further
in that direction (at most :data:`AUTO_MAX_EXTRA` points). A user-given grid whose best C is
on its edge is kept, with a warning in the log, ``metrics.json`` and the report.

**Choice.** With ``cv=K``, the one-standard-error rule: among the points whose mean score
is within one standard error (``std / sqrt(K)``) of the best mean, the one with the
smallest C (the strongest regularization; then the first class weight of the grid). On a
single hold-out, the best accuracy, where scores within :data:`HOLDOUT_TIE_IMAGES` images
(the measured precision of a converged score) are ties won by the smaller C. Binary mode
on a hold-out (average precision): the best score, ties to the smaller C. ``--grid auto`` extends
while the chosen point is on the edge (an edge point better by less than the noise is no
direction of improvement), and the edge warning is about the chosen point too.

**Final fit** on all training images, warm-started from the selected point's solution (the
first fold's), in rounds of :data:`FINAL_ROUND` lbfgs iterations (two, then doubling). It
stops when lbfgs converges at ``tol``, or when a round changes the predicted class of fewer
hold-out images than the hold-out can resolve: its standard error in images,
``sqrt(n e (1 - e))`` for ``n`` hold-out images at the start model's error rate ``e``
(MNIST: ~9 of 10,000; at least 1).
The test split is never looked at before the artifact is saved, and is then evaluated once,
with the saved artifact itself.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, average_precision_score, precision_recall_curve
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from pipeline import __version__
from pipeline.errors import InputError
from pipeline.logs import get_logger, progress
from pipeline.model import LinearModel, load_model, save_model
from pipeline.parquet import FeatureSet, read_features, read_meta
from pipeline.report import (
    GALLERY_SIZE,
    classification_metrics,
    confusion_figure,
    gallery_figure,
    grid_figure,
    pr_figure,
    write_report,
)
from pipeline.stage import StageResult, library_versions, run_stage
from pipeline.store import open_store, split_arrays

log = get_logger("train")

#: Starting C values of ``--grid auto`` (C is the inverse regularization strength).
DEFAULT_C = (0.003, 0.01, 0.03)
#: The default grid as a mapping (``auto`` marks the self-extending grid).
DEFAULT_GRID: dict[str, Any] = {"C": list(DEFAULT_C), "class_weight": [None], "auto": True}
GRID_KEYS = ("C", "class_weight")
#: ``--grid auto``: factor between an added C and the grid's edge, and most points added.
AUTO_FACTOR = 3.0
AUTO_MAX_EXTRA = 3
#: Grid fits with a larger C start from the solution at this C (see the module docstring).
ANCHOR_C = 0.01
#: Hold-out accuracies closer than this many images are ties (the smaller C wins): the
#: precision of a score converged at tol 1e-4, measured on MNIST as the spread between
#: starts (C=0.03: 0.9904 from zero, 0.9907 from the anchor; C=0.003: 0.9894 vs 0.9897).
HOLDOUT_TIE_IMAGES = 3
#: lbfgs tolerance (projected gradient of the mean loss) of every fit.
DEFAULT_TOL = 1e-4
#: Fitting rows the grid points are fitted on (a seeded subsample; None: all of them).
DEFAULT_SELECTION_SIZE: int | None = 20_000
#: Final fit: lbfgs iterations per round (each round restarts lbfgs's memory: measured on
#: MNIST, rounds of 10 took 33 iterations, of 15 35, one run to tol 27).
FINAL_ROUND = 12
#: BLAS threads of the final fit. Measured on this shared 2-core machine under load: 374 ms
#: per lbfgs iteration with 1 thread, 1810 ms with 2 (two OpenBLAS threads fight the other
#: processes for the cores and spin).
FINAL_BLAS_THREADS = 1


@dataclass(frozen=True)
class GridSpec:
    """The hyper-parameter grid: C values (sorted), class weights, self-extension."""

    C: tuple[float, ...]
    class_weight: tuple[str | None, ...] = (None,)
    auto: bool = False

    @classmethod
    def of(cls, grid: GridSpec | Mapping[str, Any] | None) -> GridSpec:
        """A spec from a spec, a mapping like :data:`DEFAULT_GRID`, or None (the default)."""
        if isinstance(grid, GridSpec):
            return grid
        grid = DEFAULT_GRID if grid is None else grid
        return cls(
            C=tuple(sorted(float(c) for c in grid["C"])),
            class_weight=tuple(grid.get("class_weight") or [None]),
            auto=bool(grid.get("auto", False)),
        )

    def as_params(self) -> dict[str, Any]:
        return {"C": list(self.C), "class_weight": list(self.class_weight), "auto": self.auto}


def parse_grid(spec: str | None) -> GridSpec:
    """Parse ``"C=0.01,0.1;class_weight=none,balanced"``; None or ``"auto"`` gives the
    self-extending default grid."""
    if not spec or spec.strip().lower() == "auto":
        return GridSpec.of(None)
    C: list[float] | None = None
    weights: list[str | None] = [None]
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, _, values = part.partition("=")
        key = key.strip()
        items = [v.strip() for v in values.split(",") if v.strip()]
        if key not in GRID_KEYS or not items:
            raise InputError(f"--grid: expected 'C=v1,v2;class_weight=none,balanced', got {part!r}")
        if key == "C":
            try:
                C = sorted(float(v) for v in items)
            except ValueError:
                raise InputError(f"--grid: expected numbers for C, got {values!r}") from None
            if not all(math.isfinite(c) and c > 0 for c in C):
                raise InputError(f"--grid: expected finite C > 0, got {values.strip()!r}")
        else:
            bad = [v for v in items if v.lower() not in ("none", "balanced")]
            if bad:
                raise InputError(f"--grid: expected class_weight none or balanced, got {bad}")
            weights = [None if v.lower() == "none" else "balanced" for v in items]
    if C is None:
        raise InputError("--grid: expected a C=... entry, got none")
    return GridSpec(C=tuple(dict.fromkeys(C)), class_weight=tuple(dict.fromkeys(weights)))


def _standardize(X: np.ndarray, *, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and standard deviation (float64), two passes over row blocks.

    Blocked so the float64 temporaries stay a few MB instead of a copy of ``X``.
    """
    n = len(X)
    total = np.zeros(X.shape[1])
    for a in range(0, n, block):
        total += X[a : a + block].sum(axis=0, dtype=np.float64)
    mean = total / n
    mean32 = mean.astype(np.float32)
    sq = np.zeros(X.shape[1])
    for a in range(0, n, block):
        d = (X[a : a + block] - mean32).astype(np.float64)
        sq += np.einsum("ij,ij->j", d, d)
    scale = np.sqrt(sq / n)
    scale[scale < 1e-12] = 1.0  # constant features: leave them at zero after centring
    return mean, scale


def _apply_scaler(
    X: np.ndarray, mean: np.ndarray, scale: np.ndarray, *, in_place: bool = False
) -> np.ndarray:
    """``(X - mean) / scale`` in float32; into ``X`` itself when ``in_place``."""
    out = np.subtract(X, mean.astype(np.float32), out=X if in_place else None)
    out /= scale.astype(np.float32)
    return out


def _score(y: np.ndarray, est: LogisticRegression, Z: np.ndarray, binary: bool) -> float:
    if binary:
        return float(average_precision_score(y, est.predict_proba(Z)[:, 1]))
    return float(accuracy_score(y, est.predict(Z)))


@dataclass(frozen=True)
class GridPoint:
    """One grid point's fits, one per fold.

    ``n_iter`` is the largest lbfgs iteration count over the folds, ``fit_seconds`` their sum,
    ``converged`` whether every fold's fit stopped at ``tol`` before ``max_iter``.
    """

    C: float
    class_weight: str | None
    fold_scores: tuple[float, ...]
    n_iter: int
    fit_seconds: float
    converged: bool
    n_val: int = 0  # hold-out accuracy: its images (for the tie margin)

    @property
    def params(self) -> dict[str, Any]:
        return {"C": self.C, "class_weight": self.class_weight}

    @property
    def score(self) -> float:
        return float(np.mean(self.fold_scores))

    @property
    def score_std(self) -> float:
        return float(np.std(self.fold_scores))

    @property
    def score_se(self) -> float:
        """The margin within which another point counts as no worse: over the folds (CV)
        the standard error ``std / sqrt(K)``; on a single hold-out (accuracy) the precision
        of a converged score, :data:`HOLDOUT_TIE_IMAGES` images of ``n_val``; else 0."""
        if len(self.fold_scores) > 1:
            return self.score_std / math.sqrt(len(self.fold_scores))
        if self.n_val:
            return HOLDOUT_TIE_IMAGES / self.n_val
        return 0.0

    def row(self) -> dict[str, Any]:
        """The JSON form of ``metrics.json``'s ``grid`` table."""
        return {
            "params": self.params,
            "score": self.score,
            "score_std": self.score_std,
            "fold_scores": list(self.fold_scores),
            "fit_seconds": round(self.fit_seconds, 3),
            "n_iter": self.n_iter,
            "converged": self.converged,
            "score_se": self.score_se,
        }


@dataclass
class GridResult:
    """What :func:`grid_search` found.

    Attributes
    ----------
    points : list of GridPoint
        Every point fitted, ordered by class weight, then C.
    best : GridPoint
        The chosen point (see ``rule``).
    rule : str
        ``"best score"`` (hold-out) or ``"one standard error"`` (CV).
    extended : list of float
        C values added by the ``auto`` grid, in the order they were added.
    warning : str or None
        Set when the best C is on the edge of the (final) grid.
    start : LogisticRegression
        The chosen point's model fitted on the first fold (the final fit's warm start).
    mean, scale : ndarray, shape (K,), float64
        The first fold's standardization.
    Z_val : ndarray, shape (n_val, K), float32
        The first fold's standardized validation rows; ``y_val`` their labels.
    val_rows : slice or ndarray
        Where those rows are in the training matrix.
    tol : float
        The lbfgs tolerance every point was fitted to.
    subsample : int or None
        Rows each grid fit used when they were a subsample of the fitting rows.
    """

    points: list[GridPoint]
    best: GridPoint
    rule: str
    extended: list[float]
    warning: str | None
    start: LogisticRegression
    mean: np.ndarray
    scale: np.ndarray
    Z_val: np.ndarray
    y_val: np.ndarray
    val_rows: slice | np.ndarray
    tol: float
    subsample: int | None = None

    @property
    def best_params(self) -> dict[str, Any]:
        return self.best.params

    @property
    def table(self) -> list[dict[str, Any]]:
        return [p.row() for p in self.points]


@dataclass
class _Fold:
    Z_fit: np.ndarray
    y_fit: np.ndarray
    Z_val: np.ndarray
    y_val: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    val_rows: slice | np.ndarray
    subsample: bool


def _folds(
    X: np.ndarray,
    y: np.ndarray,
    *,
    validation_size: int,
    cv: int | None,
    seed: int,
    selection_size: int | None,
) -> list[_Fold]:
    """Standardized fitting (possibly subsampled) and validation rows of every fold."""
    n = len(y)
    splits: list[tuple[slice | np.ndarray, slice | np.ndarray]]
    if cv:
        check_cv(y, cv)
        splitter = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
        splits = list(splitter.split(np.zeros(n), y))
    else:
        if not 0 < validation_size < n:
            raise InputError(
                f"--validation-size: expected 0 < size < {n} training images, got {validation_size}"
            )
        # Slices, not index arrays: the fitting rows are then a view of X, not a copy.
        splits = [(slice(0, n - validation_size), slice(n - validation_size, n))]
    rng = np.random.default_rng(seed)
    folds = []
    for fit_rows, val_rows in splits:
        X_fit = X[fit_rows]
        mean, scale = _standardize(X_fit)  # statistics of all fitting rows
        n_fit = len(X_fit)
        if selection_size is not None and selection_size < n_fit:
            # A seeded subsample, sorted so the copy reads X in order.
            pick = np.sort(rng.choice(n_fit, size=selection_size, replace=False))
            rows = np.arange(n)[fit_rows][pick]
            Z_fit = _apply_scaler(X[rows], mean, scale, in_place=True)
        else:
            rows = np.arange(n)[fit_rows]
            # In place when indexing already copied the rows (CV), else one scaled copy.
            Z_fit = _apply_scaler(X_fit, mean, scale, in_place=not np.shares_memory(X_fit, X))
        del X_fit
        Z_val = _apply_scaler(X[val_rows], mean, scale, in_place=isinstance(val_rows, np.ndarray))
        sub = len(rows) < n_fit
        folds.append(_Fold(Z_fit, y[rows], Z_val, y[val_rows], mean, scale, val_rows, sub))
    return folds


@dataclass(frozen=True)
class _Fit:
    score: float
    seconds: float
    n_iter: int
    converged: bool
    estimator: LogisticRegression


def _fit_point(
    fold: _Fold,
    *,
    C: float,
    class_weight: str | None,
    binary: bool,
    max_iter: int,
    tol: float,
    start: LogisticRegression | None = None,
) -> _Fit:
    """One fit to ``tol``: from zero, or warm-started from ``start`` (a fitted model, copied)."""
    if start is None:
        est = LogisticRegression(C=C, class_weight=class_weight, max_iter=max_iter, tol=tol)
    else:
        est = copy.deepcopy(start)
        est.set_params(C=C, class_weight=class_weight, max_iter=max_iter, tol=tol, warm_start=True)
    t0 = time.perf_counter()
    est.fit(fold.Z_fit, fold.y_fit)
    seconds = time.perf_counter() - t0
    est.set_params(warm_start=False)
    n_iter = int(est.n_iter_.max())
    score = _score(fold.y_val, est, fold.Z_val, binary)
    return _Fit(score, seconds, n_iter, n_iter < max_iter, est)


def _blas_threads(jobs: int) -> int:
    """BLAS threads per fit: one. Measured on this shared 2-core machine under load, a
    single fit with 2 OpenBLAS threads ran 4-5x slower per lbfgs iteration than with one
    (20,000 rows: ~690 vs ~150 ms; 60,000: 1810 vs 374 ms): the threads spin against the
    other processes. Parallelism comes from ``jobs`` fits at a time instead."""
    return 1


def _round_c(c: float) -> float:
    return float(f"{c:.3g}")


def _best_raw(points: Sequence[GridPoint]) -> GridPoint:
    """Highest mean score; ties keep the smaller C (stronger regularization)."""
    best = points[0]
    for p in points[1:]:
        if p.score > best.score or (p.score == best.score and p.C < best.C):
            best = p
    return best


def _one_standard_error(points: Sequence[GridPoint]) -> GridPoint:
    """The smallest C within one standard error of the best mean score."""
    top = _best_raw(points)
    ok = [p for p in points if p.score >= top.score - top.score_se]
    return min(ok, key=lambda p: p.C)  # min() keeps the first of equal C: grid weight order


def grid_search(
    X: np.ndarray,
    y: np.ndarray,
    *,
    grid: GridSpec | Mapping[str, Any] | None,
    validation_size: int,
    cv: int | None,
    seed: int,
    binary: bool,
    max_iter: int,
    tol: float,
    selection_size: int | None = None,
    jobs: int = 1,
) -> GridResult:
    """Score every grid point on held-out data (see the module docstring); ``X`` holds raw
    features, shape (n, K) float32, ``y`` labels (n,). ``X`` is not modified."""
    spec = GridSpec.of(grid)
    folds = _folds(
        X, y, validation_size=validation_size, cv=cv, seed=seed, selection_size=selection_size
    )
    k = len(folds)
    # Hold-out accuracy: ties within HOLDOUT_TIE_IMAGES; average precision: plain best.
    n_val = len(folds[0].y_val) if k == 1 and not binary else 0
    rule = (
        "one standard error"
        if k > 1
        else "best score"
        if binary
        else f"best score, ties within {HOLDOUT_TIE_IMAGES} hold-out images"
    )
    Cs = list(spec.C)
    extended: list[float] = []
    fits: dict[tuple[str | None, float], list[_Fit | None]] = {}
    anchors: dict[tuple[str | None, int], _Fit] = {}
    pending = [(w, c) for w in spec.class_weight for c in Cs]
    metric = "average precision" if binary else "accuracy"
    while pending:
        tasks = [(key, f) for key in pending for f in range(k)]
        for key in pending:
            fits[key] = [None] * k
        _run_fits(tasks, folds, fits, anchors, binary=binary, max_iter=max_iter, tol=tol, jobs=jobs)
        points = _points(fits, spec.class_weight, n_val=n_val)
        if k > 1:
            for key in pending:
                p = next(q for q in points if (q.class_weight, q.C) == key)
                log.info(
                    "C=%g class_weight=%s: validation %s %.4f ± %.4f over %d folds",
                    p.C, p.class_weight, metric, p.score, p.score_std, k,
                    extra={"data": p.row()},
                )  # fmt: skip
        pending = []
        top = _one_standard_error(points)
        if spec.auto and len(Cs) > 1 and len(extended) < AUTO_MAX_EXTRA:
            new = None
            if max(Cs) == top.C:
                new = _round_c(max(Cs) * AUTO_FACTOR)
            elif min(Cs) == top.C:
                new = _round_c(min(Cs) / AUTO_FACTOR)
            if new is not None:
                log.info(
                    "grid auto: best C=%g is on the edge of %s; adding C=%g",
                    top.C, sorted(Cs), new,
                )  # fmt: skip
                Cs.append(new)
                extended.append(new)
                pending = [(w, new) for w in spec.class_weight]
    points = _points(fits, spec.class_weight, n_val=n_val)
    top = _one_standard_error(points)
    warning = None
    if len(Cs) > 1 and top.C in (min(Cs), max(Cs)):
        side = "largest" if max(Cs) == top.C else "smallest"
        warning = (
            f"best C={top.C:g} is the {side} of the grid {sorted(Cs)}: the optimum may lie "
            f"beyond it" + (f" (auto stopped after {AUTO_MAX_EXTRA} extra points)" if spec.auto else
                            "; extend --grid or use --grid auto")
        )  # fmt: skip
        log.warning("%s", warning)
    best = _one_standard_error(points)
    start = fits[(best.class_weight, best.C)][0]
    assert start is not None
    f0 = folds[0]
    log.info(
        "selected C=%g class_weight=%s (%s%s)",
        best.C, best.class_weight, rule,
        f", extended by {extended}" if extended else "",
    )  # fmt: skip
    return GridResult(
        points=points,
        best=best,
        rule=rule,
        extended=extended,
        warning=warning,
        start=start.estimator,
        mean=f0.mean,
        scale=f0.scale,
        Z_val=f0.Z_val,
        y_val=f0.y_val,
        val_rows=f0.val_rows,
        tol=tol,
        subsample=len(f0.y_fit) if f0.subsample else None,
    )


def _points(
    fits: Mapping[tuple[str | None, float], Sequence[_Fit | None]],
    weights: Sequence[str | None],
    *,
    n_val: int = 0,
) -> list[GridPoint]:
    out = []
    for (w, c), per_fold in sorted(
        fits.items(), key=lambda kv: (weights.index(kv[0][0]), kv[0][1])
    ):
        done = [f for f in per_fold if f is not None]
        assert len(done) == len(per_fold)
        out.append(
            GridPoint(
                C=c,
                class_weight=w,
                fold_scores=tuple(f.score for f in done),
                n_iter=max(f.n_iter for f in done),
                fit_seconds=sum(f.seconds for f in done),
                converged=all(f.converged for f in done),
                n_val=n_val if len(done) == 1 else 0,
            )
        )
    return out


Task = tuple[tuple[str | None, float], int]  # ((class_weight, C), fold)


def _run_fits(
    tasks: Sequence[Task],
    folds: Sequence[_Fold],
    fits: dict[tuple[str | None, float], list[_Fit | None]],
    anchors: dict[tuple[str | None, int], _Fit],
    *,
    binary: bool,
    max_iter: int,
    tol: float,
    jobs: int,
) -> None:
    """Fit ``tasks`` in ``jobs`` threads into ``fits``; log each as it ends.

    C <= ANCHOR_C: from zero. C > ANCHOR_C: from the anchor, the cold fit at ANCHOR_C of
    the same fold and class weight (kept in ``anchors``; fitted here when missing). A warm
    fit starts as soon as its anchor is done.
    """
    k = len(folds)
    metric = "average precision" if binary else "accuracy"
    cold = [t for t in tasks if t[0][1] <= ANCHOR_C]
    warm = [t for t in tasks if t[0][1] > ANCHOR_C]
    point_keys = set(cold)
    extra = sorted(
        {((t[0][0], ANCHOR_C), t[1]) for t in warm if (t[0][0], t[1]) not in anchors} - point_keys,
        key=lambda t: (str(t[0][0]), t[1]),
    )

    def run(task: Task) -> _Fit:
        (w, c), f = task
        start = anchors[(w, f)].estimator if c > ANCHOR_C else None
        return _fit_point(
            folds[f], C=c, class_weight=w, binary=binary, max_iter=max_iter, tol=tol, start=start
        )

    def done(task: Task, r: _Fit, advance: Callable[[int], None]) -> None:
        (w, c), f = task
        if c == ANCHOR_C:
            anchors[(w, f)] = r
        if task not in point_keys and task not in warm:
            log.info("anchor fit C=%g class_weight=%s: %d iterations, %.1f s",
                     c, w, r.n_iter, r.seconds)  # fmt: skip
            return
        fits[(w, c)][f] = r
        log.info(
            "fit C=%g class_weight=%s%s: validation %s %.4f, %d iterations%s, %.1f s",
            c, w, f" fold {f + 1}/{k}" if k > 1 else "", metric, r.score, r.n_iter,
            "" if r.converged else " (max_iter reached)", r.seconds,
            extra={"data": {"C": c, "class_weight": w, "fold": f, "score": r.score,
                            "n_iter": r.n_iter, "seconds": round(r.seconds, 3)}},
        )  # fmt: skip
        advance(1)

    jobs = max(1, min(jobs, len(tasks) + len(extra)))
    # numpy's BLAS calls release the GIL: threads share the matrices without copies, and one
    # BLAS thread per fit keeps two fits from oversubscribing two cores.
    with (
        warnings.catch_warnings(),
        threadpool_limits(limits=_blas_threads(jobs), user_api="blas"),
        progress(log, "grid search", total=len(tasks), unit="fits") as advance,
    ):
        warnings.simplefilter("ignore", ConvergenceWarning)
        if jobs == 1:
            for t in [*cold, *extra, *warm]:
                done(t, run(t), advance)
            return
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="fit") as pool:
            running: dict[Future[_Fit], Task] = {pool.submit(run, t): t for t in [*cold, *extra]}
            waiting = list(warm)
            while running or waiting:
                for t in [t for t in waiting if (t[0][0], t[1]) in anchors]:
                    waiting.remove(t)
                    running[pool.submit(run, t)] = t
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    done(running.pop(fut), fut.result(), advance)


@dataclass(frozen=True)
class FinalFit:
    """The final model and how it got there: lbfgs iterations per round and hold-out
    predictions that changed in each round."""

    estimator: LogisticRegression
    n_iter: int
    rounds: list[int]
    changed: list[int]
    resolution: int
    converged: bool
    seconds: float


def fit_final(
    Z: np.ndarray,
    y: np.ndarray,
    *,
    start: LogisticRegression,
    check_rows: slice | np.ndarray,
    max_iter: int,
    tol: float,
    check_labels: np.ndarray,
    round_iter: int = FINAL_ROUND,
    resolution: int | None = None,
) -> FinalFit:
    """Refit ``start`` (a fitted model, copied) on standardized ``Z`` (n, K), warm-started,
    in rounds of ``round_iter`` lbfgs iterations until lbfgs converges at ``tol``, a round
    changes fewer than ``resolution`` predictions on the hold-out rows ``Z[check_rows]``
    (labels ``check_labels``; default: their standard error in images, see the module
    docstring), or ``max_iter`` iterations in all."""
    t0 = time.perf_counter()
    est = copy.deepcopy(start)
    Z_check = Z[check_rows]
    prev = est.predict(Z_check)
    if resolution is None:
        e = float(np.mean(prev != check_labels))
        resolution = max(1, math.ceil(math.sqrt(len(prev) * e * (1 - e))))
    rounds: list[int] = []
    changed: list[int] = []
    converged = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        while sum(rounds) < max_iter:
            # Two rounds of round_iter, then doubling: each round restarts lbfgs's memory,
            # which slow problems (Fashion-MNIST: 228 iterations in rounds of 12) pay for.
            size = round_iter * 2 ** max(0, len(rounds) - 1)
            limit = min(size, max_iter - sum(rounds))
            est.set_params(warm_start=True, max_iter=limit, tol=tol)
            est.fit(Z, y)
            it = int(est.n_iter_.max())
            pred = est.predict(Z_check)
            rounds.append(it)
            changed.append(int(np.count_nonzero(pred != prev)))
            prev = pred
            log.info(
                "final fit round %d: %d iterations, %d hold-out predictions changed",
                len(rounds), it, changed[-1],
                extra={"data": {"round": len(rounds), "n_iter": it, "changed": changed[-1]}},
            )  # fmt: skip
            if it < limit or changed[-1] < resolution:
                converged = True
                break
    est.set_params(warm_start=False, max_iter=max_iter)
    return FinalFit(
        est, sum(rounds), rounds, changed, resolution, converged, time.perf_counter() - t0
    )


def check_cv(y: np.ndarray, cv: int) -> None:
    """Stratified K-fold needs every class at least ``cv`` times."""
    counts = np.unique(y, return_counts=True)[1]
    if cv > counts.min():
        raise InputError(
            f"--cv: expected at most {counts.min()} folds (the smallest class has "
            f"{counts.min()} training images), got {cv}"
        )


def _best_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Decision threshold maximizing F1 on held-out probabilities."""
    prec, rec, thr = precision_recall_curve(y, p)
    f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
    return float(thr[int(np.argmax(f1))]) if len(thr) else 0.5


@dataclass(frozen=True)
class Evaluation:
    """Test-split predictions of a model. Indices are into the model's class order."""

    metrics: dict[str, Any]
    proba: np.ndarray
    pred_idx: np.ndarray
    true_idx: np.ndarray
    names: list[str]
    worst: np.ndarray  # most confident mistakes, most confident first


def evaluate(model: LinearModel, X: np.ndarray, y: np.ndarray) -> Evaluation:
    """Predict ``X`` (n, K) raw features with ``model``; ``y`` (n,) are class labels
    (binary mode: 0/1 for not / is the positive class)."""
    binary = model.mode == "binary"
    labels = [int(c) for c in model.classes]
    proba = model.predict_proba(X)
    pred = model.predict(X)
    pred_idx = pred if binary else np.searchsorted(model.classes, pred)
    true_idx = y if binary else np.searchsorted(model.classes, y)
    metrics = classification_metrics(true_idx, proba, labels=labels, y_pred=pred_idx)
    pc = model.positive_class
    names = [f"not {pc}", str(pc)] if binary else [str(c) for c in labels]
    wrong = np.flatnonzero(pred_idx != true_idx)
    confidence = proba[wrong, pred_idx[wrong]]
    worst = wrong[np.argsort(-confidence, kind="stable")[:GALLERY_SIZE]]
    return Evaluation(metrics, proba, pred_idx, true_idx, names, worst)


def render_figures(
    ev: Evaluation,
    *,
    grid: Sequence[Mapping[str, Any]],
    binary: bool,
    gallery: Callable[[np.ndarray], np.ndarray] | None,
    image_ids: np.ndarray,
) -> dict[str, bytes]:
    """The report's PNG figures. ``gallery(rows)`` returns the test images of ``rows``
    (None: no mistakes gallery); ``image_ids`` (n,) are the test rows' ids."""
    tm = ev.metrics
    mark = (tm["per_class"]["1"]["recall"], tm["per_class"]["1"]["precision"]) if binary else None
    figures = {
        "confusion_matrix": confusion_figure(np.array(tm["confusion_matrix"]), ev.names),
        "precision_recall": pr_figure(ev.true_idx, ev.proba, ev.names, mark=mark),
        "grid_search": grid_figure(grid, metric="average precision" if binary else "accuracy"),
    }
    w = ev.worst
    if len(w) and gallery is not None:
        figures["mistakes"] = gallery_figure(
            gallery(image_ids[w]),
            true=[ev.names[i] for i in ev.true_idx[w]],
            predicted=[ev.names[i] for i in ev.pred_idx[w]],
            probability=[float(p) for p in ev.proba[w, ev.pred_idx[w]]],
            image_ids=[int(i) for i in image_ids[w]],
        )
    return figures


def _gallery_images(store: Path, image_ids: np.ndarray) -> np.ndarray:
    images, _labels = split_arrays(open_store(store), "test")
    order = np.argsort(image_ids)
    picked = images.get_orthogonal_selection((image_ids[order],))
    out = np.empty_like(picked)
    out[order] = picked
    return np.asarray(out)


def build_model(
    out: Path,
    *,
    features: Path,
    store: Path,
    grid: GridSpec | Mapping[str, Any] | None,
    validation_size: int,
    cv: int | None,
    positive_class: int | None,
    seed: int,
    max_iter: int,
    tol: float,
    selection_size: int | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Read, select, refit, save the artifact, evaluate and report into ``out``."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    meta = read_meta(features)
    config_hash = meta["config_hash"]
    train_set = read_features(features, split="train", expected_hash=config_hash)
    test: FeatureSet = read_features(features, split="test", expected_hash=config_hash)
    timings["read features"] = time.perf_counter() - t
    num_classes = int(meta.get("num_classes") or (int(train_set.y.max()) + 1))
    binary = positive_class is not None
    if binary and not 0 <= positive_class < num_classes:  # type: ignore[operator]
        raise InputError(
            f"--positive-class: expected a class in [0, {num_classes - 1}], got {positive_class}"
        )
    y_train = (train_set.y == positive_class).astype(np.int64) if binary else train_set.y
    y_test = (test.y == positive_class).astype(np.int64) if binary else test.y
    if len(np.unique(y_train)) < 2:
        raise InputError(
            f"expected at least 2 classes in the training labels, got {np.unique(y_train)}"
        )
    if cv:
        check_cv(y_train, cv)

    t = time.perf_counter()
    result = grid_search(
        train_set.X, y_train, grid=grid, validation_size=validation_size, cv=cv, seed=seed,
        binary=binary, max_iter=max_iter, tol=tol, selection_size=selection_size, jobs=jobs,
    )  # fmt: skip
    timings["select"] = time.perf_counter() - t
    threshold = 0.5
    if binary:
        threshold = _best_threshold(result.y_val, result.start.predict_proba(result.Z_val)[:, 1])

    t = time.perf_counter()
    # Hold-out: the fitting rows' standardization, the coordinates of the warm start. CV:
    # all training rows'. In place: the raw training matrix is not needed any more.
    mean, scale = (result.mean, result.scale) if not cv else _standardize(train_set.X)
    Z = _apply_scaler(train_set.X, mean, scale, in_place=True)
    del train_set
    timings["standardize"] = time.perf_counter() - t
    with threadpool_limits(limits=FINAL_BLAS_THREADS, user_api="blas"):
        final = fit_final(
            Z, y_train, start=result.start, check_rows=result.val_rows,
            check_labels=y_train[result.val_rows], max_iter=max_iter, tol=tol,
        )  # fmt: skip
    timings["final fit"] = final.seconds
    log.info(
        "final fit: C=%g, %d iterations in %d rounds (%s), %.1f s",
        result.best.C, final.n_iter, len(final.rounds),
        "converged" if final.converged else "max_iter reached", final.seconds,
    )  # fmt: skip
    del Z

    est = final.estimator
    labels = [0, 1] if binary else [int(c) for c in est.classes_]
    selection = f"{cv}-fold CV" if cv else f"hold-out of last {validation_size}"
    if result.subsample:
        selection += f", grid fitted on a subsample of {result.subsample} rows"
    model = LinearModel(
        mean=mean,
        scale=scale,
        coef=est.coef_.astype(np.float64),
        intercept=est.intercept_.astype(np.float64),
        classes=np.asarray(labels, np.int64),
        mode="binary" if binary else "multiclass",
        threshold=threshold,
        positive_class=positive_class,
        meta={
            "feature_config": meta["config"],
            "feature_config_hash": config_hash,
            "image_shape": meta.get("image_shape"),
            "best_params": result.best_params,
            "selection": selection,
            "selection_rule": result.rule,
            "n_train": len(y_train),
            "refit_iterations": final.n_iter,
            "tol": tol,
            "seed": seed,
            "versions": library_versions(),
            "pipeline_version": __version__,
        },
    )
    save_model(model, out)

    t = time.perf_counter()
    ev = evaluate(load_model(out), test.X, y_test)  # evaluate exactly what was saved
    timings["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    figures = render_figures(
        ev,
        grid=result.table,
        binary=binary,
        gallery=lambda ids: _gallery_images(store, ids),
        image_ids=test.image_id,
    )
    timings["report"] = time.perf_counter() - t
    metrics = {
        "mode": model.mode,
        "positive_class": positive_class,
        "threshold": threshold,
        "accuracy": ev.metrics["accuracy"],
        "test": ev.metrics,
        "grid": result.table,
        "grid_extended": result.extended,
        "grid_warning": result.warning,
        "best_params": result.best_params,
        "selection": selection,
        "selection_rule": result.rule,
        "selection_metric": "average precision" if binary else "accuracy",
        "validation_score": result.best.score,
        "tol": tol,
        "final_fit": {
            "n_iter": final.n_iter,
            "rounds": final.rounds,
            "holdout_changed": final.changed,
            "holdout_resolution": final.resolution,
            "converged": final.converged,
        },
        "n_features": model.n_features,
        "n_train": len(y_train),
        "feature_config_hash": config_hash,
        "mistakes": [
            {
                "image_id": int(test.image_id[i]),
                "true": ev.names[ev.true_idx[i]],
                "predicted": ev.names[ev.pred_idx[i]],
                "probability": float(ev.proba[i, ev.pred_idx[i]]),
            }
            for i in ev.worst
        ],
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_report(out, metrics=metrics, figures=figures)
    return {
        "accuracy": metrics["accuracy"],
        "best_params": result.best_params,
        "validation_score": result.best.score,
        "grid": result.table,
        "grid_warning": result.warning,
        "selection_rule": result.rule,
        "final_iterations": final.n_iter,
        "threshold": threshold,
        "timings": metrics["timings"],
        "n_features": model.n_features,
    }


def check_store(store: Path, meta: Mapping[str, Any]) -> None:
    """Refuse a ``--store`` other than the one the features were made from: its recorded
    sources (file checksums) must equal the features' ``store_sources``."""
    recorded = meta.get("store_sources")
    if recorded is None:
        return  # features from before the store's identity was recorded
    got = open_store(store).attrs.get("sources")
    if got != recorded:
        raise InputError(
            f"--store: expected the store the features were made from ({meta.get('store')}), "
            f"got {store} (other source files)"
        )


def train(
    *,
    features: Path,
    out: Path,
    store: Path | None = None,
    grid: GridSpec | Mapping[str, Any] | None = None,
    validation_size: int = 10_000,
    cv: int | None = None,
    positive_class: int | None = None,
    seed: int = 0,
    max_iter: int = 500,
    tol: float = DEFAULT_TOL,
    selection_size: int | None = DEFAULT_SELECTION_SIZE,
    jobs: int | None = None,
    force: bool = False,
    lock_timeout: float = 60.0,
) -> StageResult:
    """The ``train`` stage (see the module docstring). ``store`` defaults to the one the
    features were made from; it supplies the pictures of the mistakes. ``jobs``: fits in
    parallel (default: one per CPU)."""
    if not (math.isfinite(tol) and tol > 0):
        raise InputError(f"--tol: expected a finite number > 0, got {tol}")
    if seed < 0:
        raise InputError(f"--seed: expected an integer >= 0, got {seed}")
    if cv is not None and cv < 2:
        raise InputError(f"--cv: expected at least 2 folds, got {cv}")
    if selection_size is not None and selection_size < 1:
        raise InputError(f"--selection-size: expected at least 1 row, got {selection_size}")
    meta = read_meta(features)
    if store is not None:
        check_store(Path(store), meta)
    store = Path(store or meta.get("store") or "data/mnist.zarr")
    spec = GridSpec.of(grid)
    jobs = jobs or os.cpu_count() or 1
    params = {
        "grid": spec.as_params(),
        "validation_size": validation_size,
        "cv": cv,
        "positive_class": positive_class,
        "seed": seed,
        "max_iter": max_iter,
        "tol": tol,
        "selection_size": selection_size,
    }
    return run_stage(
        "train",
        output=out,
        inputs={"features": features, "store": store},
        params=params,
        force=force,
        lock_timeout=lock_timeout,
        build=lambda tmp: build_model(
            tmp,
            features=features,
            store=store,
            grid=spec,
            validation_size=validation_size,
            cv=cv,
            positive_class=positive_class,
            seed=seed,
            max_iter=max_iter,
            tol=tol,
            selection_size=selection_size,
            jobs=jobs,
        ),
    )
