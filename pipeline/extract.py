"""Feature extraction: a configuration applied to a batch of images, in numpy or with dask.

:func:`extract_features` is the one code path from raw images to the feature matrix; the
``features`` stage maps it over zarr chunks with dask and ``score`` calls it on batches of
decoded image files, so training and scoring features cannot drift apart.
"""

from __future__ import annotations

from functools import lru_cache

import dask.array as da
import numpy as np

# Extraction runs the compiled loops: load them with this module, like its other imports
# (hog and preprocess import them lazily for processes that only read features).
from pipeline import jit  # noqa: F401
from pipeline.catalogue import (
    BASE_VIEW,
    FAMILIES,
    STEPS,
    FeatureConfig,
    FeatureConfigError,
    check_image_shape,
)
from pipeline.hog import shared_orientations
from pipeline.preprocess import to_unit_float

#: Images per internal sub-batch: big enough to amortise numpy call overhead, small enough
#: that a kernel's temporaries stay in cache. Results do not depend on it.
SUB_BATCH = 128


def _make_view(images: np.ndarray, config: FeatureConfig, view: str) -> np.ndarray:
    out = images
    for op, params in config.view_steps(view):
        out = STEPS[op](out, **dict(params))
    return to_unit_float(out)


def _extract_into(out: np.ndarray, images: np.ndarray, config: FeatureConfig) -> None:
    views: dict[str, np.ndarray] = {}
    start = 0
    with shared_orientations():  # HOG families on one view compute orientations once
        for spec in config.features:
            if spec.view not in views:
                views[spec.view] = _make_view(images, config, spec.view)
            part = FAMILIES[spec.family].kernel(views[spec.view], **spec.kwargs)
            out[:, start : start + part.shape[1]] = part
            start += part.shape[1]
    if start != out.shape[1]:
        raise AssertionError(f"families gave {start} features, expected {out.shape[1]}")


def extract_features(
    images: np.ndarray, config: FeatureConfig, *, sub_batch: int = SUB_BATCH
) -> np.ndarray:
    """Feature matrix of a batch of images.

    Parameters
    ----------
    images : ndarray, shape (n, H, W)
        Raw images (integer, or floats in [0, 1]).
    config : FeatureConfig
        Which views and families to compute.

    Returns
    -------
    ndarray, shape (n, K), float32
        Families concatenated in configuration order (see :func:`feature_widths`).
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected images of shape (n, H, W), got {images.shape}")
    n = images.shape[0]
    width = sum(feature_widths(config, (images.shape[1], images.shape[2])).values())
    # Each family writes its block of each sub-batch straight into the result.
    out = np.empty((n, width), np.float32)
    for start in range(0, n, sub_batch):
        stop = min(n, start + sub_batch)
        _extract_into(out[start:stop], images[start:stop], config)
    return out


@lru_cache(maxsize=32)
def feature_widths(config: FeatureConfig, image_shape: tuple[int, int]) -> dict[str, int]:
    """Number of outputs of each configured family for images of ``image_shape``.

    Runs the configuration once on blank images, which also validates every parameter;
    a bad value raises :class:`FeatureConfigError`.
    """
    check_image_shape(config, image_shape)  # before any kernel allocates for a bad size
    probe = np.zeros((2, *image_shape), np.uint8)
    widths = {}
    views: dict[str, np.ndarray] = {}
    for spec in config.features:
        try:
            if spec.view not in views:
                views[spec.view] = _make_view(probe, config, spec.view)
            out = FAMILIES[spec.family].kernel(views[spec.view], **spec.kwargs)
        except ValueError as e:
            where = f"view {spec.view!r}" if spec.view != BASE_VIEW else "the images"
            raise FeatureConfigError(
                f"feature {spec.name!r} ({spec.family} on {where}) for images of shape "
                f"{image_shape}: {e}"
            ) from None
        if out.ndim != 2 or out.shape[0] != 2 or out.dtype != np.float32:
            raise AssertionError(f"{spec.family} returned {out.shape} {out.dtype}")
        widths[spec.name] = out.shape[1]
    return widths


def features_dask(images: da.Array, config: FeatureConfig) -> da.Array:
    """Lazy feature matrix of a dask image array, one task per image chunk.

    Parameters
    ----------
    images : dask.array.Array, shape (n, H, W)
        Chunked along n only (other axes are merged into one chunk if needed).

    Returns
    -------
    dask.array.Array, shape (n, K), float32, chunks ``(images.chunks[0], (K,))``
    """
    if images.ndim != 3:
        raise ValueError(f"expected images of shape (n, H, W), got {images.shape}")
    if len(images.chunks[1]) > 1 or len(images.chunks[2]) > 1:
        images = images.rechunk({1: -1, 2: -1})
    K = sum(feature_widths(config, tuple(images.shape[1:])).values())
    return images.map_blocks(  # type: ignore[call-arg]  # dask's stub misreads the signature
        extract_features,  # type: ignore[arg-type]
        config=config,
        dtype=np.float32,
        chunks=(images.chunks[0], (K,)),
        drop_axis=2,
        meta=np.empty((0, 0), np.float32),
    )
