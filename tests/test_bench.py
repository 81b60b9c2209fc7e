"""The benchmark's quick mode, so that it cannot rot (about a minute on real MNIST)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.bench import Record, markdown_table, run_benchmark
from pipeline.errors import InputError


@pytest.mark.slow
@pytest.mark.mnist
def test_quick_benchmark_measures_every_stage_beside_its_peer(
    real_mnist_dir: Path, tmp_path: Path
) -> None:
    results = tmp_path / "results.json"
    records = run_benchmark(
        source=real_mnist_dir, workdir=tmp_path / "work", results=results, quick=True, reps=1
    )
    doc = json.loads(results.read_text())
    assert doc["quick"] is True and doc["machine"]["cpus"] >= 1
    assert {"numpy", "scikit-learn", "dask", "zarr"} <= set(doc["versions"])
    got = {(r["stage"], r["impl"], r["metric"]) for r in doc["records"]}
    for stage, metric in [("features", "images_per_s"), ("train", "stage_s"),
                          ("train", "accuracy"), ("score", "images_per_s")]:  # fmt: skip
        assert (stage, "ours", metric) in got and (stage, "peer", metric) in got
    assert ("end_to_end", "ours", "peak_rss_mb") in got
    assert ("ingest", "ours", "mb_per_s") in got
    for r in doc["records"]:
        assert r["min"] <= r["value"] <= r["max"] and r["value"] > 0, r
    accuracy = {
        r["impl"]: r["value"]
        for r in doc["records"]
        if r["metric"] == "accuracy" and r["stage"] == "train"
    }
    assert accuracy["ours"] > accuracy["peer"] > 0.8
    train = [r for r in doc["records"] if r["stage"] == "train" and r["impl"] == "ours"]
    assert {r["metric"] for r in train} >= {"stage_s", "accuracy", "holdout_accuracy"}
    # Fashion-MNIST beside MNIST when its files are there (../shared/data/fashion-mnist).
    if (real_mnist_dir.parent / "fashion-mnist").is_dir():
        fashion = {r["metric"]: r for r in doc["records"] if r["stage"] == "train_fashion"}
        assert 0.7 < fashion["accuracy"]["value"] < 1 and fashion["stage_s"]["value"] > 0
        assert "chose C=" in fashion["stage_s"]["note"]
    table = markdown_table(records)
    assert table.startswith("| stage | metric | ours | peer | ours / peer |")
    assert "| features | images_per_s |" in table


def test_markdown_table_ratio() -> None:
    rows = [
        Record("score", "ours", "images_per_s", 10.0, 9.0, 11.0, 3, 100, "a"),
        Record("score", "peer", "images_per_s", 4.0, 4.0, 4.0, 1, 100, "b"),
        Record("train", "ours", "accuracy", 0.99, 0.99, 0.99, 1, 5, "c"),
    ]
    table = markdown_table(rows)
    assert "| score | images_per_s | 10 (9-11) | 4 | 2.50x | 100 | a |" in table
    assert "| train | accuracy | 0.99 | - | - | 5 | c |" in table


def test_missing_source_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="expected a folder"):
        run_benchmark(source=tmp_path / "nope", workdir=tmp_path / "w", results=tmp_path / "r.json")


def test_bench_never_empties_a_folder_it_did_not_make(tmp_path: Path, real_mnist_dir: Path) -> None:
    mine = tmp_path / "data"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="refusing to empty it"):
        run_benchmark(source=real_mnist_dir, results=tmp_path / "r.json", workdir=mine, quick=True)
    assert (mine / "notes.txt").read_text() == "keep me"
