"""Robust normalization of any digit picture to MNIST's 28x28 format (kernels, no I/O).

Arrays in, arrays out; every step is a whole-array numpy/scipy.ndimage operation (running
min/max and box filters, labelling, distance transforms), never a per-pixel Python loop.
:func:`normalize_picture` runs the steps in order:

1. **Work size.** The picture is resampled so its longer side is between
   :data:`WORK_MIN` and :data:`WORK_MAX` px (area averaging down, bilinear up), so every
   scale below is a fixed fraction of the picture and the cost is bounded.
2. **Denoise** at the scale of sensor/JPEG noise and paper fibre (a Gaussian of about one
   source pixel), far below stroke width.
3. **Polarity** (:func:`ink_is_light`): light ink (chalk on a board) is inverted, so dark
   and light ink share one code path.
4. **Flatten the light** (:func:`flatten_background`): the page's light is a grey closing
   with a window of :data:`BACKGROUND_WINDOW` of the picture, wider than any stroke, so
   graded light and shadows stay in it and the ink does not; ink strength is the relative
   darkening ``(light - x) / light``, which undoes multiplicative illumination.
5. **Threshold** (:func:`otsu_threshold`, identical to ``skimage.filters.threshold_otsu``)
   on the flattened picture; too little contrast between the classes is a blank picture.
6. **Lines** (:func:`remove_lines`): long straight runs of ink are ruled lines, page
   edges or form boxes, not a digit; they are removed and the strokes they crossed are
   bridged again.
7. **Components** (:func:`select_digit`): the main stroke mass (marks touching the border
   count less) plus the pieces near it at stroke scale; specks and far marks are dropped.
   No digit, or a second digit-sized mark far away, is an error (a status), not a guess.
8. **Stroke width** (:func:`stroke_width`, :func:`normalize_stroke_width`): the digit is
   drawn as a binary shape at 4x the final size, and a marker is thinned or a thin pen
   thickened (distance transforms) toward MNIST's width.
9. **MNIST layout**: the box's longer side is scaled to 20 px with anti-aliasing and the
   centre of mass placed at the centre of the 28x28 field (as :mod:`pipeline.images`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from pipeline.errors import DigitNotFoundError

#: Longer side of the working copy, px: smaller pictures are enlarged to WORK_MIN,
#: larger ones reduced to WORK_MAX.
WORK_MIN = 128
WORK_MAX = 384
#: Window of the page-light estimate, as a fraction of the working copy's longer side:
#: wider than the widest marker stroke, narrower than a shadow.
BACKGROUND_WINDOW = 0.25
#: The page's light is estimated on a copy this many times smaller (area averaged).
LIGHT_REDUCE = 4
#: The page's light is never taken below this (no division by black pixels).
MIN_LIGHT = 0.05
#: Ink weaker than this (relative darkening, class means apart) means a blank picture.
MIN_CONTRAST = 0.1
#: A run of ink this long (fraction of the picture's width or height) is a ruled line or
#: a page edge; :data:`BOX_LINE` for the sides of a form box (two parallel pairs).
RULED_LINE = 0.9
BOX_LINE = 0.6
#: How far (px of the working copy) line pixels are bridged when ink lies on both sides.
LINE_BRIDGE = 6
#: Components touching the picture's border weigh this much when the main one is chosen.
BORDER_WEIGHT = 0.2
#: The digit's box must span at least this fraction of the working copy's longer side.
MIN_DIGIT = 0.04
#: Pieces within ``NEAR_STROKES * stroke width`` (or ``NEAR_BOX`` of the digit's size) of
#: the main mass belong to the digit; smaller than ``MIN_PIECE`` of its area they only do
#: when inside its box (a speck just outside would widen the crop).
NEAR_STROKES = 1.5
NEAR_BOX = 0.2
MIN_PIECE = 0.03
#: A mark with this share of the main mass and this share of its size is digit-sized:
#: within ``FAR`` times the digit's size of it, a broken piece of it; farther, a second
#: digit.
SECOND_DIGIT_MASS = 0.35
SECOND_DIGIT_SIZE = 0.5
FAR = 0.6
#: Rounds of growing the digit piece by piece (a stroke broken into a chain of pieces).
CHAIN_ROUNDS = 4
#: Specks narrower than this share of the stroke width are opened away from the digit.
SPECK_OPEN = 0.3
#: Final layout: digit box and the drawing scale used for the binary shape.
BOX = 20
SHAPE_SCALE = 4
#: MNIST's stroke width in px of the 28x28 field (median of :func:`stroke_width` on the
#: first 2,000 training digits drawn at 4x: 2.5; 10th-90th percentile 1.8-3.6). Widths
#: outside [THIN, THICK] are moved to THIN_TARGET / THICK_TARGET.
MNIST_STROKE = 2.5
THIN, THIN_TARGET = 1.8, 2.2
THICK, THICK_TARGET = 3.4, 2.8
#: Thinning never removes strokes narrower than this share of the median width.
KEEP_STROKES = 0.7
MNIST_SHAPE = (28, 28)
MNIST_CENTER = (14.0, 14.0)

_EIGHT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class Steps:
    """Intermediate results of :func:`normalize_picture` (for tests and figures).

    ``work`` (denoised working copy), ``flat`` (ink strength, float32 in [0, 1]), ``mask``
    (ink after line removal), ``lines`` (removed line pixels) and ``digit`` (the chosen
    components) are (h, w) arrays of the working copy; ``light_ink`` the polarity;
    ``threshold`` Otsu's on ``flat``; ``stroke`` the digit's stroke width before
    adjustment (px of the 28x28 field); ``shape`` the binary digit drawn at
    :data:`SHAPE_SCALE` x; ``out`` the (28, 28) uint8 result.
    """

    work: np.ndarray
    light_ink: bool
    flat: np.ndarray
    threshold: float
    mask: np.ndarray
    lines: np.ndarray
    digit: np.ndarray
    stroke: float
    shape: np.ndarray
    out: np.ndarray


# --------------------------------------------------------------------------- kernels


def check_finite(gray: np.ndarray) -> None:
    """Raise :class:`DigitNotFoundError` when a float image has NaN or infinite pixels."""
    if gray.dtype.kind == "f":
        bad = gray.size - int(np.count_nonzero(np.isfinite(gray)))
        if bad:
            raise DigitNotFoundError(
                f"expected finite pixel values, got {bad} NaN or infinite pixel(s)"
            )


def to_work_size(gray: np.ndarray) -> tuple[np.ndarray, float]:
    """Resample ``gray`` (H, W) float32 [0, 1] so its longer side is in [WORK_MIN, WORK_MAX].

    Returns the working copy (float32) and the factor applied (new px per source px).
    """
    h, w = gray.shape
    side = max(h, w)
    if WORK_MIN <= side <= WORK_MAX:
        return gray, 1.0
    f = (WORK_MAX if side > WORK_MAX else WORK_MIN) / side
    size = (max(1, round(w * f)), max(1, round(h * f)))
    # BOX averages the covered source pixels (no aliasing of noise when reducing).
    method = Image.Resampling.BOX if f < 1 else Image.Resampling.BILINEAR
    out = Image.fromarray(np.ascontiguousarray(gray, np.float32)).resize(size, method)
    return np.asarray(out, np.float32), f


def page_light(x: np.ndarray, *, window: int) -> np.ndarray:
    """The page's light under dark ink: a grey closing (running max, then running min) with
    a ``window`` px square, computed on a copy reduced :data:`LIGHT_REDUCE` times by area
    averaging (which also averages sensor noise away, so the max does not pick noise
    peaks) and enlarged back bilinearly (smooth, no blocks).

    Parameters
    ----------
    x : ndarray, shape (h, w), float32 in [0, 1]
    window : int

    Returns
    -------
    ndarray, shape (h, w), float32, >= :data:`MIN_LIGHT`
    """
    h, w = x.shape
    k = LIGHT_REDUCE if min(h, w) >= 8 * LIGHT_REDUCE else 1
    small = x if k == 1 else _resize(x, (max(1, w // k), max(1, h // k)), Image.Resampling.BOX)
    win = max(3, round(window / k))
    # Pad first: the min stage must see the max of windows reaching past the edge, else a
    # gradient darkening toward the edge is overestimated there (and read as ink).
    r = win // 2 + 1
    padded = np.pad(small, r, mode="edge")
    closed = ndi.minimum_filter(ndi.maximum_filter(padded, size=win), size=win)[r:-r, r:-r]
    light = closed if k == 1 else _resize(closed, (w, h), Image.Resampling.BILINEAR)
    return np.maximum(light, np.float32(MIN_LIGHT))


def _border_ring(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])


def ink_is_light(x: np.ndarray) -> bool:
    """Whether the ink is lighter than the page (chalk on a board, white on black).

    Light ink needs a dark page (median of the outermost ring below half) whose bright
    tail is farther from it than its dark tail, in *ratios* (light is multiplicative: a
    dim photo of paper has a darkish ring and brighter paper elsewhere, but its ink is
    darker than the ring by a larger factor than the paper is brighter). Tails are the
    0.5th and 99.5th percentiles (of every other pixel).

    Parameters
    ----------
    x : ndarray, shape (h, w), float32 in [0, 1]
    """
    page = float(np.median(_border_ring(x)))
    if page >= 0.5:
        return False
    lo, hi = np.quantile(x[::2, ::2], (0.005, 0.995))
    eps = 1 / 255
    return bool(float(hi) / max(page, eps) > max(page, eps) / max(float(lo), eps))


def flatten_background(x: np.ndarray, *, window: int) -> np.ndarray:
    """Ink strength of dark ink on light paper under uneven light.

    Parameters
    ----------
    x : ndarray, shape (h, w), float32 in [0, 1]
        Dark ink on light paper.
    window : int
        Side of the square window of the page-light estimate (:func:`page_light`); wider
        than any stroke.

    Returns
    -------
    ndarray, shape (h, w), float32 in [0, 1]
        ``(light - x) / light``: 0 on paper, near 1 on black ink; relative darkening
        undoes multiplicative light (gradients, shadows).
    """
    light = page_light(x, window=window)
    flat = (light - x) / light
    return np.clip(flat, 0.0, 1.0, out=flat).astype(np.float32, copy=False)


def otsu_threshold(values: np.ndarray, *, nbins: int = 256) -> float:
    """Otsu's threshold of ``values``: the same computation as
    ``skimage.filters.threshold_otsu`` (histogram over the value range, bin centres);
    foreground is ``values > threshold``."""
    v = np.asarray(values, np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return lo
    hist, edges = np.histogram(v, bins=nbins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    hist = hist.astype(np.float64)
    w1 = np.cumsum(hist)
    w2 = np.cumsum(hist[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        m1 = np.cumsum(hist * centres) / w1
        m2 = (np.cumsum((hist * centres)[::-1]) / w2[::-1])[::-1]
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centres[int(np.nanargmax(between))])


def _runs(mask: np.ndarray, length: int, axis: int) -> np.ndarray:
    """Pixels on a straight run of ``length`` or more along ``axis`` (a binary opening
    with a line, from a running mean and a running max: O(1) per pixel)."""
    length = max(3, length | 1)  # odd, so erosion and dilation share their centre
    full = ndi.uniform_filter1d(mask.astype(np.float32), length, axis=axis, mode="constant")
    core = full > np.float32(1 - 0.5 / length)
    return ndi.maximum_filter1d(core, length, axis=axis, mode="constant")


def remove_lines(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove ruled lines, page edges and form-box borders from an ink mask.

    A horizontal (vertical) straight run of ink spanning :data:`RULED_LINE` of the width
    (height) is a ruled line or page edge. Runs of :data:`BOX_LINE` are the sides of a
    form box when they are connected into a frame whose extent is large in both directions
    (a digit's straight stroke is long in one direction only). Digit strokes cut by a
    removed line are bridged where ink lies on both sides of it within :data:`LINE_BRIDGE`
    px.

    Parameters
    ----------
    mask : ndarray, shape (h, w), bool

    Returns
    -------
    (mask, lines) : bool ndarrays, shape (h, w)
        The mask without the lines, and the line pixels removed.
    """
    h, w = mask.shape
    horizontal = _runs(mask, round(BOX_LINE * w), axis=1)
    vertical = _runs(mask, round(BOX_LINE * h), axis=0)
    if not (horizontal.any() or vertical.any()):
        return mask, np.zeros_like(mask)
    labels, n = ndi.label(horizontal | vertical, structure=_EIGHT)
    # A frame has two horizontal sides far apart *and* two vertical sides far apart; the
    # long straight strokes of a tightly cropped digit (a 3's bars and its right side, a
    # 7, a 4) never make both pairs.
    rows = _spread(labels, horizontal, n, axis=0)
    cols = _spread(labels, vertical, n, axis=1)
    frame = (rows >= 0.4 * h) & (cols >= 0.4 * w)
    frame[0] = False
    ruled = _runs(mask, round(RULED_LINE * w), axis=1)
    ruled_v = _runs(mask, round(RULED_LINE * h), axis=0)
    horizontal &= frame[labels] | ruled
    vertical &= frame[labels] | ruled_v
    if not (horizontal.any() or vertical.any()):
        return mask, np.zeros_like(mask)
    # One pixel more: the anti-aliased fringe of a line is not a digit either.
    lines = ndi.binary_dilation(horizontal | vertical, _EIGHT)
    kept = mask & ~lines
    bridged = kept | (lines & _both_sides(kept, axis=0) & ndi.binary_dilation(horizontal, _EIGHT))
    bridged |= lines & _both_sides(kept, axis=1) & ndi.binary_dilation(vertical, _EIGHT)
    return bridged, lines & ~bridged


