"""``mnist-pipeline status``: stale stages and why, from the jobs' own checks, writing nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import separable_images
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.idx import write_idx

runner = CliRunner()


def invoke(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def status(**_: Any) -> dict[str, dict[str, str]]:
    result = invoke("status", "--json")
    assert result.exit_code == 0, result.output
    return {row["stage"]: row for row in json.loads(result.stdout)}


def tree(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the default layout, the pipeline run once through the CLI."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("MNIST_PIPELINE") or name == "MNIST_SOURCE":
            monkeypatch.delenv(name)
    source = tmp_path / "source"
    source.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 200), ("t10k", 60)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        labels[:10] = np.arange(10)
        write_idx(source / f"{prefix}-images-idx3-ubyte.gz", separable_images(labels, seed=n),
                  compress=True)  # fmt: skip
        write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", labels, compress=True)
    (tmp_path / "small.toml").write_text('[[features]]\nfamily = "pixels"\nfactor = 4\n')
    (tmp_path / "pipeline.toml").write_text(CONFIG.format(validation_size=50))
    return tmp_path


# fetch verifies the real MNIST checksums: this project ingests its own idx files instead.
CONFIG = """
[ingest]
raw_dir = "source"
[features]
feature_config = "small.toml"
[train]
validation_size = {validation_size}
"""


def test_status_follows_the_pipeline(project: Path) -> None:
    first = status()
    assert list(first) == ["fetch", "ingest", "features", "train"]
    assert first["fetch"]["status"] == "stale" and first["fetch"]["reason"] == "no output yet"
    assert first["ingest"]["reason"] == "no output yet"
    assert first["features"]["status"] == "blocked"
    assert "missing input" in first["features"]["reason"]

    for stage in ("ingest", "features", "train"):
        assert invoke(stage).exit_code == 0, stage
    data = project / "data"
    before = tree(data)
    rows = status()
    assert {s: r["status"] for s, r in rows.items() if s != "fetch"} == dict.fromkeys(
        ("ingest", "features", "train"), "up to date"
    )
    assert tree(data) == before  # nothing written, locked or touched

    # A changed training parameter: only train is stale, and says why.
    (project / "pipeline.toml").write_text(CONFIG.format(validation_size=40))
    rows = status()
    assert rows["features"]["status"] == "up to date"
    assert rows["train"]["status"] == "stale" and rows["train"]["reason"] == "parameters changed"

    # New raw data: ingest is stale, and everything after it because of it.
    raw = project / "source/t10k-labels-idx1-ubyte.gz"
    raw.write_bytes(raw.read_bytes()[:-1] + b"x")
    rows = status()
    assert rows["ingest"]["status"] == "stale" and rows["ingest"]["reason"] == "inputs changed"
    assert "upstream ingest" in rows["features"]["reason"]
    assert rows["train"]["status"] == "stale"  # its own parameters changed too
    assert tree(data) == before

    text = invoke("status")
    assert text.exit_code == 0 and text.stdout.splitlines()[0].startswith("fetch ")
