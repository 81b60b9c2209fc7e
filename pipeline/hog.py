"""Histogram of oriented gradients (HOG), vectorized over a batch of images.

``hog_features`` maps ``(n, H, W)`` images to ``(n, k)`` float32 descriptors. With
``soft_bins=False, spatial="box", norm="l2-hys", eps=1e-5`` it reproduces
``skimage.feature.hog(image, orientations=bins, pixels_per_cell=(cell, cell),
cells_per_block=(block, block), block_norm="L2-Hys")`` on images whose outermost pixel ring
and the next one are blank (skimage zeroes gradients on the border, this module pads the
image with zeros).
The other options are the usual refinements: linear interpolation between orientation
bins (``soft_bins``) and between neighbouring cells (``spatial="triangle"``, cells overlap
by half their size on each side), which make the descriptor vary smoothly with small shifts
and rotations and raise linear-classifier accuracy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np

from pipeline.preprocess import to_unit_float

#: Rounds of L2 normalisation per block, by norm: L2-Hys normalises, clips at 0.2 and
#: normalises again.
_NORM_ROUNDS = {"l2-hys": 2, "l2": 1, "none": 0}
NORMS = tuple(_NORM_ROUNDS)
SPATIAL = ("box", "triangle")


def gradients(
    images: np.ndarray, *, dtype: type[np.floating] = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Central-difference gradients ``(g_row, g_col)``, zero outside the image.

    ``g_row[r, c] = I[r+1, c] - I[r-1, c]``, ``g_col[r, c] = I[r, c+1] - I[r, c-1]``, on
    intensities in [0, 1] computed in ``dtype``.
    """
    x = to_unit_float(images) if dtype == np.float32 else _unit_float64(images)
    n, H, W = x.shape
    p = np.zeros((n, H + 2, W + 2), dtype)
    p[:, 1:-1, 1:-1] = x
    return p[:, 2:, 1:-1] - p[:, :-2, 1:-1], p[:, 1:-1, 2:] - p[:, 1:-1, :-2]


def _unit_float64(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype.kind in "ui":
        return images.astype(np.float64) / np.iinfo(images.dtype).max
    return images.astype(np.float64)


def _jit() -> ModuleType:
    """:mod:`pipeline.jit` (the compiled loops), imported on first use: see that module."""
    from pipeline import jit

    return jit


def _to_lanes(a: np.ndarray) -> np.ndarray:
    """(n, ...) -> (..., n) C-contiguous float32."""
    return np.ascontiguousarray(np.moveaxis(a, 0, -1), dtype=np.float32)


def _hard_channels(g_row: np.ndarray, g_col: np.ndarray, *, bins: int, signed: bool) -> np.ndarray:
    """Gradient magnitude in its hard orientation bin: (n, bins, H, W) float32.

    Follows skimage exactly: degrees in float64 (pass float64 gradients), so that an angle
    on a bin boundary (45 degrees is common in digits) falls in the upper bin as documented.
    """
    n, H, W = g_row.shape
    mag = np.sqrt(g_row * g_row + g_col * g_col).astype(np.float32)
    deg = np.rad2deg(np.arctan2(g_row, g_col, dtype=np.float64))
    period = 360.0 if signed else 180.0
    if signed:
        deg += 180.0
    b = np.floor(np.mod(deg, period) * (bins / period)).astype(np.intp)
    b[b >= bins] -= bins
    out = np.zeros((n, bins, H, W), np.float32)
    np.put_along_axis(out, b[:, None], mag[:, None], axis=1)
    return out


def orientation_channels(
    g_row: np.ndarray, g_col: np.ndarray, *, bins: int, signed: bool, soft_bins: bool
) -> np.ndarray:
    """Gradient magnitude split into ``bins`` orientation channels, shape (n, bins, H, W).

    Bin ``i`` covers angles ``[i, i + 1) * period / bins`` (period 360 degrees starting at
    -180 when ``signed``, else 180 starting at 0; the angle is ``arctan2(g_row, g_col)``).
    With ``soft_bins`` the magnitude is shared linearly between the two bins whose centres
    are nearest, wrapping around.
    """
    if not soft_bins:
        return _hard_channels(
            np.asarray(g_row, np.float64), np.asarray(g_col, np.float64), bins=bins, signed=signed
        )
    B = bins if signed else 2 * bins
    lanes = _jit().soft_bins_lanes(_to_lanes(g_row), _to_lanes(g_col), B, 1)
    return np.moveaxis(lanes if signed else _unsign(lanes, bins), -1, 0)


def _unsign(lanes: np.ndarray, bins: int) -> np.ndarray:
    """Soft unsigned channels (bins, ...) from signed ones with twice the bins (2 * bins, ...).

    Signed soft bin ``k`` is centred at ``-180 + (k + 0.5) * 360 / (2 * bins)`` degrees;
    bins ``k`` and ``k + bins`` are 180 degrees apart and both centres fall on the unsigned
    centre ``(k + 0.5) * 180 / bins``, so linear interpolation between neighbouring signed
    bins folds into linear interpolation between neighbouring unsigned ones.
    """
    return lanes[:bins] + lanes[bins:]


def _fine_cells(lanes: np.ndarray) -> np.ndarray:
    """Sums over 2x2-pixel cells of lanes channels (S, H, W, n) -> (S, ceil(H/2), ceil(W/2), n)."""
    S, H, W, n = lanes.shape
    if H % 2 or W % 2:
        lanes = np.pad(lanes, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))
    return lanes.reshape(S, (H + 1) // 2, 2, (W + 1) // 2, 2, n).sum(axis=(2, 4))


#: Per-thread cache of orientation channels, keyed by the image batch; active inside
#: :func:`shared_orientations` only.
_SHARED: ContextVar[dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] | None] = ContextVar(
    "hog_shared_orientations", default=None
)