def _spread(labels: np.ndarray, where: np.ndarray, n: int, *, axis: int) -> np.ndarray:
    """Per label (n + 1,): max - min of the row (axis 0) or column (axis 1) index of its
    pixels in ``where``; -1 where a label has none."""
    idx = np.nonzero(where)
    lab = labels[idx]
    pos = idx[axis]
    lo = np.full(n + 1, np.iinfo(np.int64).max)
    hi = np.full(n + 1, -1, np.int64)
    np.minimum.at(lo, lab, pos)
    np.maximum.at(hi, lab, pos)
    return np.where(hi >= 0, hi - lo, -1)


def _both_sides(kept: np.ndarray, *, axis: int) -> np.ndarray:
    """Pixels with ink within LINE_BRIDGE px on both sides along ``axis``."""
    a = np.moveaxis(kept, axis, 0)
    before = np.zeros_like(a)
    after = np.zeros_like(a)
    for k in range(1, LINE_BRIDGE + 1):  # LINE_BRIDGE whole-array shifts
        before[k:] |= a[:-k]
        after[:-k] |= a[k:]
    return np.moveaxis(before & after, 0, axis)


def _inner_distance(mask: np.ndarray) -> np.ndarray:
    """Distance of each ink pixel to the nearest non-ink pixel, outside the array counting
    as non-ink (scipy's transform ignores the outside: a stroke cropped at the array edge
    would look endless)."""
    return ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]


