"""The Python API as a notebook user calls it: ``from pipeline import Classifier``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FeatureFixture, separable_images
from PIL import Image

import pipeline
from pipeline import Classifier, read_features
from pipeline.score import score
from pipeline.store import open_store, split_arrays
from pipeline.train import train


@pytest.fixture
def trained(learnable_features: FeatureFixture, tmp_path: Path) -> Path:
    out = tmp_path / "models" / "default"
    train(features=learnable_features.features, out=out, store=learnable_features.store,
          validation_size=100)  # fmt: skip
    return out


def test_package_face_lists_the_api() -> None:
    assert {"Classifier", "read_features", "__version__"} <= set(pipeline.__all__)
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None
    with pytest.raises(AttributeError):
        _ = pipeline.no_such_name  # type: ignore[attr-defined]


def test_predict_on_an_array_equals_scoring_the_store(
    trained: Path, learnable_features: FeatureFixture, tmp_path: Path
) -> None:
    clf = Classifier.load(trained)
    images, labels = split_arrays(open_store(learnable_features.store), "test")
    X = np.asarray(images[:])
    proba = clf.predict_proba(X)
    assert proba.shape == (len(X), len(clf.classes_))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    pred = clf.predict(X)
    assert (pred == np.asarray(labels[:])).mean() > 0.9
    out = tmp_path / "pred.parquet"
    score(model=trained, source=learnable_features.store, out=out)
    np.testing.assert_array_equal(pd.read_parquet(out)["prediction"].to_numpy(), pred)
    assert clf.predict(X[0]).shape == (1,)  # one (H, W) image


def test_predict_on_paths_and_folders_equals_score(trained: Path, tmp_path: Path) -> None:
    folder = tmp_path / "digits"
    (folder / "sub").mkdir(parents=True)
    images = separable_images(np.arange(12) % 10, seed=7)
    paths = []
    for i, img in enumerate(images):
        path = folder / ("sub" if i % 2 else "") / f"{i:02d}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    clf = Classifier.load(trained)
    by_path = clf.predict(paths)
    np.testing.assert_array_equal(by_path, clf.predict(images))  # 28x28 dark: kept as is
    out = tmp_path / "pred.parquet"
    score(model=trained, source=folder, out=out)
    scored = pd.read_parquet(out).set_index("path")["prediction"]
    by_folder = clf.predict(folder)
    order = sorted(p.relative_to(folder).as_posix() for p in paths)
    np.testing.assert_array_equal(by_folder, scored.loc[order].to_numpy())
    np.testing.assert_array_equal(clf.predict(str(paths[3])), by_path[3:4])


def test_errors_keep_their_builtin_classes(trained: Path, tmp_path: Path) -> None:
    clf = Classifier.load(trained)
    with pytest.raises(ValueError, match=r"expected images giving \d+ features"):
        clf.predict(np.zeros((2, 20, 20), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        clf.predict(np.zeros(5))
    with pytest.raises(ValueError, match="finite"):
        clf.predict(np.full((1, 28, 28), np.nan, np.float32))
    with pytest.raises(ValueError, match="no such path"):
        clf.predict([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="expected a model folder"):
        Classifier.load(tmp_path / "nothing")


def test_read_features_unpacks_like_a_dataset_loader(learnable_features: FeatureFixture) -> None:
    X, y = read_features(learnable_features.features)
    assert X.shape[0] == y.shape[0] == 400 and X.dtype == np.float32
    _, y_test = read_features(learnable_features.features, split="test")
    assert len(y_test) == 100
