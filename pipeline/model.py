"""Model artifacts: a standardized linear model stored without pickle, verified on load.

An artifact is a folder (default ``data/models/<run-name>/``) holding

* ``model.npz``: arrays only (``allow_pickle=False`` on load): ``mean``, ``scale``
  (standardization), ``coef`` (n_outputs, K), ``intercept`` (n_outputs,), ``classes``;
* ``model.json``: format version, mode (``multiclass`` or ``binary``), positive class and
  decision threshold (binary), the feature configuration and its hash, chosen
  hyper-parameters, library versions, and the sha256 of ``model.npz``.

Loading checks the format, the checksum and every array's shape, so a tampered or
mismatched artifact fails with :class:`~pipeline.errors.ArtifactError` instead of
predicting garbage.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ArtifactError
from pipeline.fingerprint import sha256_bytes, sha256_file

FORMAT = "mnist-pipeline/linear-model/1"
_ARRAYS = ("mean", "scale", "coef", "intercept", "classes")


@dataclass(frozen=True)
class LinearModel:
    """Standardization followed by a (multinomial or binary) logistic regression.

    Attributes
    ----------
    mean, scale : ndarray, shape (K,)
        ``z = (X - mean) / scale``.
    coef : ndarray, shape (n_classes, K) for multiclass, (1, K) for binary
    intercept : ndarray, shape (n_classes,) or (1,)
    classes : ndarray, shape (n_classes,), int64
        Class labels; for binary mode ``[0, 1]`` meaning "not / is positive_class".
    mode : {"multiclass", "binary"}
    threshold : float
        Binary mode: predict positive when P(positive) >= threshold.
    meta : dict
        Everything else recorded in ``model.json``.
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray
    mode: str = "multiclass"
    threshold: float = 0.5
    positive_class: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.coef.shape[1])

    @property
    def feature_config_hash(self) -> str | None:
        return self.meta.get("feature_config_hash")

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Linear scores, shape (n, n_outputs), float64."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ArtifactError(f"expected features of shape (n, {self.n_features}), got {X.shape}")
        z = (X - self.mean) / self.scale
        return z @ self.coef.T + self.intercept

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, n_classes), float64; rows sum to 1."""
        s = self.decision_function(X)
        if self.mode == "binary":
            p = 1.0 / (1.0 + np.exp(-s[:, 0]))
            return np.stack([1.0 - p, p], axis=1)
        s -= s.max(axis=1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=1, keepdims=True)
        return s

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted class labels, shape (n,), int64."""
        proba = self.predict_proba(X)
        if self.mode == "binary":
            return (proba[:, 1] >= self.threshold).astype(np.int64)
        return self.classes[np.argmax(proba, axis=1)]


#: Timestamp of every ``model.npz`` entry: ``np.savez`` stamps the current time into the
#: zip headers, so two identical models would differ in bytes (and checksum).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes of an ``.npz`` of ``arrays`` (as ``np.savez`` writes it: uncompressed
    ``<name>.npy`` entries), with fixed entry timestamps: same arrays, same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, a in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)
    return buf.getvalue()


def save_model(model: LinearModel, folder: Path) -> None:
    """Write ``model.npz`` and ``model.json`` into ``folder`` (created if missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = npz_bytes({name: np.asarray(getattr(model, name)) for name in _ARRAYS})
    (folder / "model.npz").write_bytes(data)
    doc = {
        "format": FORMAT,
        "mode": model.mode,
        "threshold": model.threshold,
        "positive_class": model.positive_class,
        "n_features": model.n_features,
        "classes": [int(c) for c in model.classes],
        "npz_sha256": sha256_bytes(data),
        **model.meta,
    }
    (folder / "model.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")


def load_model(folder: Path) -> LinearModel:
    """Load and verify an artifact written by :func:`save_model`."""
    folder = Path(folder)
    json_path, npz_path = folder / "model.json", folder / "model.npz"
    if not json_path.is_file() or not npz_path.is_file():
        raise ArtifactError(
            f"expected a model folder with model.json and model.npz at {folder}, got "
            f"{'no such folder' if not folder.is_dir() else 'missing files'} (run train first)"
        )
    try:
        doc = json.loads(json_path.read_text())
    except ValueError as e:
        raise ArtifactError(f"{json_path}: expected JSON, got {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ArtifactError(f"{json_path}: expected format {FORMAT!r}, got {got!r}")
    digest = sha256_file(npz_path)
    if digest != doc.get("npz_sha256"):
        raise ArtifactError(
            f"{npz_path}: expected sha256 {str(doc.get('npz_sha256'))[:16]}..., got "
            f"{digest[:16]}... (the artifact was modified or is corrupt)"
        )
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in _ARRAYS}
    except (ValueError, KeyError, OSError) as e:
        raise ArtifactError(f"{npz_path}: expected arrays {_ARRAYS}, got {e}") from None
    K = int(doc.get("n_features", -1))
    n_out = 1 if doc.get("mode") == "binary" else len(arrays["classes"])
    expected = {"mean": (K,), "scale": (K,), "coef": (n_out, K), "intercept": (n_out,)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ArtifactError(
                f"{npz_path}: expected {name} of shape {shape}, got {arrays[name].shape}"
            )
    meta = {
        k: v
        for k, v in doc.items()
        if k not in ("format", "mode", "threshold", "positive_class", "npz_sha256")
    }
    return LinearModel(
        mean=arrays["mean"],
        scale=arrays["scale"],
        coef=arrays["coef"],
        intercept=arrays["intercept"],
        classes=arrays["classes"].astype(np.int64),
        mode=str(doc["mode"]),
        threshold=float(doc.get("threshold", 0.5)),
        positive_class=doc.get("positive_class"),
        meta=meta,
    )
