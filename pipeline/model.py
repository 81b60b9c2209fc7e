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

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ArtifactError
from pipeline.fingerprint import sha256_bytes

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
    return load_model_with_digest(folder)[0]


def load_model_with_digest(folder: Path) -> tuple[LinearModel, str]:
    """Load and verify an artifact; also return the sha256 of the bytes it was read from
    (``model.json`` then ``model.npz``), each file read once, so a caller can record
    exactly which model it used even when the artifact is rewritten meanwhile."""
    folder = Path(folder)
    json_path, npz_path = folder / "model.json", folder / "model.npz"
    if not json_path.is_file() or not npz_path.is_file():
        raise ArtifactError(
            f"expected a model folder with model.json and model.npz at {folder}, got "
            f"{'no such folder' if not folder.is_dir() else 'missing files'} (run train first)"
        )
    try:
        json_bytes, npz_bytes = json_path.read_bytes(), npz_path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{folder}: expected readable model files, got {e}") from None
    digest = hashlib.sha256(json_bytes + b"\0" + npz_bytes).hexdigest()
    return _parse(json_path, json_bytes, npz_path, npz_bytes), digest


def _parse(json_path: Path, json_bytes: bytes, npz_path: Path, npz_bytes: bytes) -> LinearModel:
    try:
        doc = json.loads(json_bytes)
    except ValueError as e:
        raise ArtifactError(f"{json_path}: expected JSON, got {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ArtifactError(f"{json_path}: expected format {FORMAT!r}, got {got!r}")
    digest = sha256_bytes(npz_bytes)
    if digest != doc.get("npz_sha256"):
        raise ArtifactError(
            f"{npz_path}: expected sha256 {str(doc.get('npz_sha256'))[:16]}..., got "
            f"{digest[:16]}... (the artifact was modified or is corrupt)"
        )
    try:
        with np.load(io.BytesIO(npz_bytes), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in _ARRAYS}
    except (ValueError, KeyError, OSError) as e:
        raise ArtifactError(f"{npz_path}: expected arrays {_ARRAYS}, got {e}") from None
    _check_doc(json_path, doc)
    K = int(doc["n_features"])
    n_out = 1 if doc["mode"] == "binary" else len(arrays["classes"])
    expected = {"mean": (K,), "scale": (K,), "coef": (n_out, K), "intercept": (n_out,)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ArtifactError(
                f"{npz_path}: expected {name} of shape {shape}, got {arrays[name].shape}"
            )
    _check_arrays(npz_path, arrays, doc)
    meta = {
        k: v
        for k, v in doc.items()
        if k not in ("format", "mode", "threshold", "positive_class", "npz_sha256")
    }
    return LinearModel(
        mean=arrays["mean"].astype(np.float64),
        scale=arrays["scale"].astype(np.float64),
        coef=arrays["coef"].astype(np.float64),
        intercept=arrays["intercept"].astype(np.float64),
        classes=arrays["classes"].astype(np.int64),
        mode=str(doc["mode"]),
        threshold=float(doc.get("threshold", 0.5)),
        positive_class=doc.get("positive_class"),
        meta=meta,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_doc(path: Path, doc: dict[str, Any]) -> None:
    """The fields of ``model.json`` that prediction depends on have the right types."""
    mode = doc.get("mode")
    if mode not in ("multiclass", "binary"):
        raise ArtifactError(f"{path}: expected mode 'multiclass' or 'binary', got {mode!r}")
    n = doc.get("n_features")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ArtifactError(f"{path}: expected n_features a positive integer, got {n!r}")
    threshold = doc.get("threshold", 0.5)
    if (
        not isinstance(threshold, int | float)
        or isinstance(threshold, bool)
        or not 0.0 <= threshold <= 1.0
    ):
        raise ArtifactError(f"{path}: expected threshold a number in [0, 1], got {threshold!r}")
    positive = doc.get("positive_class")
    if positive is not None and not _is_int(positive):
        raise ArtifactError(f"{path}: expected an integer positive_class, got {positive!r}")
    classes = doc.get("classes")
    if not isinstance(classes, list) or not all(_is_int(c) for c in classes):
        raise ArtifactError(f"{path}: expected classes a list of integers, got {classes!r}")


def _check_arrays(path: Path, arrays: dict[str, np.ndarray], doc: dict[str, Any]) -> None:
    """Values a tampered or broken training could leave that would predict garbage."""
    for name in ("mean", "scale", "coef", "intercept"):
        a = arrays[name]
        if a.dtype.kind != "f":
            raise ArtifactError(f"{path}: expected {name} of floats, got dtype {a.dtype}")
        if not np.isfinite(a).all():
            raise ArtifactError(
                f"{path}: expected finite {name}, got {int(np.count_nonzero(~np.isfinite(a)))} "
                "NaN or infinite values"
            )
    if (arrays["scale"] <= 0).any():
        raise ArtifactError(
            f"{path}: expected positive scale, got {int(np.count_nonzero(arrays['scale'] <= 0))} "
            "values <= 0"
        )
    classes = arrays["classes"]
    if classes.dtype.kind not in "iu" or classes.ndim != 1 or classes.size < 2:
        raise ArtifactError(
            f"{path}: expected at least 2 integer classes, got {classes.dtype} of shape "
            f"{classes.shape}"
        )
    if (np.diff(classes) <= 0).any():
        raise ArtifactError(
            f"{path}: expected distinct classes in increasing order, got {classes.tolist()}"
        )
    if classes.tolist() != doc["classes"]:
        raise ArtifactError(
            f"{path}: expected the classes model.json lists ({doc['classes']}), got "
            f"{classes.tolist()}"
        )
    if doc["mode"] == "binary" and classes.tolist() != [0, 1]:
        raise ArtifactError(
            f"{path}: expected classes [0, 1] in binary mode, got {classes.tolist()}"
        )
