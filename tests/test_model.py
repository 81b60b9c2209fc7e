"""Model artifacts: round trip, verification on load, no pickle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from pipeline.errors import ArtifactError
from pipeline.model import _ARRAYS, LinearModel, load_model, save_model


def _fitted(binary: bool) -> tuple[LogisticRegression, StandardScaler, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 12)).astype(np.float32) * rng.uniform(0.5, 5, 12) + 3
    y = (X[:, 0] + X[:, 1] > 6).astype(int) if binary else rng.integers(0, 4, 300)
    if not binary:
        X[np.arange(300), y] += 4  # make classes separable-ish
    scaler = StandardScaler().fit(X)
    est = LogisticRegression(C=1.0, max_iter=500).fit(scaler.transform(X), y)
    return est, scaler, X, y


def _artifact(est: LogisticRegression, scaler: StandardScaler, binary: bool) -> LinearModel:
    return LinearModel(
        mean=scaler.mean_,
        scale=scaler.scale_,
        coef=est.coef_,
        intercept=est.intercept_,
        classes=np.arange(2) if binary else est.classes_,
        mode="binary" if binary else "multiclass",
        meta={"feature_config_hash": "abc"},
    )


@pytest.mark.parametrize("binary", [False, True])
def test_round_trip_predictions_identical_to_sklearn(tmp_path: Path, binary: bool) -> None:
    est, scaler, X, _ = _fitted(binary)
    save_model(_artifact(est, scaler, binary), tmp_path / "m")
    model = load_model(tmp_path / "m")
    Z = scaler.transform(X)
    np.testing.assert_array_equal(model.predict(X), est.predict(Z))
    np.testing.assert_allclose(model.predict_proba(X), est.predict_proba(Z), rtol=1e-6, atol=1e-9)
    assert model.feature_config_hash == "abc"
    assert model.mode == ("binary" if binary else "multiclass")


def test_tampered_arrays_are_refused(tmp_path: Path) -> None:
    est, scaler, _, _ = _fitted(False)
    save_model(_artifact(est, scaler, False), tmp_path / "m")
    npz = tmp_path / "m" / "model.npz"
    with np.load(npz) as f:
        arrays = dict(f)
    arrays["coef"] = arrays["coef"] * 1.01
    np.savez(npz, **arrays)
    with pytest.raises(ArtifactError, match="expected sha256"):
        load_model(tmp_path / "m")


def test_pickled_payload_is_never_loaded(tmp_path: Path) -> None:
    est, scaler, _, _ = _fitted(False)
    folder = tmp_path / "m"
    save_model(_artifact(est, scaler, False), folder)
    # An attacker rewrites the npz with an object array and fixes the checksum in the json.
    np.savez(
        folder / "model.npz",
        mean=np.array([object()], dtype=object),
        scale=scaler.scale_,
        coef=est.coef_,
        intercept=est.intercept_,
        classes=est.classes_,
    )
    doc = json.loads((folder / "model.json").read_text())
    from pipeline.fingerprint import sha256_file

    doc["npz_sha256"] = sha256_file(folder / "model.npz")
    (folder / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="expected arrays"):
        load_model(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="something/else"), "expected format"),
        (lambda d: d.update(n_features=5), "expected mean of shape"),
    ],
)
def test_mismatched_json_is_refused(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    est, scaler, _, _ = _fitted(False)
    save_model(_artifact(est, scaler, False), tmp_path / "m")
    path = tmp_path / "m" / "model.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=message):
        load_model(tmp_path / "m")


def test_missing_artifact_and_wrong_width(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="run train first"):
        load_model(tmp_path / "nothing")
    est, scaler, X, _ = _fitted(False)
    save_model(_artifact(est, scaler, False), tmp_path / "m")
    with pytest.raises(ArtifactError, match=r"expected features of shape \(n, 12\)"):
        load_model(tmp_path / "m").predict(X[:, :5])


def test_npz_bytes_do_not_depend_on_the_time_of_saving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time
    import zipfile

    est, scaler, X, _ = _fitted(False)
    model = _artifact(est, scaler, False)
    save_model(model, tmp_path / "a")
    real = time.localtime
    # zipfile stamps entries with time.localtime(): a save an hour later must give the same bytes
    monkeypatch.setattr(time, "localtime", lambda secs=None: real((secs or time.time()) + 3600))
    save_model(model, tmp_path / "b")
    a, b = (tmp_path / d / "model.npz" for d in "ab")
    assert a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert sorted(zf.namelist()) == sorted(f"{n}.npy" for n in _ARRAYS)
    np.testing.assert_array_equal(load_model(tmp_path / "b").predict(X), est.predict(
        scaler.transform(X)))  # fmt: skip
