"""The Python face of a trained model: predict digits from arrays, files or folders.

For notebooks and scripts; the same code paths as the ``score`` job (features by
:func:`pipeline.extract.extract_features`, files normalized by :mod:`pipeline.images`)::

    from pipeline import Classifier
    clf = Classifier.load("data/models/default")
    clf.predict(images)            # (n, 28, 28) array -> (n,) labels
    clf.predict(["a.png", "b.jpg"])
    clf.predict_proba("digits/")   # every image file under a folder, in sorted order
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.catalogue import FeatureConfig
from pipeline.errors import ConfigMismatchError, InputError
from pipeline.extract import extract_features, feature_widths
from pipeline.images import DEFAULT_GLOBS, Normalize, load_digit
from pipeline.model import LinearModel

#: What :meth:`Classifier.predict` accepts: an image array, one path, or several paths.
Images = np.ndarray | str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


@dataclass(frozen=True)
class Classifier:
    """A verified model artifact with the feature configuration it was trained on.

    Attributes
    ----------
    model : LinearModel
        The standardized logistic regression (arrays, no pickle).
    config : FeatureConfig
        The feature configuration the model expects.
    folder : Path
        Where the artifact was loaded from.
    """

    model: LinearModel
    config: FeatureConfig
    folder: Path

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> Classifier:
        """Load and verify the model folder written by ``train`` (``model.json`` +
        ``model.npz``); raises :class:`~pipeline.errors.ArtifactError` when it is broken."""
        from pipeline.score import load_scoring_model  # the one set of artifact checks

        scoring = load_scoring_model(Path(folder))
        return cls(model=scoring.model, config=scoring.config, folder=scoring.folder)

    @property
    def classes_(self) -> np.ndarray:
        """Class labels, shape (n_classes,), int64 (binary models: 0 = not, 1 = positive)."""
        return self.model.classes

    def images(self, images: Images, *, normalize: Normalize = "auto") -> np.ndarray:
        """The images as the model sees them.

        Parameters
        ----------
        images : ndarray, path, or sequence of paths
            An array ``(n, H, W)`` (or one image ``(H, W)``) of raw images, uint8 or floats
            in [0, 1], used as they are, like a zarr store's; or image files (PNG, JPEG,
            ...) and folders of them (walked recursively in sorted order), normalized to
            MNIST format like ``score`` does.
        normalize : {"auto", "always", "never"}
            For files: see :func:`pipeline.images.to_mnist`.

        Returns
        -------
        ndarray, shape (n, H, W)
        """
        if isinstance(images, np.ndarray):
            array = images[None] if images.ndim == 2 else images
            if array.ndim != 3:
                raise InputError(
                    f"expected images of shape (n, height, width) or (height, width), "
                    f"got shape {images.shape}"
                )
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise InputError("expected finite pixel values, got NaN or infinity")
            return array
        paths = _image_paths(images)
        if not paths:
            raise InputError(f"expected image files, got none in {images!r}")
        return np.stack([load_digit(p, normalize=normalize) for p in paths])

    def features(self, images: Images, *, normalize: Normalize = "auto") -> np.ndarray:
        """Feature matrix, shape (n, K) float32, of :meth:`images`."""
        array = self.images(images, normalize=normalize)
        k = sum(feature_widths(self.config, (array.shape[1], array.shape[2])).values())
        if k != self.model.n_features:
            raise ConfigMismatchError(
                f"expected images giving {self.model.n_features} features, got "
                f"{array.shape[1]}x{array.shape[2]} images giving {k} (the model was trained "
                "on images of another size)"
            )
        return extract_features(array, self.config)

    def predict_proba(self, images: Images, *, normalize: Normalize = "auto") -> np.ndarray:
        """Class probabilities, shape (n, n_classes) float64, columns in :attr:`classes_`."""
        return self.model.predict_proba(self.features(images, normalize=normalize))

    def predict(self, images: Images, *, normalize: Normalize = "auto") -> np.ndarray:
        """Predicted labels, shape (n,) int64."""
        return self.model.predict(self.features(images, normalize=normalize))


def _image_paths(images: Any) -> list[str]:
    """Files in the order given, each folder expanded to its image files in sorted order."""
    from pipeline.score import walk_images

    items = [images] if isinstance(images, str | os.PathLike) else list(images)
    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            for rel, problem in walk_images(path, globs=DEFAULT_GLOBS):
                if problem is not None:
                    raise InputError(f"{path / rel}: {problem}")
                out.append(os.fspath(path / rel))
        elif path.is_file():
            out.append(os.fspath(path))
        else:
            raise InputError(f"expected an image file or folder at {path}, got no such path")
    return out
