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

from functools import lru_cache

import numpy as np

from pipeline.preprocess import to_unit_float

NORMS = ("l2-hys", "l2", "none")
SPATIAL = ("box", "triangle")


def gradients(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Central-difference gradients ``(g_row, g_col)``, zero outside the image.

    ``g_row[r, c] = I[r+1, c] - I[r-1, c]``, ``g_col[r, c] = I[r, c+1] - I[r, c-1]``.
    """
    x = to_unit_float(images)
    n, H, W = x.shape
    p = np.zeros((n, H + 2, W + 2), np.float32)
    p[:, 1:-1, 1:-1] = x
    return p[:, 2:, 1:-1] - p[:, :-2, 1:-1], p[:, 1:-1, 2:] - p[:, 1:-1, :-2]


def orientation_channels(
    g_row: np.ndarray, g_col: np.ndarray, *, bins: int, signed: bool, soft_bins: bool
) -> np.ndarray:
    """Gradient magnitude split into ``bins`` orientation channels, shape (n, H, W, bins).

    Bin ``i`` covers angles ``[i, i + 1) * period / bins`` (period 360 degrees when
    ``signed``, else 180). With ``soft_bins`` the magnitude is shared linearly between the
    two bins whose centres are nearest, wrapping around.
    """
    mag = np.hypot(g_row, g_col)
    period = 2 * np.pi if signed else np.pi
    pos = np.mod(np.arctan2(g_row, g_col), period) * np.float32(bins / period)
    n, H, W = mag.shape
    out = np.zeros((n * H * W, bins), np.float32)
    rows = np.arange(n * H * W)
    if soft_bins:
        pos -= np.float32(0.5)
        lower = np.floor(pos)
        w_upper = (pos - lower).ravel()
        lo = lower.astype(np.intp).ravel() % bins
        m = mag.ravel()
        out[rows, lo] = m * (1 - w_upper)
        out[rows, (lo + 1) % bins] += m * w_upper
    else:
        idx = np.minimum(pos.astype(np.intp), bins - 1).ravel()
        out[rows, idx] = mag.ravel()
    return out.reshape(n, H, W, bins)


@lru_cache(maxsize=64)
def pooling_matrix(size: int, cell: int, spatial: str) -> np.ndarray:
    """Weights (cells, size) that pool pixels into cells along one axis.

    ``box``: each cell averages its ``cell`` pixels (a remainder at the end is dropped, as
    in skimage). ``triangle``: weight ``1 - |x - centre| / cell``, so each pixel is shared
    linearly between the two nearest cell centres; normalised to the same scale as box.
    """
    cells = size // cell
    if cells < 1:
        raise ValueError(f"expected a cell size <= {size}, got {cell}")
    x = np.arange(size) + 0.5
    centres = (np.arange(cells) + 0.5) * cell
    if spatial == "box":
        weights = (np.abs(x[None, :] - centres[:, None]) < cell / 2).astype(np.float64)
    elif spatial == "triangle":
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
    g_row, g_col = gradients(images)
    ch = orientation_channels(g_row, g_col, bins=bins, signed=signed, soft_bins=soft_bins)
    n, H, W, B = ch.shape
    my = pooling_matrix(H, cell, spatial)
    mx = pooling_matrix(W, cell, spatial)
    # Pool rows with one matmul over (n, H, W*B), then columns: both run in BLAS.
    rows = np.matmul(my, ch.reshape(n, H, W * B)).reshape(n, my.shape[0], W, B)
    return np.einsum("xw,nywb->nyxb", mx, rows, optimize=True)


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
    if norm not in NORMS:
        raise ValueError(f"expected norm in {NORMS}, got {norm!r}")
    n, cy, cx, B = hist.shape
    if block == 0:
        blocks = hist.reshape(n, 1, -1)
    else:
        if not 1 <= block <= min(cy, cx):
            raise ValueError(f"expected 1 <= block <= {min(cy, cx)} cells, got {block}")
        win = np.lib.stride_tricks.sliding_window_view(hist, (block, block), axis=(1, 2))
        # (n, by, bx, B, block, block) -> (n, by*bx, block*block*B) in skimage's order
        blocks = win.transpose(0, 1, 2, 4, 5, 3).reshape(n, -1, block * block * B)
    if norm == "none":
        return np.ascontiguousarray(blocks, dtype=np.float32).reshape(n, -1)
    e2 = np.float32(eps * eps)
    out = blocks / np.sqrt((blocks * blocks).sum(-1, keepdims=True) + e2)
    if norm == "l2-hys":
        np.minimum(out, np.float32(0.2), out=out)
        out /= np.sqrt((out * out).sum(-1, keepdims=True) + e2)
    return out.astype(np.float32, copy=False).reshape(n, -1)


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

    Returns
    -------
    ndarray, shape (n, by * bx * block * block * bins), float32
    """
    hist = cell_histograms(
        images, cell=cell, bins=bins, signed=signed, soft_bins=soft_bins, spatial=spatial
    )
    return normalize_blocks(hist, block=block, norm=norm, eps=eps)