def stroke_width(mask: np.ndarray) -> float:
    """Typical stroke width of a binary shape, px: twice the median distance-transform
    value on its ridge (pixels not below any 8-neighbour). 0.0 for an empty mask."""
    if not mask.any():
        return 0.0
    d = _inner_distance(mask)
    ridge = mask & (d >= ndi.maximum_filter(d, size=3))
    return float(2.0 * np.median(d[ridge]))


def _component_boxes(labels: np.ndarray, n: int) -> np.ndarray:
    """(n + 1, 4) int array of [top, bottom, left, right] per label (row 0 unused)."""
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    box = np.empty((n + 1, 4), np.int64)
    box[:, 0] = box[:, 2] = np.iinfo(np.int64).max
    box[:, 1] = box[:, 3] = -1
    np.minimum.at(box[:, 0], lab, ys)
    np.maximum.at(box[:, 1], lab, ys)
    np.minimum.at(box[:, 2], lab, xs)
    np.maximum.at(box[:, 3], lab, xs)
    return box


def select_digit(mask: np.ndarray, ink: np.ndarray) -> tuple[np.ndarray, float]:
    """The digit's ink among the connected components (8-connected) of ``mask``.

    The main component has the most ink (``ink`` summed; marks touching the border weigh
    :data:`BORDER_WEIGHT`); pieces near it at stroke scale are added (see
    :data:`NEAR_STROKES`, :data:`MIN_PIECE`); everything else is dropped.

    Parameters
    ----------
    mask : ndarray, shape (h, w), bool
    ink : ndarray, shape (h, w), float32
        Ink strength (the weights of the mass).

    Returns
    -------
    (digit, stroke) : bool ndarray (h, w) and the main component's stroke width (px)

    Raises
    ------
    DigitNotFoundError
        No mark of digit size, or a second digit-sized mark far from the first.
    """
    h, w = mask.shape
    labels, n = ndi.label(mask, structure=_EIGHT)
    if n == 0:
        raise DigitNotFoundError("expected a digit, got no ink besides lines and edges")
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1).astype(np.float64)
    mass = np.bincount(flat, weights=ink.ravel(), minlength=n + 1)
    box = _component_boxes(labels, n)
    touches = (box[:, 0] == 0) | (box[:, 1] == h - 1) | (box[:, 2] == 0) | (box[:, 3] == w - 1)
    size = np.maximum(box[:, 1] - box[:, 0], box[:, 3] - box[:, 2]) + 1
    weight = mass * np.where(touches, BORDER_WEIGHT, 1.0)
    weight[0] = -1.0
    main = int(np.argmax(weight))
    if size[main] < MIN_DIGIT * max(h, w):
        raise DigitNotFoundError(
            f"expected a digit, got only specks (largest mark {int(size[main])} px of {max(h, w)})"
        )
    t, b, lft, r = (int(v) for v in box[main])
    main_mask = labels[t : b + 1, lft : r + 1] == main
    stroke = stroke_width(main_mask)
    gap = max(NEAR_STROKES * stroke, NEAR_BOX * float(size[main]))
    inside = (box[:, 0] >= t - stroke) & (box[:, 1] <= b + stroke)
    inside &= (box[:, 2] >= lft - stroke) & (box[:, 3] <= r + stroke)
    big = (mass >= SECOND_DIGIT_MASS * mass[main]) & (size >= SECOND_DIGIT_SIZE * size[main])
    piece = (area >= MIN_PIECE * area[main]) | inside
    far = FAR * float(size[main])
    keep = np.zeros(n + 1, bool)
    keep[main] = True
    inked = labels > 0
    lab_inked = labels[inked]
    # A broken stroke is a chain of pieces: the digit grows from the main mass, each round
    # adding the pieces near what it holds already (a few whole-array distance transforms).
    for _ in range(CHAIN_ROUNDS if n > 1 else 0):
        dist = ndi.distance_transform_edt(~keep[labels])
        distance = np.full(n + 1, np.inf)
        # Per-label minimum by an unbuffered ufunc (ndi.minimum sorts the labels: slower).
        np.minimum.at(distance, lab_inked, dist[inked])
        # A large piece within FAR of the digit's size is a broken stroke (a 4 or 5
        # written in two strokes), not a second digit.
        grown = keep | ((distance <= gap) & piece) | (big & ~touches & (distance <= far))
        grown[0] = False
        if np.array_equal(grown, keep):
            break
        keep = grown
    second = ~keep & ~touches & big
    second[0] = False
    if second.any():
        raise DigitNotFoundError(
            f"expected one digit, got {1 + int(np.count_nonzero(second))} digit-sized marks "
            "far apart"
        )
    return keep[labels], stroke


