"""The train stage: grid search, binary mode, artifact, reports; and real MNIST accuracy."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FeatureFixture
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.errors import InputError
from pipeline.model import load_model
from pipeline.parquet import read_features
from pipeline.train import (
    AUTO_MAX_EXTRA,
    DEFAULT_C,
    HOLDOUT_TIE_IMAGES,
    GridPoint,
    GridSpec,
    _one_standard_error,
    fit_final,
    grid_search,
    parse_grid,
    train,
)

SMALL_GRID = {"C": [0.01, 1.0], "class_weight": [None]}


def test_multiclass_on_learnable_data(learnable_features: FeatureFixture, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = train(
        features=learnable_features.features, out=out, grid=SMALL_GRID, validation_size=100
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.98
    assert result.result["accuracy"] == metrics["accuracy"]
    assert [g["params"]["C"] for g in metrics["grid"]] == [0.01, 1.0]
    assert sum(v["support"] for v in metrics["test"]["per_class"].values()) == 100
    cm = np.array(metrics["test"]["confusion_matrix"])
    assert cm.sum() == 100 and np.trace(cm) / 100 == pytest.approx(metrics["accuracy"])
    # The artifact predicts what the report says.
    test = read_features(learnable_features.features, split="test")
    model = load_model(out)
    assert np.mean(model.predict(test.X) == test.y) == pytest.approx(metrics["accuracy"])
    assert model.feature_config_hash == learnable_features.config.hash  # type: ignore[attr-defined]


def test_report_embeds_real_figures_and_agrees_with_metrics(
    learnable_features: FeatureFixture, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    train(features=learnable_features.features, out=out, grid=SMALL_GRID, validation_size=100)
    metrics = json.loads((out / "metrics.json").read_text())
    html = (out / "report.html").read_text()
    figures = sorted(p.stem for p in (out / "figures").glob("*.png"))
    assert {"confusion_matrix", "precision_recall", "grid_search"} <= set(figures)
    embedded = re.findall(
        r'<img alt="([a-z_]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html
    )
    assert sorted(name for name, _ in embedded) == figures
    for _, data in embedded:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{metrics['accuracy']:.4%}" in html
    assert f"{metrics['accuracy']:.4%}" in (out / "report.md").read_text()
    for name in figures:
        assert f"figures/{name}.png" in (out / "report.md").read_text()


def test_mistake_gallery_when_there_are_mistakes(
    learnable_features: FeatureFixture, tmp_path: Path
) -> None:
    # A strongly regularized model on few features makes mistakes to show.
    out = tmp_path / "model"
    train(features=learnable_features.features, out=out, grid={"C": [1e-5]}, validation_size=100)
    metrics = json.loads((out / "metrics.json").read_text())
    if metrics["accuracy"] == 1.0:
        pytest.skip("no mistakes to show")
    assert (out / "figures" / "mistakes.png").is_file()
    probs = [m["probability"] for m in metrics["mistakes"]]
    assert probs == sorted(probs, reverse=True)


def test_binary_mode_precision_recall_and_threshold(
    learnable_features: FeatureFixture, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    train(
        features=learnable_features.features,
        out=out,
        grid=SMALL_GRID,
        validation_size=100,
        positive_class=3,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    positive = metrics["test"]["per_class"]["1"]
    assert positive["precision"] >= 0.95 and positive["recall"] >= 0.95
    assert 0.0 < metrics["threshold"] < 1.0
    model = load_model(out)
    assert model.mode == "binary" and model.positive_class == 3
    test = read_features(learnable_features.features, split="test")
    assert np.mean(model.predict(test.X) == (test.y == 3)) == pytest.approx(metrics["accuracy"])


def test_cv_mode_and_determinism(learnable_features: FeatureFixture, tmp_path: Path) -> None:
    a = train(
        features=learnable_features.features, out=tmp_path / "a", grid=SMALL_GRID, cv=3, seed=1
    )
    b = train(
        features=learnable_features.features, out=tmp_path / "b", grid=SMALL_GRID, cv=3, seed=1
    )
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert [g["score"] for g in ma["grid"]] == [g["score"] for g in mb["grid"]]
    assert ma["selection"] == "3-fold CV"
    assert (tmp_path / "a" / "model.npz").read_bytes() == (
        tmp_path / "b" / "model.npz"
    ).read_bytes()
    assert not a.skipped and not b.skipped
    again = train(
        features=learnable_features.features, out=tmp_path / "a", grid=SMALL_GRID, cv=3, seed=1
    )
    assert again.skipped


@pytest.mark.parametrize("cv", [None, 3])
def test_grid_search_scales_each_fold_with_its_fitting_rows_only(cv: int | None) -> None:
    rng = np.random.default_rng(0)
    n, k = 300, 5
    y = np.arange(n) % 3
    X = (rng.standard_normal((n, k)) + y[:, None]).astype(np.float32)
    X[-60:, 0] += 100.0  # the hold-out rows differ wildly in feature 0
    result = grid_search(
        X, y, grid={"C": [1.0]}, validation_size=60, cv=cv, seed=0, binary=False,
        max_iter=200, tol=1e-4,
    )  # fmt: skip
    Z_val, y_val = result.Z_val, result.y_val
    if cv is None:
        fit, val = X[:-60], X[-60:]
        want = (val - fit.mean(axis=0)) / fit.std(axis=0)
        np.testing.assert_allclose(Z_val, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(y_val, y[-60:])
        assert Z_val[:, 0].mean() > 50  # scaled with the fitting rows' spread only
    else:
        assert len(Z_val) == len(y_val) == n // cv


def test_parse_grid() -> None:
    assert parse_grid(None) == parse_grid("auto") == GridSpec(C=DEFAULT_C, auto=True)
    assert parse_grid("C=0.1,0.01;class_weight=none,balanced") == GridSpec(
        C=(0.01, 0.1), class_weight=(None, "balanced"), auto=False
    )
    for bad in ("C=", "gamma=1", "C=a", "C=-1", "C=nan", "C=0.1,inf", "class_weight=heavy",
                "class_weight=none"):  # fmt: skip
        with pytest.raises(InputError, match="expected"):
            parse_grid(bad)


def test_cli_errors_are_one_line(tmp_path: Path, learnable_features: FeatureFixture) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--features", str(tmp_path / "none")])
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output
    res = runner.invoke(
        app,
        [
            "train",
            "--features",
            str(learnable_features.features),
            "--out",
            str(tmp_path / "m"),
            "--grid",
            "C=oops",
        ],
    )
    assert res.exit_code == 2 and "expected numbers for C" in res.output
    res = runner.invoke(
        app,
        [
            "train",
            "--features",
            str(learnable_features.features),
            "--out",
            str(tmp_path / "m"),
            "--positive-class",
            "12",
            "--grid",
            "C=1",
            "--validation-size",
            "100",
        ],
    )
    assert res.exit_code == 2 and "expected a class in [0, 9]" in res.output
    assert not (tmp_path / "m").exists()


@pytest.mark.mnist
@pytest.mark.slow
def test_real_mnist_accuracy(real_pipeline: dict[str, Path]) -> None:
    metrics = json.loads((real_pipeline["model"] / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.990
    assert metrics["test"]["n"] == 10_000 and metrics["n_train"] == 60_000
    assert len(metrics["mistakes"]) == 36


def correlated_problem(n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes told apart only by x1 - x2 while x1, x2 share a large common noise:
    strong L2 shrinks towards the class-mean direction (x1 alone, poor), weak L2 finds x1 - x2
    (nearly separable), so the validation accuracy keeps rising with C far beyond 0.03."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    z = rng.standard_normal(n)
    x1 = z + 0.1 * (2 * y - 1) + 0.02 * rng.standard_normal(n)
    x2 = z + 0.02 * rng.standard_normal(n)
    noise = rng.standard_normal((n, 3))
    return np.column_stack([x1, x2, noise]).astype(np.float32), y


def test_grid_scores_do_not_depend_on_the_rest_of_the_grid_or_its_order() -> None:
    X, y = correlated_problem(1200)
    kw = dict(validation_size=400, cv=None, seed=0, binary=False, max_iter=500, tol=1e-6)
    alone = grid_search(X, y, grid={"C": [0.1]}, **kw)  # type: ignore[arg-type]
    within = grid_search(X, y, grid={"C": [3.0, 0.1, 0.003, 0.03]}, jobs=2, **kw)  # type: ignore[arg-type]
    point = next(p for p in within.points if p.C == 0.1)
    # Every fit starts from zero and runs to tol: the same fit, whatever else is in the grid.
    assert point.fold_scores == alone.points[0].fold_scores
    assert point.converged and alone.points[0].converged
    assert [p.C for p in within.points] == [0.003, 0.03, 0.1, 3.0]
    # And the scores differ along the grid, so the comparison above is not trivial.
    assert len({p.score for p in within.points}) > 1
    # The selected model is the converged solution of its C (to tol), not a path artefact.
    best = within.best
    again = grid_search(X, y, grid={"C": [best.C]}, **kw)  # type: ignore[arg-type]
    np.testing.assert_allclose(within.start.coef_, again.start.coef_, rtol=0, atol=1e-6)


def test_auto_grid_extends_towards_an_optimum_outside_the_initial_grid() -> None:
    X, y = correlated_problem(1200)
    kw = dict(validation_size=400, cv=None, seed=0, binary=False, max_iter=500, tol=1e-6)
    fixed = grid_search(X, y, grid={"C": list(DEFAULT_C)}, **kw)  # type: ignore[arg-type]
    assert max(DEFAULT_C) == fixed.best.C  # the optimum lies beyond the initial grid
    assert fixed.warning is not None and "largest" in fixed.warning and not fixed.extended
    auto = grid_search(X, y, grid=None, **kw)  # type: ignore[arg-type]
    assert auto.extended and auto.extended == sorted(auto.extended)  # upwards only
    assert auto.extended[0] == pytest.approx(max(DEFAULT_C) * 3)
    assert len(auto.extended) <= AUTO_MAX_EXTRA
    assert auto.best.score > fixed.best.score and max(DEFAULT_C) < auto.best.C
    Cs = [p.C for p in auto.points]
    if max(Cs) > auto.best.C:
        assert auto.warning is None  # interior: extension stopped there
    else:
        assert len(auto.extended) == AUTO_MAX_EXTRA and "auto stopped" in str(auto.warning)
    # The one-standard-error rule (binomial on the hold-out) chose within the noise of the top.
    top = max(auto.points, key=lambda p: p.score)
    assert auto.rule.startswith("best score, ties within")
    assert auto.best.score >= top.score - top.score_se and auto.best.C <= top.C


def test_one_standard_error_rule_prefers_the_simpler_model_within_the_noise() -> None:
    def pt(C: float, *scores: float) -> GridPoint:
        return GridPoint(C=C, class_weight=None, fold_scores=scores, n_iter=1, fit_seconds=0,
                         converged=True)  # fmt: skip

    points = [pt(0.01, 0.90, 0.92, 0.94), pt(0.1, 0.93, 0.95, 0.97), pt(1.0, 0.95, 0.95, 0.95)]
    # best mean 0.95 (C=0.1 and C=1: ties keep the smaller C); its SE = 0.0163/sqrt(3)=0.0094
    assert _one_standard_error(points).C == 0.1
    points[0] = pt(0.01, 0.94, 0.945, 0.95)  # mean 0.945 >= 0.95 - 0.0094
    assert _one_standard_error(points).C == 0.01
    # A single hold-out of 10,000 images: one image better is a tie (margin 3 images).
    hold = [
        GridPoint(C=c, class_weight=None, fold_scores=(s,), n_iter=1, fit_seconds=0,
                  converged=True, n_val=10_000)
        for c, s in ((0.003, 0.9894), (0.01, 0.9906), (0.03, 0.9907))
    ]  # fmt: skip
    assert hold[2].score_se == pytest.approx(HOLDOUT_TIE_IMAGES / 10_000)
    assert _one_standard_error(hold).C == 0.01  # one image better is no better
    hold[2] = GridPoint(C=0.03, class_weight=None, fold_scores=(0.9936,), n_iter=1,
                        fit_seconds=0, converged=True, n_val=10_000)  # fmt: skip
    assert _one_standard_error(hold).C == 0.03  # 30 images better is better


def test_cv_reports_mean_and_spread_and_applies_the_rule(
    learnable_features: FeatureFixture, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    logging.getLogger("mnist_pipeline").propagate = True
    with caplog.at_level(logging.INFO, logger="mnist_pipeline"):
        train(features=learnable_features.features, out=tmp_path / "m",
              grid={"C": [1e-4, 0.01, 1.0]}, cv=3, seed=2)  # fmt: skip
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["selection_rule"] == "one standard error"
    for row in metrics["grid"]:
        assert len(row["fold_scores"]) == 3
        assert row["score"] == pytest.approx(np.mean(row["fold_scores"]))
        assert row["score_std"] == pytest.approx(np.std(row["fold_scores"]))
    # Distinct messages: in the whole suite a record can reach caplog twice (a handler
    # another module's test left on the root logger); each grid point reports once.
    spread_lines = sorted({r.getMessage() for r in caplog.records if "±" in r.getMessage()})
    assert len(spread_lines) == 3 and all("over 3 folds" in m for m in spread_lines)
    html = (tmp_path / "m" / "report.html").read_text()
    assert "± std" in html and f"{metrics['grid'][0]['score_std']:.4f}" in html


def test_progress_lines_appear_as_each_fit_finishes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each fit's log line is emitted as the fit ends, not when the whole grid is done."""
    import logging

    import pipeline.train as tr

    events: list[tuple[str, float]] = []
    real = tr._fit_point

    def timed(*args: Any, **kwargs: Any) -> Any:
        events.append(("start", time.perf_counter()))
        out = real(*args, **kwargs)
        events.append(("end", time.perf_counter()))
        return out

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("fit C="):
                events.append(("line", time.perf_counter()))

    monkeypatch.setattr(tr, "_fit_point", timed)
    handler = Capture()
    logger = logging.getLogger("mnist_pipeline")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        X, y = correlated_problem(600)
        grid_search(X, y, grid={"C": [0.01, 0.1, 1.0]}, validation_size=200, cv=None, seed=0,
                    binary=False, max_iter=200, tol=1e-4, jobs=1)  # fmt: skip
    finally:
        logger.removeHandler(handler)
    kinds = [k for k, _ in events]
    assert kinds.count("line") == kinds.count("end") == 3
    last_end = len(kinds) - 1 - kinds[::-1].index("end")
    assert kinds[:last_end].count("line") == 2  # two lines out before the last fit ended
    assert kinds == ["start", "end", "line"] * 3  # jobs=1: in order, one line per fit


