"""HOG descriptors (pipeline.hog) against skimage.feature.hog and their documented properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.feature import hog

from pipeline.hog import (
    cell_histograms,
    gradients,
    hog_features,
    normalize_blocks,
    orientation_channels,
    pooling_matrix,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SKIMAGE_MODE = {"soft_bins": False, "spatial": "box", "norm": "l2-hys", "eps": 1e-5}


def channels_last(ch: np.ndarray, bins: int, shape: tuple[int, ...]) -> np.ndarray:
    """orientation_channels output as (n, H, W, bins), whichever of (n, H, W, bins) or
    (n, bins, H, W) the implementation returns (choose H, W != bins in tests)."""
    n, H, W = shape
    if ch.shape == (n, H, W, bins):
        return ch
    assert ch.shape == (n, bins, H, W), ch.shape
    return np.moveaxis(ch, 1, -1)


def blank_border(images: np.ndarray, ring: int = 2) -> np.ndarray:
    """Copy of ``images`` with the outermost ``ring`` pixels set to 0 (skimage's HOG zeroes
    the gradients on the image border, this module pads with zeros: equal only then)."""
    out = images.copy()
    out[:, :ring] = 0
    out[:, -ring:] = 0
    out[:, :, :ring] = 0
    out[:, :, -ring:] = 0
    return out


def skimage_hog(images: np.ndarray, *, cell: int, bins: int, block: int) -> np.ndarray:
    return np.stack(
        [
            hog(
                img / 255.0,
                orientations=bins,
                pixels_per_cell=(cell, cell),
                cells_per_block=(block, block),
                block_norm="L2-Hys",
                feature_vector=True,
            )
            for img in images
        ]
    )


@pytest.fixture(scope="module")
def digits(mnist_like_images: np.ndarray) -> np.ndarray:
    return blank_border(mnist_like_images[:120])


# Odd bin counts: no bin boundary falls on 45/90/135 degrees, the angles that integer
# gradients hit exactly; even bin counts are tested separately below.
@pytest.mark.parametrize(
    ("cell", "bins", "block"),
    [(7, 9, 2), (4, 9, 2), (4, 9, 3), (14, 9, 1), (7, 5, 1), (4, 3, 2), (5, 7, 2), (6, 9, 2)],
)
def test_hard_box_hog_equals_skimage(digits: np.ndarray, cell: int, bins: int, block: int) -> None:
    got = hog_features(digits, cell=cell, bins=bins, block=block, signed=False, **SKIMAGE_MODE)
    want = skimage_hog(digits, cell=cell, bins=bins, block=block)
    assert got.dtype == np.float32
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_hard_box_hog_equals_skimage_on_non_square_images() -> None:
    rng = np.random.default_rng(0)
    x = blank_border(rng.integers(0, 256, size=(6, 20, 32), dtype=np.uint8))
    got = hog_features(x, cell=4, bins=9, block=2, **SKIMAGE_MODE)
    np.testing.assert_allclose(got, skimage_hog(x, cell=4, bins=9, block=2), atol=1e-5)


@pytest.mark.parametrize(("cell", "bins", "block"), [(7, 8, 2), (4, 4, 2)])
def test_hard_box_hog_equals_skimage_with_even_bins(
    digits: np.ndarray, cell: int, bins: int, block: int
) -> None:
    got = hog_features(digits, cell=cell, bins=bins, block=block, signed=False, **SKIMAGE_MODE)
    np.testing.assert_allclose(
        got, skimage_hog(digits, cell=cell, bins=bins, block=block), atol=1e-5
    )


def hard_bin(g_row: float, g_col: float, *, bins: int, signed: bool) -> int:
    gr = np.full((1, 3, 5), g_row, np.float32) * np.float32(0.4)
    gc = np.full((1, 3, 5), g_col, np.float32) * np.float32(0.4)
    ch = orientation_channels(gr, gc, bins=bins, signed=signed, soft_bins=False)
    ch = channels_last(ch, bins, (1, 3, 5))
    assert ch.sum() == pytest.approx(15 * 0.4 * np.hypot(g_row, g_col), rel=1e-6)
    (which,) = np.flatnonzero(ch[0, 1, 2])
    return int(which)


@pytest.mark.parametrize(
    ("bins", "g_row", "g_col", "expected"),
    [
        (9, 0.0, 1.0, 0),  # 0 degrees
        (9, 0.0, -1.0, 0),  # 180 = 0 (unsigned)
        (9, -1.0, 0.0, 4),  # -90 = 90: bin [80, 100)
        (4, 1.0, 0.0, 2),  # 90 degrees: bin [90, 135)
        (2, 1.0, 0.0, 1),
        (6, 1.0, 0.0, 3),  # [90, 120)
        (4, 1.0, -1.0, 3),  # 135 degrees: [135, 180)
        (3, 1.0, 2.0, 0),  # 26.6 degrees: [0, 60)
        pytest.param(4, 1.0, 1.0, 1, id="45deg-4bins"),
        pytest.param(8, 1.0, 1.0, 2, id="45deg-8bins"),
        pytest.param(4, -1.0, -1.0, 1, id="225deg-4bins"),
    ],
)
def test_unsigned_hard_bin_boundaries(bins: int, g_row: float, g_col: float, expected: int) -> None:
    """Unsigned bin i covers angles [i, i + 1) * 180 / bins of arctan2(g_row, g_col)."""
    assert hard_bin(g_row, g_col, bins=bins, signed=False) == expected


@pytest.mark.parametrize("bins", [2, 4, 8, 12, 16])
@pytest.mark.parametrize("degrees", [10.0, 30.0, 75.0, 100.0, 160.0])
def test_signed_bins_tell_opposite_directions_apart(bins: int, degrees: float) -> None:
    """Signed bins span 360 degrees: opposite gradients are half the bins apart; unsigned
    ones fall into the same bin."""
    a = np.deg2rad(degrees)
    g_row, g_col = float(np.sin(a)), float(np.cos(a))
    one = hard_bin(g_row, g_col, bins=bins, signed=True)
    other = hard_bin(-g_row, -g_col, bins=bins, signed=True)
    assert (one - other) % bins == bins // 2
    assert hard_bin(g_row, g_col, bins=bins, signed=False) == hard_bin(
        -g_row, -g_col, bins=bins, signed=False
    )


def test_gradients_are_central_differences_with_zero_outside() -> None:
    img = np.arange(12, dtype=np.float32).reshape(1, 3, 4) / 20
    g_row, g_col = gradients(img)
    p = np.pad(img[0], 1)
    np.testing.assert_allclose(g_row[0], p[2:, 1:-1] - p[:-2, 1:-1])
    np.testing.assert_allclose(g_col[0], p[1:-1, 2:] - p[1:-1, :-2])


# ----------------------------------------------------------------------------- shapes


def expected_width(H: int, W: int, *, cell: int, bins: int, block: int) -> int:
    cy, cx = H // cell, W // cell
    if block == 0:
        return cy * cx * bins
    return (cy - block + 1) * (cx - block + 1) * block * block * bins


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("spatial", ["box", "triangle"])
@pytest.mark.parametrize("soft_bins", [False, True])
@pytest.mark.parametrize(
    ("shape", "cell", "bins", "block"),
    [((28, 28), 7, 9, 2), ((28, 28), 4, 12, 2), ((28, 28), 14, 16, 1), ((20, 32), 4, 8, 3),
     ((28, 28), 7, 6, 0), ((28, 28), 5, 9, 2), ((9, 13), 3, 4, 1)],
)  # fmt: skip
def test_hog_widths(
    shape: tuple[int, int],
    cell: int,
    bins: int,
    block: int,
    signed: bool,
    spatial: str,
    soft_bins: bool,
) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(3, *shape), dtype=np.uint8)
    out = hog_features(
        x, cell=cell, bins=bins, block=block, signed=signed, spatial=spatial, soft_bins=soft_bins
    )
    assert out.dtype == np.float32
    assert out.shape == (3, expected_width(*shape, cell=cell, bins=bins, block=block))
    assert np.isfinite(out).all()


def test_hog_rejects_bad_parameters() -> None:
    x = np.zeros((1, 28, 28), np.uint8)
    with pytest.raises(ValueError, match="expected a cell size"):
        hog_features(x, cell=29)
    with pytest.raises(ValueError, match="expected 1 <= block"):
        hog_features(x, cell=7, block=5)
    with pytest.raises(ValueError, match="expected norm"):
        hog_features(x, norm="l1")
    with pytest.raises(ValueError, match="expected spatial"):
        hog_features(x, spatial="gauss")


# ----------------------------------------------------------------------------- binning


@SETTINGS
@given(
    bins=st.integers(2, 20),
    signed=st.booleans(),
    soft_bins=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_orientation_channels_preserve_magnitude(
    bins: int, signed: bool, soft_bins: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(2, 9, 11), dtype=np.uint8)
    x[rng.random(x.shape) < 0.3] = 0
    g_row, g_col = gradients(x)
    ch = orientation_channels(g_row, g_col, bins=bins, signed=signed, soft_bins=soft_bins)
    assert ch.dtype == np.float32
    ch = channels_last(ch, bins, x.shape)
    assert (ch >= 0).all()
    np.testing.assert_allclose(ch.sum(axis=-1), np.hypot(g_row, g_col), rtol=1e-5, atol=1e-6)
    nonzero = (ch > 0).sum(axis=-1)
    assert nonzero.max() <= (2 if soft_bins else 1)


def test_soft_bins_share_between_the_two_nearest_centres() -> None:
    # 9 unsigned bins of 20 degrees, centres at 10, 30, ...: 25 degrees is 3/4 of the way
    # from centre 10 (bin 0) to centre 30 (bin 1); 5 degrees wraps to bin 8 (centre 170).
    angles = np.deg2rad(np.array([25.0, 5.0, 30.0]))
    g_row = np.sin(angles).astype(np.float32)[None, None]
    g_col = np.cos(angles).astype(np.float32)[None, None]
    ch = orientation_channels(g_row, g_col, bins=9, signed=False, soft_bins=True)
    ch = channels_last(ch, 9, (1, 1, 3))[0, 0]
    np.testing.assert_allclose(ch[0, [0, 1]], [0.25, 0.75], atol=1e-5)
    np.testing.assert_allclose(ch[1, [8, 0]], [0.25, 0.75], atol=1e-5)
    np.testing.assert_allclose(ch[2, 1], 1.0, atol=1e-5)
    np.testing.assert_allclose(ch.sum(axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(("size", "cell"), [(28, 7), (28, 4), (28, 14), (28, 5), (20, 4)])
def test_box_pooling_matrix_averages_each_cell(size: int, cell: int) -> None:
    m = pooling_matrix(size, cell, "box")
    cells = size // cell
    assert m.shape == (cells, size)
    covered = cells * cell
    # Every pixel of the covered part in exactly one cell with weight 1/cell; the remainder
    # at the end is dropped, as in skimage.
    np.testing.assert_allclose(m.sum(axis=0)[:covered], 1 / cell, rtol=1e-6)
    np.testing.assert_array_equal(m[:, covered:], 0)
    np.testing.assert_array_equal((m > 0).sum(axis=1), cell)
    assert pooling_matrix(size, cell, "triangle").shape[0] == cells


# ----------------------------------------------------------------------------- properties


def test_block_norm_none_is_the_raw_cell_histograms(digits: np.ndarray) -> None:
    hist = cell_histograms(digits[:10], cell=7, bins=9, soft_bins=True, spatial="triangle")
    out = normalize_blocks(hist, block=0, norm="none")
    np.testing.assert_array_equal(out, hist.reshape(10, -1))


def test_l2_blocks_have_unit_norm(digits: np.ndarray) -> None:
    x = digits[:20]
    raw = hog_features(x, cell=7, bins=9, block=2, norm="none").reshape(20, -1, 2 * 2 * 9)
    out = hog_features(x, cell=7, bins=9, block=2, norm="l2").reshape(20, -1, 2 * 2 * 9)
    inked = np.linalg.norm(raw, axis=-1) > 1e-2  # far above eps = 1e-5
    assert inked.sum() > 20
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1)[inked], 1.0, atol=1e-3)
    assert np.isfinite(out).all()
    assert (np.linalg.norm(out, axis=-1) <= 1 + 1e-5).all()


def test_hog_is_invariant_to_contrast(digits: np.ndarray) -> None:
    """Block normalisation removes a global intensity scale (up to eps)."""
    x = digits[:20].astype(np.float32) / 255
    for kw in ({}, {"signed": True, "cell": 4, "bins": 12}, SKIMAGE_MODE):
        np.testing.assert_allclose(hog_features(0.5 * x, **kw), hog_features(x, **kw), atol=2e-3)


def test_uint8_and_unit_float_inputs_agree(digits: np.ndarray) -> None:
    x = digits[:20]
    np.testing.assert_allclose(
        hog_features(x), hog_features(x.astype(np.float32) / 255), rtol=1e-5, atol=1e-6
    )


def test_blank_images_give_zero_finite_descriptors() -> None:
    out = hog_features(np.zeros((3, 28, 28), np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, 0)


OPTIONS = [
    {},
    {"signed": True, "cell": 4, "bins": 12},
    {"soft_bins": False, "spatial": "box"},
    {"cell": 14, "bins": 16, "signed": True, "block": 1, "norm": "l2"},
    {"block": 0, "norm": "none"},
]


@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_hog_is_finite_float32_and_batch_independent(
    digits: np.ndarray, options: dict[str, object]
) -> None:
    """28x28 digits, random noise and blank images; every image alone and in batches of 7."""
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    x = np.concatenate([digits[:30], noise, np.zeros((2, 28, 28), np.uint8)])
    full = hog_features(x, **options)  # type: ignore[arg-type]
    assert full.dtype == np.float32
    assert np.isfinite(full).all()
    for i in range(len(x)):
        np.testing.assert_array_equal(full[i], hog_features(x[i : i + 1], **options)[0])  # type: ignore[arg-type]
    parts = np.concatenate([hog_features(x[a : a + 7], **options) for a in range(0, len(x), 7)])  # type: ignore[arg-type]
    np.testing.assert_array_equal(parts, full)


@pytest.mark.parametrize(("shape", "cell"), [((20, 32), 4), ((20, 32), 7), ((32, 20), 4),
                                             ((28, 28), 5), ((36, 36), 6)])  # fmt: skip
@pytest.mark.parametrize("signed", [False, True])
def test_hog_is_batch_independent_on_other_image_sizes(
    shape: tuple[int, int], cell: int, signed: bool
) -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(40, *shape), dtype=np.uint8)
    x[rng.random(x.shape) < 0.5] = 0
    full = hog_features(x, cell=cell, signed=signed)
    for size in (1, 2, 3, 7, 16, 33):
        for a in range(0, len(x), size):
            np.testing.assert_array_equal(
                hog_features(x[a : a + size], cell=cell, signed=signed), full[a : a + size]
            )


# ----------------------------------------------------------------------------- references


def soft_triangle_reference(image: np.ndarray, *, cell: int, bins: int, signed: bool) -> np.ndarray:
    """Cell histograms (cy, cx, bins) of one image from the documented definitions, pixel by
    pixel in float64: central differences with zeros outside, soft orientation bins
    (centres at ``(k + 0.5) * period / bins``, wrapping), and triangle weights
    ``max(0, 1 - |c - centre| / cell) / cell`` on each axis, ``c`` being the centre of the
    pixel's 2x2 fine cell."""
    x = np.pad(image.astype(np.float64) / 255.0, 1)
    H, W = image.shape
    period = 2 * np.pi if signed else np.pi
    cy, cx = H // cell, W // cell
    out = np.zeros((cy, cx, bins))
    for r in range(H):
        for c in range(W):
            g_row = x[r + 2, c + 1] - x[r, c + 1]
            g_col = x[r + 1, c + 2] - x[r + 1, c]
            mag = np.hypot(g_row, g_col)
            if mag == 0:
                continue
            angle = np.arctan2(g_row, g_col) + (np.pi if signed else 0.0)
            pos = (angle % period) / period * bins - 0.5  # in units of bins, from centre 0
            low = int(np.floor(pos))
            share = {low % bins: 1 - (pos - low), (low + 1) % bins: pos - low}
            wy = np.maximum(0, 1 - np.abs(2 * (r // 2) + 1 - (np.arange(cy) + 0.5) * cell) / cell)
            wx = np.maximum(0, 1 - np.abs(2 * (c // 2) + 1 - (np.arange(cx) + 0.5) * cell) / cell)
            for b, s in share.items():
                out[:, :, b] += np.outer(wy, wx) * s * mag / cell**2
    return out


@pytest.mark.parametrize(
    ("cell", "bins", "signed"), [(4, 8, True), (7, 4, False), (7, 9, False), (5, 12, True)]
)
def test_soft_triangle_histograms_equal_a_direct_reference(
    digits: np.ndarray, cell: int, bins: int, signed: bool
) -> None:
    x = digits[:6]
    got = cell_histograms(
        x, cell=cell, bins=bins, signed=signed, soft_bins=True, spatial="triangle"
    )
    want = np.stack(
        [soft_triangle_reference(img, cell=cell, bins=bins, signed=signed) for img in x]
    )
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_compiled_atan2_is_within_an_ulp_of_numpy() -> None:
    from pipeline.jit import atan2 as _atan2

    rng = np.random.default_rng(4)
    y = np.concatenate([rng.standard_normal(300), [0, 0, 1, -1, 1, 1, -1, 0.5, 2.0]])
    x = np.concatenate([rng.standard_normal(300), [0, 1, 0, 0, 1, -1, -1, 1e-8, -3.0]])
    got = np.array([_atan2(np.float32(a), np.float32(b)) for a, b in zip(y, x, strict=True)])
    want = np.arctan2(y.astype(np.float32), x.astype(np.float32))
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-7)
    assert _atan2(np.float32(0), np.float32(0)) == 0