def remove_specks(mask: np.ndarray, *, stroke: float) -> np.ndarray:
    """A binary opening with a disc of radius :data:`SPECK_OPEN` * ``stroke``: dust
    touching or near the strokes (narrower than the disc) goes, the strokes stay.

    From two distance transforms (erosion, then dilation by the same radius), so the cost
    does not grow with the radius. Returns ``mask`` when the opening would empty it.
    """
    r = SPECK_OPEN * stroke
    if r < 1.0:
        return mask
    eroded = _inner_distance(mask) > r
    if not eroded.any():
        return mask
    opened = (ndi.distance_transform_edt(~eroded) <= r) & mask
    return opened


def normalize_stroke_width(shape: np.ndarray, *, scale: float) -> tuple[np.ndarray, float]:
    """Thin a marker or thicken a thin pen toward MNIST's stroke width.

    Parameters
    ----------
    shape : ndarray, shape (h, w), bool
        The digit drawn ``scale`` px per px of the 28x28 field.
    scale : float

    Returns
    -------
    (shape, width) : the adjusted bool shape and its measured width before (in px of the
    28x28 field)
    """
    w = stroke_width(shape)
    width = w / scale
    if width > THICK:
        r = min((w - THICK_TARGET * scale) / 2, KEEP_STROKES * w / 2)
        thinner = _inner_distance(shape) > r
        if thinner.any():
            return thinner, width
    elif 0 < width < THIN:
        r = (THIN_TARGET * scale - w) / 2
        return ndi.distance_transform_edt(~shape) <= r, width
    return shape, width