def test_final_fit_is_warm_started_and_stops_on_the_holdout() -> None:
    from sklearn.linear_model import LogisticRegression

    X, y = correlated_problem(1200)
    Z = (X - X.mean(0)) / X.std(0)
    start = LogisticRegression(C=1.0, max_iter=500, tol=1e-8).fit(Z[:800], y[:800])
    coef_before = start.coef_.copy()
    final = fit_final(Z, y, start=start, check_rows=slice(800, 1200), check_labels=y[800:],
                      max_iter=500, tol=1e-6, round_iter=5)  # fmt: skip
    np.testing.assert_array_equal(start.coef_, coef_before)  # the start model is not changed
    assert final.converged and final.n_iter == sum(final.rounds)
    assert final.changed[-1] < final.resolution or final.rounds[-1] < 5 * 2 ** max(
        0, len(final.rounds) - 2
    )
    assert all(c >= final.resolution for c in final.changed[:-1])  # stopped at the first one
    cold = LogisticRegression(C=1.0, max_iter=500, tol=1e-6).fit(Z, y)
    assert final.n_iter < int(cold.n_iter_.max())  # the warm start saves iterations
    assert np.mean(final.estimator.predict(Z) == cold.predict(Z)) >= 0.99


def test_same_inputs_and_seed_give_byte_identical_artifacts(
    learnable_features: FeatureFixture, tmp_path: Path
) -> None:
    import zipfile

    kw = dict(features=learnable_features.features, grid={"C": [0.01, 1.0]}, validation_size=100,
              selection_size=150, seed=3, jobs=2)  # fmt: skip
    train(out=tmp_path / "a", **kw)  # type: ignore[arg-type]
    time.sleep(2.1)  # zip timestamps have a 2 s resolution: a later run must not differ
    train(out=tmp_path / "b", **kw)  # type: ignore[arg-type]
    a, b = (tmp_path / d / "model.npz" for d in "ab")
    assert a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    ja, jb = (json.loads((tmp_path / d / "model.json").read_text()) for d in "ab")
    assert ja["npz_sha256"] == jb["npz_sha256"]
    # Another seed draws another selection subsample: a real input of the result.
    train(out=tmp_path / "c", **{**kw, "seed": 4})  # type: ignore[arg-type]
    assert json.loads((tmp_path / "c" / "model.json").read_text())["seed"] == 4


