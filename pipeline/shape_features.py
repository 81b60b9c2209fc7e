"""Interpretable shape feature kernels: ``(n, H, W)`` images -> ``(n, k)`` float32.

Zoning densities, projection profiles, stroke crossings, moments and topology. Inputs are
float images in [0, 1] (gray or binary); each kernel is vectorized over the batch.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.preprocess import image_moments, to_unit_float

MOMENT_NAMES = (
    "ink", "centroid_y", "centroid_x", "spread_y", "spread_x", "correlation",
    "skew_y", "skew_x", "slant", "height", "width", "aspect",
)  # fmt: skip
TOPOLOGY_NAMES = ("components", "holes", "euler")


def _grid_edges(size: int, parts: int) -> np.ndarray:
    return np.linspace(0, size, parts + 1).round().astype(np.intp)


def zoning(images: np.ndarray, *, grid: int = 4) -> np.ndarray:
    """Mean intensity (ink density) in each cell of a ``grid x grid`` partition.

    Cells are as equal as the image size allows. Returns (n, grid*grid), row-major cells.
    """
    x = to_unit_float(images)
    n, H, W = x.shape
    if not 1 <= grid <= min(H, W):
        raise ValueError(f"expected 1 <= grid <= {min(H, W)}, got {grid}")
    re, ce = _grid_edges(H, grid), _grid_edges(W, grid)
    # Sum rows then columns with reduceat: two vectorized passes, any cell sizes.
    rows = np.add.reduceat(x, re[:-1], axis=1)
    cells = np.add.reduceat(rows, ce[:-1], axis=2)
    area = np.diff(re)[:, None] * np.diff(ce)[None, :]
    return (cells / area).reshape(n, -1).astype(np.float32)


def pixel_grid(images: np.ndarray, *, factor: int = 2) -> np.ndarray:
    """Down-sampled pixels: mean over ``factor x factor`` blocks. Returns (n, (H/f)*(W/f)).

    ``factor`` must divide both image sides; ``factor=1`` gives the raw pixels.
    """
    x = to_unit_float(images)
    n, H, W = x.shape
    if factor < 1 or H % factor or W % factor:
        raise ValueError(f"expected a factor dividing {H} and {W}, got {factor}")
    if factor == 1:
        return x.reshape(n, -1).copy()
    # A sum of factor**2 strided views: numpy's multi-axis mean over tiny axes is ~20x slower.
    pooled = np.zeros((n, H // factor, W // factor), np.float32)
    for dy in range(factor):
        for dx in range(factor):
            pooled += x[:, dy::factor, dx::factor]
    pooled *= np.float32(1 / factor**2)
    return pooled.reshape(n, -1)


def projection_profiles(images: np.ndarray) -> np.ndarray:
    """Horizontal then vertical projection profiles: mean ink per row and per column.

    Returns (n, H + W).
    """
    x = to_unit_float(images)
    return np.concatenate([x.mean(axis=2), x.mean(axis=1)], axis=1).astype(np.float32)


def crossings(images: np.ndarray, *, threshold: float = 0.5) -> np.ndarray:
    """Number of background-to-ink transitions along each row, then along each column.

    Pixels brighter than ``threshold`` are ink. Returns (n, H + W).
    """
    ink = to_unit_float(images) > np.float32(threshold)
    starts_row = ink[:, :, 1:] & ~ink[:, :, :-1]
    starts_col = ink[:, 1:, :] & ~ink[:, :-1, :]
    per_row = starts_row.sum(axis=2) + ink[:, :, 0]
    per_col = starts_col.sum(axis=1) + ink[:, 0, :]
    return np.concatenate([per_row, per_col], axis=1).astype(np.float32)


def moment_features(images: np.ndarray) -> np.ndarray:
    """Global shape statistics, columns as in :data:`MOMENT_NAMES`.

    ink: mean intensity; centroid_y/x: centre of mass as a fraction of height/width (0.5: centred);
    spread_y/x: standard deviation of ink position / side; correlation: mu11 / (sy sx);
    skew_y/x: third standardized moments of the row/column ink distributions; slant:
    mu11 / mu20 (columns per row, the deskew shear); height/width: ink bounding box
    as a fraction of the side; aspect: bbox height / width.
    """
    x = to_unit_float(images)
    _, H, W = x.shape
    m = image_moments(x)
    mass = m["mass"]
    safe = np.where(mass > 0, mass, 1.0)
    sy, sx = np.sqrt(np.maximum(m["mu20"], 0)), np.sqrt(np.maximum(m["mu02"], 0))
    rows = x.sum(axis=2, dtype=np.float64)
    cols = x.sum(axis=1, dtype=np.float64)
    dy = np.arange(H)[None, :] - m["cy"][:, None]
    dx = np.arange(W)[None, :] - m["cx"][:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        skew_y = np.where(sy > 0, (rows * dy**3).sum(1) / safe / sy**3, 0.0)
        skew_x = np.where(sx > 0, (cols * dx**3).sum(1) / safe / sx**3, 0.0)
        corr = np.where(sy * sx > 0, m["mu11"] / (sy * sx), 0.0)
        slant = np.where(m["mu20"] > 0, m["mu11"] / m["mu20"], 0.0)
    ink_rows, ink_cols = rows > 0, cols > 0
    height = np.where(
        ink_rows.any(1), H - ink_rows.argmax(1) - ink_rows[:, ::-1].argmax(1), 0
    ).astype(np.float64)
    width = np.where(
        ink_cols.any(1), W - ink_cols.argmax(1) - ink_cols[:, ::-1].argmax(1), 0
    ).astype(np.float64)
    aspect = np.where(width > 0, height / np.maximum(width, 1), 0.0)
    out = np.stack(
        [
            mass / (H * W),
            (m["cy"] + 0.5) / H,
            (m["cx"] + 0.5) / W,
            sy / H,
            sx / W,
            corr,
            skew_y,
            skew_x,
            slant,
            height / H,
            width / W,
            aspect,
        ],
        axis=1,
    )
    return out.astype(np.float32)


# Bit-quad patterns (Gray 1971) for the Euler number of 8-connected foreground.
def _quad_counts(ink: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.pad(ink, ((0, 0), (1, 1), (1, 1)))
    a, b = p[:, :-1, :-1].astype(np.int8), p[:, :-1, 1:].astype(np.int8)
    c, d = p[:, 1:, :-1].astype(np.int8), p[:, 1:, 1:].astype(np.int8)
    s = a + b + c + d
    q1 = (s == 1).sum(axis=(1, 2))
    q3 = (s == 3).sum(axis=(1, 2))
    diagonal = (s == 2) & (a == d)  # the two set pixels touch only at a corner
    return q1, q3, diagonal.sum(axis=(1, 2))


def euler_number(ink: np.ndarray) -> np.ndarray:
    """Euler number (components - holes) of each 8-connected binary image, shape (n,)."""
    q1, q3, qd = _quad_counts(np.asarray(ink, dtype=bool))
    return (q1 - q3 - 2 * qd) // 4


def component_count(ink: np.ndarray) -> np.ndarray:
    """Number of 8-connected ink components in each binary image, shape (n,).

    One ``scipy.ndimage.label`` call over the whole batch (images separated by a blank
    row): labels are assigned in raster order, so each image's labels form a contiguous
    range and its count is a difference of running maxima.
    """
    ink = np.asarray(ink, dtype=bool)
    n, H, W = ink.shape
    stacked = np.zeros((n, H + 1, W), dtype=bool)
    stacked[:, :H] = ink
    labels, _ = ndimage.label(stacked.reshape(n * (H + 1), W), structure=np.ones((3, 3)))
    top = labels.reshape(n, -1).max(axis=1)
    running = np.maximum.accumulate(top)
    return np.diff(running, prepend=0)


def topology(images: np.ndarray, *, threshold: float = 0.5) -> np.ndarray:
    """Components, holes and Euler number of the ink (pixels > ``threshold``).

    Holes are background regions enclosed by ink (4-connected background, the dual of
    8-connected ink): ``holes = components - euler``. A clean 8 has 1 component, 2 holes.
    Returns (n, 3) in the order of :data:`TOPOLOGY_NAMES`.
    """
    ink = to_unit_float(images) > np.float32(threshold)
    comps = component_count(ink)
    euler = euler_number(ink)
    return np.stack([comps, comps - euler, euler], axis=1).astype(np.float32)
