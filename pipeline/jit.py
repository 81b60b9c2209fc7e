"""The compiled (numba) inner loops of the HOG and deskew kernels.

Imported by :mod:`pipeline.extract` (which runs them) and otherwise on first use by
:mod:`pipeline.hog` and :mod:`pipeline.preprocess`: numba costs about 0.15 s and 90 MB
per process, which jobs that never run a kernel (train, the CLI itself) should not pay.
Functions are ``nogil`` (dask threads run them in parallel) and cached on disk (compiled
once per installation).

Most loops work on "lanes": arrays with the image index last, so that every inner loop
runs over the images of a batch with unit stride and vectorizes. No fastmath where a loop
runs over the batch: a vectorized loop body and its scalar remainder must round
identically, or an image's result would depend on the batch size (tested).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_PI = np.float32(np.pi)
_HALF_PI = np.float32(np.pi / 2)
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
# Minimax polynomial of atan(a) / a in a * a on [0, 1] (error below 2.5e-7 rad, about one
# float32 ulp of pi): unlike libm's atan2f it vectorizes, and soft binning is continuous
# in the angle, so the error moves weights by ~1e-7.
_ATAN = tuple(
    np.float32(c)
    for c in (
        0.00282363896258175373077393,
        -0.0159569028764963150024414,
        0.0425049886107444763183594,
        -0.0748900920152664184570312,
        0.106347933411598205566406,
        -0.142027363181114196777344,
        0.199926957488059997558594,
        -0.333331018686294555664062,
    )
)
_A0, _A1, _A2, _A3, _A4, _A5, _A6, _A7 = _ATAN


@njit(inline="always", nogil=True, cache=True)
def atan2(y: np.float32, x: np.float32) -> np.float32:  # pragma: no cover - compiled
    """float32 ``arctan2(y, x)`` in [-pi, pi], within 2.5e-7 rad of numpy's; vectorizes."""
    ax = abs(x)
    ay = abs(y)
    hi = max(ax, ay)
    lo = min(ax, ay)
    a = lo / hi if hi > _ZERO else _ZERO
    s = a * a
    p = ((((((_A0 * s + _A1) * s + _A2) * s + _A3) * s + _A4) * s + _A5) * s + _A6) * s + _A7
    r = p * s * a + a
    r = _HALF_PI - r if ay > ax else r
    r = _PI - r if x < _ZERO else r
    return -r if y < _ZERO else r


@njit(inline="always", nogil=True, cache=True)
def add_soft(
    out: np.ndarray,
    ro: int,
    co: int,
    gr: np.ndarray,
    gc: np.ndarray,
    mag: np.ndarray,
    pos: np.ndarray,
) -> None:  # pragma: no cover - compiled
    """Add one pixel's gradients (gr, gc; one per lane) to the soft orientation bins of
    cell (ro, co) of lanes ``out`` (bins, Ho, Wo, n); ``mag`` and ``pos`` are scratch."""
    bins = out.shape[0]
    n = out.shape[3]
    scale = np.float32(bins / (2 * np.pi))
    half_turn = np.float32(bins / 2)
    full_turn = np.float32(bins)
    for i in range(n):
        mag[i] = np.sqrt(gr[i] * gr[i] + gc[i] * gc[i])
        pos[i] = (atan2(gr[i], gc[i]) + _PI) * scale  # in [0, bins]
    for b in range(bins):
        centre = np.float32(b) + _HALF
        for i in range(n):
            d = pos[i] - centre  # distance to bin b's centre, wrapped around
            d = d + full_turn if d < -half_turn else d
            d = d - full_turn if d > half_turn else d
            w = _ONE - abs(d)
            out[b, ro, co, i] += mag[i] * (w if w > _ZERO else _ZERO)


