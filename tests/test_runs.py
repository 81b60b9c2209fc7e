"""Model runs as experiments: ``runs`` and ``runs diff`` through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import FeatureFixture
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.errors import InputError
from pipeline.runs import diff_runs, find_runs, resolve_run
from pipeline.train import train

runner = CliRunner()


@pytest.fixture
def two_runs(learnable_features: FeatureFixture, tmp_path: Path) -> Path:
    models = tmp_path / "models"
    for name, grid in (("small-c", {"C": [0.001], "class_weight": [None]}),
                       ("large-c", {"C": [1.0], "class_weight": [None]})):  # fmt: skip
        train(features=learnable_features.features, out=models / name,
              store=learnable_features.store, validation_size=100, grid=grid)  # fmt: skip
    return models


def invoke(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def test_runs_lists_every_run_with_its_facts(two_runs: Path) -> None:
    result = invoke("runs", "--models", two_runs)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["run", "dataset", "features", "best", "test", "acc", "finished",
                                "time"]  # fmt: skip
    body = "\n".join(lines[2:])
    assert "small-c" in body and "large-c" in body and "mnist" in body and "C=0.001" in body
    data = json.loads(invoke("runs", "--models", two_runs, "--json").stdout)
    assert {r["name"] for r in data} == {"small-c", "large-c"}
    for row in data:
        assert 0 <= row["accuracy"] <= 1 and row["seconds"] > 0 and row["dataset"] == "mnist"
        assert row["params"]["validation_size"] == 100


def test_runs_diff_shows_parameters_and_metrics_that_differ(two_runs: Path) -> None:
    runs = {r.name: r for r in find_runs(two_runs)}
    diff = diff_runs(runs["small-c"], runs["large-c"])
    keys = {c.key for c in diff.params}
    assert "best.C" in keys and "grid.C" in keys
    assert "feature_config_hash" not in keys  # same features
    every = diff_runs(runs["small-c"], runs["large-c"], all_metrics=True).metrics
    accuracy = next(c for c in every if c.key == "accuracy")
    assert accuracy.old == runs["small-c"].accuracy and accuracy.new == runs["large-c"].accuracy
    assert any(c.key.startswith("class 3.") for c in every)

    result = invoke("runs", "diff", "small-c", "large-c", "--models", two_runs)
    assert result.exit_code == 0, result.output
    assert "best.C" in result.stdout and "0.001" in result.stdout
    data = json.loads(invoke("runs", "diff", "small-c", "large-c", "--models", two_runs,
                             "--json", "--all").stdout)  # fmt: skip
    assert data["a"]["name"] == "small-c"
    assert {"key", "a", "b", "delta"} <= set(data["metrics"][0])
    same = invoke("runs", "diff", "small-c", str(two_runs / "small-c"), "--models", two_runs)
    assert "parameters: identical" in same.stdout and "test metrics: identical" in same.stdout


def test_unknown_runs_are_one_line_errors(two_runs: Path, tmp_path: Path) -> None:
    result = invoke("runs", "diff", "small-c", "nope", "--models", two_runs)
    assert result.exit_code == 2
    assert "expected a run name" in result.stderr and "large-c" in result.stderr
    assert "Traceback" not in result.output
    with pytest.raises(InputError, match="no such folder"):
        find_runs(tmp_path / "none")
    with pytest.raises(InputError):
        resolve_run(two_runs, "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no model runs" in invoke("runs", "--models", empty).stdout
