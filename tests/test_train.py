"""The train stage: grid search, binary mode, artifact, reports; and real MNIST accuracy."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.errors import InputError
from pipeline.model import load_model
from pipeline.parquet import read_features
from pipeline.train import DEFAULT_GRID, grid_search, parse_grid, train

SMALL_GRID = {"C": [0.01, 1.0], "class_weight": [None]}


def test_multiclass_on_learnable_data(learnable_features, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
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
    assert model.feature_config_hash == learnable_features.config.hash


def test_report_embeds_real_figures_and_agrees_with_metrics(
    learnable_features, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
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


def test_mistake_gallery_when_there_are_mistakes(learnable_features, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A strongly regularized model on few features makes mistakes to show.
    out = tmp_path / "model"
    train(features=learnable_features.features, out=out, grid={"C": [1e-5]}, validation_size=100)
    metrics = json.loads((out / "metrics.json").read_text())
    if metrics["accuracy"] == 1.0:
        pytest.skip("no mistakes to show")
    assert (out / "figures" / "mistakes.png").is_file()
    probs = [m["probability"] for m in metrics["mistakes"]]
    assert probs == sorted(probs, reverse=True)


def test_binary_mode_precision_recall_and_threshold(learnable_features, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
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


def test_cv_mode_and_determinism(learnable_features, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
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
    _, _, _, (Z_val, y_val) = grid_search(
        X, y, grid={"C": [1.0]}, validation_size=60, cv=cv, seed=0, binary=False,
        max_iter=200, tol=1e-4,
    )  # fmt: skip
    if cv is None:
        fit, val = X[:-60], X[-60:]
        want = (val - fit.mean(axis=0)) / fit.std(axis=0)
        np.testing.assert_allclose(Z_val, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(y_val, y[-60:])
        assert Z_val[:, 0].mean() > 50  # scaled with the fitting rows' spread only
    else:
        assert len(Z_val) == len(y_val) == n // cv


def test_parse_grid() -> None:
    assert parse_grid(None) == DEFAULT_GRID
    assert parse_grid("C=0.1,0.01;class_weight=none,balanced") == {
        "C": [0.01, 0.1],
        "class_weight": [None, "balanced"],
    }
    for bad in ("C=", "gamma=1", "C=a", "C=-1", "class_weight=heavy", "class_weight=none"):
        with pytest.raises(InputError, match="expected"):
            parse_grid(bad)


def test_cli_errors_are_one_line(tmp_path: Path, learnable_features) -> None:  # type: ignore[no-untyped-def]
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