def _crop_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _resize(a: np.ndarray, size: tuple[int, int], method: Image.Resampling) -> np.ndarray:
    """Float32 resize to ``size`` = (width, height) with Pillow's C kernels."""
    im = Image.fromarray(np.ascontiguousarray(a, np.float32)).resize(size, method)
    return np.asarray(im, np.float32)


def place_by_mass(patch: np.ndarray) -> np.ndarray:
    """Paste ``patch`` (h, w <= 28) into 28x28 with its centre of mass nearest the centre.

    The whole-pixel offset rule of :func:`pipeline.images.normalize_digit`.
    """
    h, w = patch.shape
    H, W = MNIST_SHAPE
    mass = float(patch.sum(dtype=np.float64))
    cy = float(patch.sum(axis=1, dtype=np.float64) @ np.arange(h)) / mass
    cx = float(patch.sum(axis=0, dtype=np.float64) @ np.arange(w)) / mass
    top = min(max(round(MNIST_CENTER[0] - cy), 0), H - h)
    left = min(max(round(MNIST_CENTER[1] - cx), 0), W - w)
    out = np.zeros(MNIST_SHAPE, np.float32)
    out[top : top + h, left : left + w] = patch
    return out


def layout(shape: np.ndarray) -> np.ndarray:
    """A binary digit shape (h, w) bool as MNIST: longer side to :data:`BOX` px with
    anti-aliasing (LANCZOS), peak stretched to 1, centre of mass at the centre.

    Returns (28, 28) uint8.
    """
    t, b, lft, r = _crop_box(shape)
    crop = shape[t:b, lft:r].astype(np.float32)
    h, w = crop.shape
    factor = BOX / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    small = np.clip(_resize(crop, size, Image.Resampling.LANCZOS), 0.0, 1.0)
    small /= np.float32(max(float(small.max()), 1e-6))
    return np.rint(place_by_mass(small) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------- the pipeline


def normalize_steps(gray: np.ndarray) -> Steps:
    """Run every step of :func:`normalize_picture` and return the intermediate arrays.

    Parameters
    ----------
    gray : ndarray, shape (H, W), uint8 or float in [0, 1]
        Light = white; ink may be dark or light.

    Raises
    ------
    DigitNotFoundError
        NaN/inf pixels, a blank picture, only specks, or several digits far apart.
    """
    check_finite(gray)
    if min(gray.shape) < 2:
        raise DigitNotFoundError(
            f"expected a picture at least 2x2 px, got {gray.shape[1]}x{gray.shape[0]}"
        )
    x = (
        gray.astype(np.float32) * np.float32(1 / 255)
        if gray.dtype == np.uint8
        else np.clip(gray.astype(np.float32), 0.0, 1.0)
    )
    work, f = to_work_size(x)
    # About one source pixel (at least 0.8 px here): JPEG blocks and sensor noise are that
    # size, strokes several times larger.
    work = ndi.gaussian_filter(work, max(0.8, 0.4 * f), mode="nearest")
    window = max(3, round(BACKGROUND_WINDOW * max(work.shape)))
    light_ink = ink_is_light(work)
    flat = flatten_background(1.0 - work if light_ink else work, window=window)
    threshold = otsu_threshold(flat)
    mask = flat > threshold
    if not mask.any() or float(flat[mask].mean()) - float(flat[~mask].mean()) < MIN_CONTRAST:
        raise DigitNotFoundError(
            "expected a digit darker or lighter than its background, got a blank image "
            f"(contrast below {MIN_CONTRAST})"
        )
    mask, lines = remove_lines(mask)
    digit, stroke = select_digit(mask, flat)
    digit = remove_specks(digit, stroke=stroke)
    # The digit as a binary shape SHAPE_SCALE times the final size: ink strength inside the
    # chosen components, resampled smoothly, then thresholded again (smooth edges).
    t, b, lft, r = _crop_box(digit)
    pad = 2
    t, lft = max(t - pad, 0), max(lft - pad, 0)
    b, r = min(b + pad, digit.shape[0]), min(r + pad, digit.shape[1])
    near = ndi.binary_dilation(digit[t:b, lft:r], _EIGHT, iterations=2)
    crop = np.where(near, flat[t:b, lft:r], 0.0).astype(np.float32)
    h, w = crop.shape
    k = BOX * SHAPE_SCALE / max(h, w)
    size = (max(1, round(w * k)), max(1, round(h * k)))
    method = Image.Resampling.BOX if k < 1 else Image.Resampling.BILINEAR
    shape = _resize(crop, size, method) > threshold
    if not shape.any():
        shape = _resize(crop, size, Image.Resampling.BILINEAR) > 0.5 * threshold
    if not shape.any():
        raise DigitNotFoundError("expected a digit, got a mark too faint to draw")
    shape, stroke = normalize_stroke_width(shape, scale=SHAPE_SCALE)
    out = layout(shape)
    return Steps(work, light_ink, flat, threshold, mask, lines, digit, stroke, shape, out)


def normalize_picture(gray: np.ndarray) -> np.ndarray:
    """Any digit picture as a 28x28 uint8 MNIST image (bright ink on black).

    Parameters
    ----------
    gray : ndarray, shape (H, W), uint8 or float in [0, 1]

    Returns
    -------
    ndarray, shape (28, 28), uint8

    Raises
    ------
    DigitNotFoundError
        See :func:`normalize_steps`.
    """
    return normalize_steps(gray).out