@njit(nogil=True, cache=True)
def soft_bins_lanes(
    g_row: np.ndarray, g_col: np.ndarray, bins: int, step: int
) -> np.ndarray:  # pragma: no cover - compiled
    """Soft signed orientation binning of lanes gradients (H, W, n) float32, summed over
    ``step x step`` pixel cells: (bins, ceil(H/step), ceil(W/step), n) float32."""
    H, W, n = g_row.shape
    out = np.zeros((bins, (H + step - 1) // step, (W + step - 1) // step, n), np.float32)
    mag = np.empty(n, np.float32)
    pos = np.empty(n, np.float32)
    for r in range(H):
        for c in range(W):
            add_soft(out, r // step, c // step, g_row[r, c], g_col[r, c], mag, pos)
    return out


@njit(nogil=True, cache=True)
def soft_bins_images(x: np.ndarray, bins: int, step: int) -> np.ndarray:  # pragma: no cover
    """:func:`soft_bins_lanes` of the central-difference gradients of images x (n, H, W)
    float32, computed on the fly from a zero-padded lanes copy."""
    n, H, W = x.shape
    p = np.zeros((H + 2, W + 2, n), np.float32)
    for r in range(H):
        for c in range(W):
            for i in range(n):
                p[r + 1, c + 1, i] = x[i, r, c]
    out = np.zeros((bins, (H + step - 1) // step, (W + step - 1) // step, n), np.float32)
    gr = np.empty(n, np.float32)
    gc = np.empty(n, np.float32)
    mag = np.empty(n, np.float32)
    pos = np.empty(n, np.float32)
    for r in range(H):
        for c in range(W):
            for i in range(n):
                gr[i] = p[r + 2, c + 1, i] - p[r, c + 1, i]
                gc[i] = p[r + 1, c + 2, i] - p[r + 1, c, i]
            add_soft(out, r // step, c // step, gr, gc, mag, pos)
    return out


@njit(nogil=True, cache=True)
def pool_lanes(
    channels: np.ndarray, my: np.ndarray, mx: np.ndarray
) -> np.ndarray:  # pragma: no cover - compiled
    """Separable pooling of lanes channels (S, Hs, Ws, n) with weights ``my`` (cy, Hs) and
    ``mx`` (cx, Ws): (cy, cx, S, n) float32, summed in a fixed order."""
    S, Hs, Ws, n = channels.shape
    cy = my.shape[0]
    cx = mx.shape[0]
    cols = np.zeros((S, Hs, cx, n), np.float32)
    for s in range(S):
        for h in range(Hs):
            for j in range(cx):
                for w in range(Ws):
                    weight = mx[j, w]
                    if weight != _ZERO:
                        for i in range(n):
                            cols[s, h, j, i] += weight * channels[s, h, w, i]
    out = np.zeros((cy, cx, S, n), np.float32)
    for k in range(cy):
        for h in range(Hs):
            weight = my[k, h]
            if weight != _ZERO:
                for j in range(cx):
                    for s in range(S):
                        for i in range(n):
                            out[k, j, s, i] += weight * cols[s, h, j, i]
    return out


@njit(nogil=True, cache=True)
def blocks_lanes(
    hist: np.ndarray, block: int, rounds: int, eps: float, power: float
) -> np.ndarray:  # pragma: no cover - compiled
    """Lanes cell histograms (cy, cx, B, n) -> block descriptors (n, K) float32.

    ``rounds`` of L2 normalisation: 0 none, 1 L2, 2 L2-Hys (the second after clipping at
    0.2); ``block`` 0 is one block of all cells. Histograms are raised to ``power`` first.
    Each block is normalised in lanes, then written out image by image (contiguous rows).
    """
    cy, cx, B, n = hist.shape
    if block == 0:
        by, bx, sy, sx = 1, 1, cy, cx
    else:
        by, bx, sy, sx = cy - block + 1, cx - block + 1, block, block
    d = sy * sx * B
    out = np.empty((n, by * bx * d), np.float32)
    e2 = np.float32(eps * eps)
    clip = np.float32(0.2)
    p = np.float32(power)
    ss = np.empty(n, np.float32)
    v = np.empty((d, n), np.float32)
    for y in range(by):
        for x in range(bx):
            k = 0
            for u in range(sy):
                for w in range(sx):
                    for b in range(B):
                        for i in range(n):
                            h = hist[y + u, x + w, b, i]
                            if power == 0.5:
                                h = np.sqrt(h)
                            elif power != 1.0:
                                h = h**p
                            v[k, i] = h
                        k += 1
            for rnd in range(rounds):
                ss[:] = _ZERO
                for k in range(d):
                    for i in range(n):
                        if rnd == 1:  # L2-Hys: clip, then normalise again
                            v[k, i] = min(v[k, i], clip)
                        ss[i] += v[k, i] * v[k, i]
                for i in range(n):
                    ss[i] = _ONE / np.sqrt(ss[i] + e2)
                for k in range(d):
                    for i in range(n):
                        v[k, i] *= ss[i]
            base = (y * bx + x) * d
            for i in range(n):
                for k in range(d):
                    out[i, base + k] = v[k, i]
    return out


# reassoc lets the row sums vectorize; each image's sums still run in one fixed order
# whatever the batch (and are exact in float64 for 8-bit images).
@njit(nogil=True, cache=True, fastmath={"reassoc"})
def moments(x: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """(n, H, W) float32 -> (n, 6) float64: mass, cy, cx, mu20, mu02, mu11 (see
    :func:`image_moments`). Per-image sums in float64, never a reduction across the batch."""
    n, H, W = x.shape
    out = np.empty((n, 6), np.float64)
    for i in range(n):
        m = sy = sx = syy = sxx = sxy = 0.0
        for r in range(H):
            row = 0.0
            row_x = 0.0
            row_xx = 0.0
            for c in range(W):
                v = np.float64(x[i, r, c])
                row += v
                row_x += v * c
                row_xx += v * (c * c)
            m += row
            sy += row * r
            syy += row * (r * r)
            sx += row_x
            sxy += row_x * r
            sxx += row_xx
        if m > 1e-6:
            cy = sy / m
            cx = sx / m
            out[i] = (m, cy, cx, syy / m - cy * cy, sxx / m - cx * cx, sxy / m - cy * cx)
        else:
            out[i] = (m, (H - 1) / 2, (W - 1) / 2, 0.0, 0.0, 0.0)
    return out


@njit(nogil=True, cache=True)
def deskew_rows(x: np.ndarray, m: np.ndarray, center: bool) -> np.ndarray:  # pragma: no cover
    """Body of :func:`pipeline.preprocess.deskew`: each row of x (n, H, W) float32 shifted
    by linear interpolation; ``m`` (n, 6) from :func:`moments`."""
    n, H, W = x.shape
    out = np.zeros((n, H, W), np.float32)
    for i in range(n):
        cy = m[i, 1]
        mu20 = m[i, 3]
        slant = m[i, 5] / mu20 if mu20 > 1e-2 else 0.0
        dy = int(np.rint(cy - (H - 1) / 2)) if center else 0
        dx = m[i, 2] - (W - 1) / 2 if center else 0.0
        for r in range(H):
            src = r + dy
            if src < 0 or src > H - 1:
                continue  # the row comes from outside the image: stays 0
            shift = np.float32(min(max(slant * (src - cy) + dx, -(W + 1.0)), W + 1.0))
            whole = np.floor(shift)
            frac = shift - whole
            k = int(whole)
            for c in range(W):
                j = c + k
                left = x[i, src, j] if 0 <= j < W else np.float32(0.0)
                right = x[i, src, j + 1] if 0 <= j + 1 < W else np.float32(0.0)
                out[i, r, c] = (right - left) * frac + left
    return out