def _train_args(features: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--features", str(features), "--out", str(out), "--validation-size", "100",
            "--grid", "C=0.1", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--grid", "C=nan"], "expected finite C > 0, got 'nan'"),
        (["--grid", "C=0.1,inf"], "expected finite C > 0, got '0.1,inf'"),
        (["--tol", "-1"], "--tol: expected a finite number > 0, got -1.0"),
        (["--tol", "nan"], "--tol: expected a finite number > 0, got nan"),
        (["--cv", "60"], "--cv: expected at most"),
        (["--seed", "-5"], "--seed: expected an integer >= 0, got -5"),
    ],
)
def test_cli_bad_options_exit_2_with_one_line(
    learnable_features: FeatureFixture, tmp_path: Path, extra: list[str], fragment: str
) -> None:
    res = CliRunner().invoke(app, _train_args(learnable_features.features, tmp_path / "m", *extra))
    assert res.exit_code == 2, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], res.stderr
    assert "Traceback" not in res.output and res.stdout == ""
    assert not (tmp_path / "m").exists()


def test_cli_refuses_a_store_other_than_the_features_one(
    learnable_features: FeatureFixture, make_store: Callable[..., Path], tmp_path: Path
) -> None:
    other = make_store("other.zarr")
    args = _train_args(learnable_features.features, tmp_path / "m")
    res = CliRunner().invoke(app, [*args, "--store", str(other)])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1
        and "--store: expected the store the features were made from" in (errors[0])
    )
    assert str(other) in errors[0] and "Traceback" not in res.output
    assert not (tmp_path / "m").exists()
    # The right store (given explicitly) is accepted.
    res = CliRunner().invoke(app, [*args, "--store", str(learnable_features.store)])
    assert res.exit_code == 0, res.output