@contextmanager
def shared_orientations() -> Iterator[None]:
    """Within this block, HOG families on the same image batch share gradients and
    orientation channels (e.g. two cell sizes, signed and unsigned): computed once, pooled
    twice. Feature extraction of one batch runs inside it."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def _orientation_lanes(
    images: np.ndarray, *, bins: int, signed: bool, soft_bins: bool, fine: bool
) -> np.ndarray:
    """Orientation channels of a batch as lanes, (bins, Hs, Ws, n); with ``fine`` summed over
    2x2-pixel cells (4x cheaper triangle pooling)."""
    cache = _SHARED.get()
    # Soft unsigned channels fold from signed ones with twice the bins (:func:`_unsign`):
    # cache those, so HOG at several scales, signed and unsigned, shares one pass.
    fold = soft_bins and not signed
    key = (id(images), images.shape, 2 * bins if fold else bins, soft_bins, fine, signed or fold)
    if cache is not None and key in cache and cache[key][0] is images:
        lanes = cache[key][1]
    else:
        if soft_bins:
            x = np.ascontiguousarray(to_unit_float(images))
            lanes = _jit().soft_bins_images(x, key[2], 2 if fine else 1)
        else:
            g64 = gradients(images, dtype=np.float64)
            lanes = _to_lanes(_hard_channels(*g64, bins=bins, signed=signed))
            if fine:
                lanes = _fine_cells(lanes)
        if cache is not None:
            cache[key] = (images, lanes)  # holding `images` keeps its id unique meanwhile
    return _unsign(lanes, bins) if fold else lanes


@lru_cache(maxsize=64)
def pooling_matrix(size: int, cell: int, spatial: str) -> np.ndarray:
    """Weights that pool one axis into cells: (cells, size) for box, (cells, ceil(size/2))
    for triangle.

    ``box``: each cell averages its ``cell`` pixels (a remainder at the end is dropped, as
    in skimage). ``triangle``: applied to 2x2-pixel fine cells (centres at 1, 3, 5, ...
    pixels), weight ``1 - |centre_fine - centre_cell| / cell``, so each fine cell is shared
    linearly between the two nearest cell centres (bilinear spatial interpolation). Both
    are scaled by ``1 / cell``.
    """
    if cell < 1:
        raise ValueError(f"expected a cell size >= 1 pixel, got {cell}")
    cells = size // cell
    if cells < 1:
        raise ValueError(f"expected a cell size <= {size}, got {cell}")
    centres = (np.arange(cells) + 0.5) * cell
    if spatial == "box":
        x = np.arange(size) + 0.5
        weights = (np.abs(x[None, :] - centres[:, None]) < cell / 2).astype(np.float64)
    elif spatial == "triangle":
        x = np.arange((size + 1) // 2) * 2 + 1.0
        weights = np.maximum(0.0, 1.0 - np.abs(x[None, :] - centres[:, None]) / cell)
    else:
        raise ValueError(f"expected spatial pooling in {SPATIAL}, got {spatial!r}")
    return (weights / cell).astype(np.float32)


def cell_histograms(
    images: np.ndarray,
    *,
    cell: int,
    bins: int,
    signed: bool = False,
    soft_bins: bool = True,
    spatial: str = "triangle",
) -> np.ndarray:
    """Orientation histograms of each cell, shape (n, cells_y, cells_x, bins) float32."""
    return np.moveaxis(_cell_lanes(images, cell, bins, signed, soft_bins, spatial), -1, 0)


def _cell_lanes(
    images: np.ndarray, cell: int, bins: int, signed: bool, soft_bins: bool, spatial: str
) -> np.ndarray:
    """:func:`cell_histograms` as lanes (cy, cx, bins, n)."""
    if bins < 2:
        raise ValueError(f"expected at least 2 orientation bins, got {bins}")
    images = np.asarray(images)
    _, H, W = images.shape
    my = pooling_matrix(H, cell, spatial)
    mx = pooling_matrix(W, cell, spatial)
    fine = spatial == "triangle"
    lanes = _orientation_lanes(images, bins=bins, signed=signed, soft_bins=soft_bins, fine=fine)
    return _jit().pool_lanes(np.ascontiguousarray(lanes), my, mx)


def normalize_blocks(
    hist: np.ndarray, *, block: int = 2, norm: str = "l2-hys", eps: float = 1e-5
) -> np.ndarray:
    """Group cells into overlapping ``block x block`` blocks and normalise each.

    Output order is skimage's: block row, block column, cell row, cell column, bin.
    ``block=0`` skips grouping (normalisation over the whole descriptor when ``norm`` is
    not ``"none"``).

    Returns
    -------
    ndarray, shape (n, k) float32
    """
    return _normalize_lanes(_to_lanes(hist), block, norm, eps, 1.0)


def _normalize_lanes(
    hist: np.ndarray, block: int, norm: str, eps: float, power: float
) -> np.ndarray:
    """:func:`normalize_blocks` of lanes histograms (cy, cx, B, n), after raising them to
    ``power``: descriptors (n, K)."""
    if norm not in NORMS:
        raise ValueError(f"expected norm in {NORMS}, got {norm!r}")
    cy, cx = hist.shape[:2]
    if block != 0 and not 1 <= block <= min(cy, cx):
        raise ValueError(f"expected 1 <= block <= {min(cy, cx)} cells, got {block}")
    if power <= 0:
        raise ValueError(f"expected power > 0, got {power}")
    if eps <= 0:
        raise ValueError(f"expected eps > 0 (blank blocks would divide by zero), got {eps}")
    return _jit().blocks_lanes(hist, block, _NORM_ROUNDS[norm], eps, power)


def hog_features(
    images: np.ndarray,
    *,
    cell: int = 7,
    bins: int = 9,
    signed: bool = False,
    block: int = 2,
    soft_bins: bool = True,
    spatial: str = "triangle",
    norm: str = "l2-hys",
    eps: float = 1e-5,
    power: float = 1.0,
) -> np.ndarray:
    """HOG descriptor of each image.

    Parameters
    ----------
    images : ndarray, shape (n, H, W)
        Integer images or floats in [0, 1].
    cell : int
        Cell side in pixels.
    bins : int
        Orientation bins over 180 degrees (unsigned) or 360 (``signed``).
    block : int
        Block side in cells (blocks overlap by all but one cell); 0 for no blocks.
    soft_bins, spatial, norm, eps
        See the module docstring, :func:`orientation_channels`, :func:`pooling_matrix`
        and :func:`normalize_blocks`.
    power : float
        Cell histograms are raised to this power before block normalisation; 0.5 (square
        root, the Hellinger kernel of "RootSIFT") damps dominant strokes and is worth
        about 0.2 points of MNIST accuracy for a linear model.

    Returns
    -------
    ndarray, shape (n, by * bx * block * block * bins), float32
    """
    hist = _cell_lanes(images, cell, bins, signed, soft_bins, spatial)
    return _normalize_lanes(hist, block, norm, eps, power)
