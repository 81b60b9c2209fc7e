"""Preprocessing kernels: batch ``(n, H, W)`` arrays in, arrays out. No I/O, no dask.

All kernels are vectorized over the batch (no per-image Python loops), deterministic, and
independent of how a dataset is split into batches.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

#: Border handling of :func:`median_blur`; equals ``scipy.ndimage`` ``mode="reflect"``
#: (half-sample symmetric: ``d c b a | a b c d``), which is numpy's ``"symmetric"`` pad.
MEDIAN_BORDER_MODE = "reflect"


def _check_batch(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected a batch of 2-D images (n, H, W), got shape {images.shape}")
    return images


def to_unit_float(images: np.ndarray) -> np.ndarray:
    """Intensities as float32 in [0, 1]: integer images are divided by their dtype's maximum.

    Float images are assumed to be in [0, 1] already and are only cast.
    """
    images = np.asarray(images)
    if images.dtype.kind in "ui":
        scale = np.float32(1.0 / np.iinfo(images.dtype).max)
        return images.astype(np.float32) * scale
    return images.astype(np.float32, copy=False)


def _med3(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))


def median_blur(images: np.ndarray, *, size: int = 3) -> np.ndarray:
    """Median filter of each image over a ``size x size`` window.

    Identical to ``scipy.ndimage.median_filter(images, size=(1, size, size))`` (border mode
    ``"reflect"``). The 3x3 case uses a separable min/max network (sort each vertical
    triple once, then combine three neighbouring columns), which is several times faster
    than a generic sort; other odd sizes use ``np.partition`` over sliding windows.

    Parameters
    ----------
    images : ndarray, shape (n, H, W)
        Any real dtype; the output has the same dtype.
    size : int
        Odd window size >= 1.
    """
    images = _check_batch(images)
    if size < 1 or size % 2 == 0:
        raise ValueError(f"expected an odd median size >= 1, got {size}")
    if size == 1:
        return images.copy()
    r = size // 2
    padded = np.pad(images, ((0, 0), (r, r), (r, r)), mode="symmetric")
    H, W = images.shape[1:]
    if size == 3:
        up, mid, down = padded[:, :-2], padded[:, 1:-1], padded[:, 2:]
        lo = np.minimum(up, mid)
        hi = np.maximum(up, mid)
        md = np.minimum(hi, down)
        hi = np.maximum(hi, down)
        np.maximum(lo, md, out=md)  # md = median of the vertical triple
        lo = np.minimum(lo, down)  # lo = min of the triple
        # lo/md/hi now hold each column triple's min, median and max, shape (n, H, W + 2).
        max_lo = np.maximum(np.maximum(lo[:, :, :-2], lo[:, :, 1:-1]), lo[:, :, 2:])
        min_hi = np.minimum(np.minimum(hi[:, :, :-2], hi[:, :, 1:-1]), hi[:, :, 2:])
        med_md = _med3(md[:, :, :-2], md[:, :, 1:-1], md[:, :, 2:])
        return _med3(max_lo, med_md, min_hi)
    windows = sliding_window_view(padded, (size, size), axis=(1, 2)).reshape(
        images.shape[0], H, W, size * size
    )
    k = size * size // 2
    return np.partition(windows, k, axis=-1)[..., k]


def _histograms(images: np.ndarray) -> np.ndarray:
    """Per-image 256-bin histograms of uint8 images, shape (n, 256), via one bincount."""
    n = images.shape[0]
    offsets = (np.arange(n, dtype=np.int64) * 256)[:, None]
    flat = images.reshape(n, -1).astype(np.int64) + offsets
    return np.bincount(flat.ravel(), minlength=n * 256).reshape(n, 256)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return images
    return np.clip(np.rint(to_unit_float(images) * 255.0), 0, 255).astype(np.uint8)


def otsu_threshold(images: np.ndarray) -> np.ndarray:
    """Otsu's threshold of each image, on the 0-255 scale.

    Equals ``skimage.filters.threshold_otsu`` on each uint8 image: foreground is
    ``image > threshold``. Non-uint8 images are first quantized to 256 levels. A constant
    image gets its own value as threshold (no foreground).

    Returns
    -------
    ndarray, shape (n,), float32
    """
    images = _to_uint8(_check_batch(images))
    hist = _histograms(images).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist, axis=1)
    s0 = np.cumsum(hist * levels, axis=1)
    total_w = w0[:, -1:]
    total_s = s0[:, -1:]
    w1 = total_w - w0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean0 = s0 / w0
        mean1 = (total_s - s0) / w1
        between = w0 * w1 * (mean0 - mean1) ** 2
    between[~((w0 > 0) & (w1 > 0))] = -1.0
    best = np.argmax(between, axis=1)
    constant = between.max(axis=1) < 0
    best[constant] = images.reshape(images.shape[0], -1)[constant, 0]
    return best.astype(np.float32)


def binarize(images: np.ndarray, *, method: str = "otsu", threshold: float = 0.5) -> np.ndarray:
    """Ink mask of each image as float32 0/1.

    Parameters
    ----------
    images : ndarray, shape (n, H, W)
    method : {"otsu", "fixed"}
        ``"otsu"``: per-image Otsu threshold (:func:`otsu_threshold`); ``"fixed"``: pixels
        brighter than ``threshold`` (fraction of full intensity, e.g. 0.5 = 127.5 for uint8).
    """
    images = _check_batch(images)
    if method == "otsu":
        t = otsu_threshold(images)[:, None, None]
        return (_to_uint8(images) > t).astype(np.float32)
    if method == "fixed":
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"expected a fixed threshold in [0, 1), got {threshold}")
        return (to_unit_float(images) > np.float32(threshold)).astype(np.float32)
    raise ValueError(f"expected binarize method 'otsu' or 'fixed', got {method!r}")


def image_moments(images: np.ndarray) -> dict[str, np.ndarray]:
    """Mass, centroid and second central moments of each image.

    Returns a dict of (n,) float64 arrays: ``mass``, ``cy``, ``cx``, ``mu20`` (row
    variance), ``mu02`` (column variance), ``mu11`` (covariance). Coordinates are pixel
    centres (row/column indices). An empty image gets its geometric centre and zero spread.
    """
    from pipeline import jit  # compiled loops, imported on first use (numba is heavy)

    m = jit.moments(np.ascontiguousarray(to_unit_float(_check_batch(images))))
    return {k: m[:, j] for j, k in enumerate(("mass", "cy", "cx", "mu20", "mu02", "mu11"))}


def deskew(images: np.ndarray, *, center: bool = True) -> np.ndarray:
    """Remove each image's slant with a shear derived from its second moments.

    The shear ``x' = x - a (y - cy)`` with ``a = mu11 / mu20`` makes the row/column
    covariance zero (the classic moment deskew). With ``center`` the image is also
    translated so its centre of mass is at the image centre: by a whole number of rows
    (so rows stay sharp) and a fractional number of columns. Linear interpolation along
    rows; pixels from outside the image are 0.

    Parameters
    ----------
    images : ndarray, shape (n, H, W)
    center : bool
        Also move the centre of mass to the image centre.

    Returns
    -------
    ndarray, shape (n, H, W), float32 in [0, 1]
    """
    from pipeline import jit  # compiled loops, imported on first use (numba is heavy)

    x = np.ascontiguousarray(to_unit_float(_check_batch(images)))
    return jit.deskew_rows(x, jit.moments(x), center)


def center_of_mass_shift(images: np.ndarray) -> np.ndarray:
    """Translate each image by whole pixels so its centre of mass is nearest the centre.

    Returns
    -------
    ndarray, shape (n, H, W), same dtype; pixels from outside are 0.
    """
    images = _check_batch(images)
    n, H, W = images.shape
    m = image_moments(images)
    dy = np.rint(m["cy"] - (H - 1) / 2).astype(np.intp)
    dx = np.rint(m["cx"] - (W - 1) / 2).astype(np.intp)
    src_r = np.arange(H)[None, :] + dy[:, None]
    src_c = np.arange(W)[None, :] + dx[:, None]
    ok = ((src_r >= 0) & (src_r < H))[:, :, None] & ((src_c >= 0) & (src_c < W))[:, None, :]
    out = images[
        np.arange(n)[:, None, None],
        np.clip(src_r, 0, H - 1)[:, :, None],
        np.clip(src_c, 0, W - 1)[:, None, :],
    ]
    out[~ok] = 0
    return out
