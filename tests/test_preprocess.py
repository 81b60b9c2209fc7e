"""Preprocessing kernels (pipeline.preprocess) against scipy, OpenCV and scikit-image."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from skimage.draw import polygon
from skimage.filters import threshold_otsu

from pipeline.preprocess import (
    binarize,
    center_of_mass_shift,
    deskew,
    image_moments,
    median_blur,
    otsu_threshold,
    to_unit_float,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_batch(seed: int, shape: tuple[int, int, int], dtype: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.random(shape, dtype=np.float32)


def moments_reference(img: np.ndarray) -> tuple[float, float, float, float, float]:
    """(mass, cy, cx, mu20, mu11) of one image, straight from the definitions, in float64."""
    x = np.asarray(img, np.float64)
    yy, xx = np.mgrid[: x.shape[0], : x.shape[1]]
    mass = x.sum()
    cy, cx = (x * yy).sum() / mass, (x * xx).sum() / mass
    mu20 = (x * (yy - cy) ** 2).sum() / mass
    mu11 = (x * (yy - cy) * (xx - cx)).sum() / mass
    return mass, cy, cx, mu20, mu11


def slanted_bar(shape: tuple[int, int] = (28, 28), *, top: int = 18, bottom: int = 8) -> np.ndarray:
    """A 4-pixel-wide bar from (row 4, col ``top``) down to (row 23, col ``bottom``), uint8."""
    img = np.zeros(shape, np.uint8)
    rr, cc = polygon([4, 4, 23, 23], [top, top + 4, bottom + 4, bottom], shape=shape)
    img[rr, cc] = 255
    return img


# ----------------------------------------------------------------------------- median_blur


@SETTINGS
@given(
    n=st.integers(1, 5),
    H=st.integers(1, 20),
    W=st.integers(1, 20),
    size=st.sampled_from([1, 3, 5, 7]),
    dtype=st.sampled_from(["uint8", "float32"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_median_blur_equals_scipy_reflect(
    n: int, H: int, W: int, size: int, dtype: str, seed: int
) -> None:
    """Including images smaller than the window (scipy then reflects repeatedly)."""
    x = random_batch(seed, (n, H, W), dtype)
    got = median_blur(x, size=size)
    want = ndimage.median_filter(x, size=(1, size, size), mode="reflect")
    assert got.dtype == x.dtype
    assert got.shape == x.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(3, 28, 28), (2, 5, 31), (1, 3, 3), (4, 1, 9)])
def test_median_blur_3_equals_opencv_on_the_whole_image(shape: tuple[int, int, int]) -> None:
    """cv2.medianBlur pads with BORDER_REPLICATE, which for a 3x3 window equals 'reflect'."""
    x = random_batch(7, shape, "uint8")
    want = np.stack([cv2.medianBlur(img, 3) for img in x])
    np.testing.assert_array_equal(median_blur(x, size=3), want)


@pytest.mark.parametrize("size", [5, 7])
def test_median_blur_equals_opencv_on_interior_pixels(size: int) -> None:
    """For larger windows the border rules differ (replicate vs reflect); the interior not."""
    x = random_batch(8, (3, 24, 30), "uint8")
    want = np.stack([cv2.medianBlur(img, size) for img in x])
    r = size // 2
    np.testing.assert_array_equal(median_blur(x, size=size)[:, r:-r, r:-r], want[:, r:-r, r:-r])


def test_median_blur_size_1_is_a_copy() -> None:
    x = random_batch(1, (2, 6, 6), "uint8")
    out = median_blur(x, size=1)
    np.testing.assert_array_equal(out, x)
    assert out is not x and not np.shares_memory(out, x)


@pytest.mark.parametrize("size", [0, 2, 4, -1])
def test_median_blur_rejects_even_or_small_sizes(size: int) -> None:
    with pytest.raises(ValueError, match="expected an odd median size"):
        median_blur(np.zeros((1, 5, 5), np.uint8), size=size)


@pytest.mark.parametrize(
    "kernel",
    [median_blur, otsu_threshold, binarize, deskew, center_of_mass_shift],
)
def test_kernels_reject_non_batches(kernel: object) -> None:
    with pytest.raises(ValueError, match=r"expected a batch of 2-D images"):
        kernel(np.zeros((28, 28), np.uint8))  # type: ignore[operator]


# ----------------------------------------------------------------------------- otsu


def random_blobs(n: int, *, seed: int = 0, shape: tuple[int, int] = (28, 28)) -> np.ndarray:
    """uint8 images of smooth random blobs on a noisy background (bimodal-ish histograms)."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random((n, *shape)), sigma=(0, 2.5, 2.5))
    lo = smooth.min(axis=(1, 2), keepdims=True)
    span = np.ptp(smooth, axis=(1, 2), keepdims=True)
    blobs = (smooth - lo) / span
    noisy = blobs + rng.normal(0, 0.05, blobs.shape)
    return np.clip(np.rint(noisy * 255), 0, 255).astype(np.uint8)


def test_otsu_equals_skimage_on_blobs() -> None:
    x = random_blobs(40)
    want = np.array([threshold_otsu(img) for img in x], np.float32)
    got = otsu_threshold(x)
    assert got.dtype == np.float32 and got.shape == (40,)
    np.testing.assert_array_equal(got, want)


def test_otsu_equals_skimage_on_digits(mnist_like_images: np.ndarray) -> None:
    x = mnist_like_images[:200]
    want = np.array([threshold_otsu(img) for img in x], np.float32)
    np.testing.assert_array_equal(otsu_threshold(x), want)


@SETTINGS
@given(
    n=st.integers(1, 4),
    H=st.integers(1, 12),
    W=st.integers(1, 12),
    levels=st.lists(st.integers(0, 255), min_size=1, max_size=4, unique=True),
    seed=st.integers(0, 2**32 - 1),
)
def test_otsu_equals_skimage_on_few_level_images(
    n: int, H: int, W: int, levels: list[int], seed: int
) -> None:
    """Images made of 1-4 grey levels: many ties and empty histogram bins."""
    rng = np.random.default_rng(seed)
    x = np.asarray(levels, np.uint8)[rng.integers(0, len(levels), size=(n, H, W))]
    want = np.array([threshold_otsu(img) for img in x], np.float32)
    np.testing.assert_array_equal(otsu_threshold(x), want)


@pytest.mark.parametrize("value", [0, 1, 77, 254, 255])
def test_otsu_of_constant_images_is_their_value(value: int) -> None:
    x = np.full((2, 9, 7), value, np.uint8)
    np.testing.assert_array_equal(otsu_threshold(x), [value, value])
    assert threshold_otsu(x[0]) == value
    # Hence no foreground at all.
    assert not binarize(x, method="otsu").any()


def test_otsu_of_float_images_quantizes_to_256_levels() -> None:
    x = random_blobs(10, seed=3)
    np.testing.assert_array_equal(otsu_threshold(x.astype(np.float32) / 255), otsu_threshold(x))


# ----------------------------------------------------------------------------- binarize


def test_binarize_otsu_is_image_above_skimage_threshold() -> None:
    x = random_blobs(12, seed=4)
    got = binarize(x, method="otsu")
    want = np.stack([img > threshold_otsu(img) for img in x])
    assert got.dtype == np.float32
    assert set(np.unique(got)) <= {0.0, 1.0}
    np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("threshold", [0.0, 0.25, 0.5, 0.999])
def test_binarize_fixed_is_fraction_of_full_intensity(threshold: float) -> None:
    x = random_batch(5, (3, 10, 11), "uint8")
    got = binarize(x, method="fixed", threshold=threshold)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, (x / 255.0 > threshold).astype(np.float32))
    # Float images in [0, 1] give the same mask.
    np.testing.assert_array_equal(
        binarize(x / np.float32(255), method="fixed", threshold=threshold), got
    )


def test_binarize_fixed_half_is_above_127_5() -> None:
    x = np.array([[[127, 128, 0, 255]]], np.uint8)
    np.testing.assert_array_equal(binarize(x, method="fixed", threshold=0.5), [[[0, 1, 0, 1]]])


@pytest.mark.parametrize("threshold", [1.0, 1.5, -0.1, -1.0])
def test_binarize_fixed_threshold_out_of_range(threshold: float) -> None:
    with pytest.raises(ValueError, match=r"expected a fixed threshold in \[0, 1\)"):
        binarize(np.zeros((1, 4, 4), np.uint8), method="fixed", threshold=threshold)


@pytest.mark.parametrize("method", ["sauvola", "", "OTSU"])
def test_binarize_unknown_method(method: str) -> None:
    with pytest.raises(ValueError, match="expected binarize method"):
        binarize(np.zeros((1, 4, 4), np.uint8), method=method)


# ----------------------------------------------------------------------------- moments


def test_image_moments_match_definitions(mnist_like_images: np.ndarray) -> None:
    x = mnist_like_images[:20]
    m = image_moments(x)
    for i, img in enumerate(x):
        mass, cy, cx, mu20, mu11 = moments_reference(img / 255.0)
        assert m["mass"][i] == pytest.approx(mass, rel=1e-5)
        assert m["cy"][i] == pytest.approx(cy, abs=1e-4)
        assert m["cx"][i] == pytest.approx(cx, abs=1e-4)
        assert m["mu20"][i] == pytest.approx(mu20, rel=1e-4, abs=1e-4)
        assert m["mu11"][i] == pytest.approx(mu11, rel=1e-3, abs=1e-3)


def test_image_moments_of_blank_images() -> None:
    m = image_moments(np.zeros((2, 6, 9), np.uint8))
    np.testing.assert_array_equal(m["mass"], 0)
    np.testing.assert_array_equal(m["cy"], 2.5)
    np.testing.assert_array_equal(m["cx"], 4.0)
    for key in ("mu20", "mu02", "mu11"):
        np.testing.assert_array_equal(m[key], 0)


# ----------------------------------------------------------------------------- deskew


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize(("top", "bottom"), [(18, 6), (6, 18), (16, 10)])
def test_deskew_removes_the_slant_of_a_sheared_bar(center: bool, top: int, bottom: int) -> None:
    img = slanted_bar(top=top, bottom=bottom)
    before = moments_reference(img / 255.0)
    out = deskew(img[None], center=center)[0]
    after = moments_reference(out)
    assert abs(before[4]) > 5  # clearly slanted
    assert abs(after[4]) < 0.05 * abs(before[4])
    # The shear moves ink along rows only: the row profile is unchanged (up to the
    # whole-row translation of ``center``).
    assert after[0] == pytest.approx(before[0], rel=1e-4)  # nothing left the image
    assert after[3] == pytest.approx(before[3], rel=1e-4)


@pytest.mark.parametrize("shape", [(28, 28), (20, 32), (33, 21)])
def test_deskew_centers_the_centre_of_mass(shape: tuple[int, int]) -> None:
    H, W = shape
    img = np.zeros(shape, np.uint8)
    rr, cc = polygon([2, 2, 9, 9], [3, 7, 5, 1], shape=shape)  # a small slanted blob, top left
    img[rr, cc] = 200
    out = deskew(img[None], center=True)[0]
    mass, cy, cx, _, _ = moments_reference(out)
    assert mass == pytest.approx(img.sum() / 255.0, rel=1e-4)
    # Whole rows: within half a pixel; columns are shifted by a fraction: (nearly) exact.
    assert abs(cy - (H - 1) / 2) <= 0.5 + 1e-6
    assert abs(cx - (W - 1) / 2) <= 0.05


def test_deskew_centers_digits(mnist_like_images: np.ndarray) -> None:
    x = mnist_like_images[:100]
    out = deskew(x, center=True)
    H, W = x.shape[1:]
    for before, after in zip(x, out, strict=True):
        mass, cy, cx, _, _ = moments_reference(after)
        if mass < 0.99 * before.sum() / 255.0:
            continue  # ink pushed out of the frame by a large shear: centroid not meaningful
        assert abs(cy - (H - 1) / 2) <= 0.5 + 1e-3
        assert abs(cx - (W - 1) / 2) <= 0.5


def test_deskew_reduces_the_slant_of_digits(mnist_like_images: np.ndarray) -> None:
    x = mnist_like_images[:100]
    out = deskew(x, center=False)
    before = np.array([moments_reference(img / 255.0)[4] for img in x])
    after = np.array([moments_reference(img)[4] for img in out])
    assert np.abs(after).mean() < 0.1 * np.abs(before).mean()


@pytest.mark.parametrize("center", [True, False])
def test_deskew_keeps_blank_images_blank(center: bool) -> None:
    out = deskew(np.zeros((3, 28, 28), np.uint8), center=center)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, 0)


@SETTINGS
@given(
    n=st.integers(1, 4),
    H=st.integers(1, 16),
    W=st.integers(1, 16),
    density=st.floats(0.0, 1.0),
    center=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_deskew_output_is_float32_in_unit_range(
    n: int, H: int, W: int, density: float, center: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, H, W), dtype=np.uint8)
    x[rng.random(x.shape) > density] = 0
    out = deskew(x, center=center)
    assert out.dtype == np.float32
    assert out.shape == x.shape
    assert np.isfinite(out).all()
    assert out.min() >= 0.0
    assert out.max() <= 1.0


def deskew_reference(img: np.ndarray, *, center: bool) -> np.ndarray:
    """The documented transform with scipy.ndimage.affine_transform (bilinear, order=1).

    Moments from the definitions in float64; output pixel (r, c) samples the input at
    ``(r + dy, c + a (r + dy - cy) + dx)`` with ``a = mu11 / mu20``, ``dy`` the whole-row and
    ``dx`` the fractional-column centring shifts. The row coordinate is always whole, so the
    bilinear interpolation is linear along rows, as in the library. mode="grid-constant"
    interpolates towards the zero background just outside the frame like the library's zero
    padding ("constant" differs only for ink on the outermost pixels, not in MNIST).
    Remaining differences: float32 arithmetic in the library (about 1e-5).
    """
    x = img.astype(np.float64) / 255.0
    H, W = x.shape
    _, cy, cx, mu20, mu11 = moments_reference(x)
    a = mu11 / mu20 if mu20 > 1e-2 else 0.0
    dy = float(np.rint(cy - (H - 1) / 2)) if center else 0.0
    dx = cx - (W - 1) / 2 if center else 0.0
    matrix = np.array([[1.0, 0.0], [a, 1.0]])
    offset = (dy, a * (dy - cy) + dx)
    return ndimage.affine_transform(x, matrix, offset=offset, order=1, mode="grid-constant")


@pytest.mark.parametrize("center", [True, False])
def test_deskew_equals_scipy_affine_transform(mnist_like_images: np.ndarray, center: bool) -> None:
    x = mnist_like_images[:40]
    got = deskew(x, center=center)
    want = np.stack([deskew_reference(img, center=center) for img in x])
    np.testing.assert_allclose(got, want, atol=2e-4)


# ----------------------------------------------------------------------------- center


def test_center_of_mass_shift_moves_centroid_to_nearest_pixel_of_centre() -> None:
    rng = np.random.default_rng(3)
    x = np.zeros((30, 28, 28), np.uint8)
    for img in x:
        r, c = rng.integers(0, 18, size=2)
        img[r : r + 8, c : c + 8] = rng.integers(0, 256, size=(8, 8))
    out = center_of_mass_shift(x)
    assert out.dtype == np.uint8
    for before, after in zip(x, out, strict=True):
        assert after.astype(np.int64).sum() == before.astype(np.int64).sum()  # nothing cut off
        _, cy0, cx0, _, _ = moments_reference(before)
        _, cy, cx, _, _ = moments_reference(after)
        assert abs(cy - 13.5) <= 0.5 + 1e-9
        assert abs(cx - 13.5) <= 0.5 + 1e-9
        # A whole-pixel translation: the fractional part of the centroid is unchanged.
        assert (cy - cy0) == pytest.approx(round(cy - cy0), abs=1e-9)
        assert (cx - cx0) == pytest.approx(round(cx - cx0), abs=1e-9)


def test_center_of_mass_shift_is_a_translation() -> None:
    img = np.zeros((1, 20, 32), np.float32)
    img[0, 1:4, 2:6] = [[0.2, 0.4, 0.6, 0.8]] * 3
    out = center_of_mass_shift(img)
    assert out.dtype == np.float32
    # Centroid (2, 4) -> centre (9.5, 15.5): 8 rows down, 12 columns right, values unchanged.
    want = np.zeros_like(img)
    want[0, 9:12, 14:18] = img[0, 1:4, 2:6]
    np.testing.assert_array_equal(out, want)
    _, cy, cx, _, _ = moments_reference(out[0])
    assert abs(cy - 9.5) <= 0.5 and abs(cx - 15.5) <= 0.5


def test_center_of_mass_shift_keeps_blank_and_centred_images() -> None:
    blank = np.zeros((2, 7, 8), np.uint8)
    np.testing.assert_array_equal(center_of_mass_shift(blank), blank)
    centred = np.zeros((1, 28, 28), np.uint8)
    centred[0, 10:18, 10:18] = 255
    np.testing.assert_array_equal(center_of_mass_shift(centred), centred)


# ----------------------------------------------------------------------------- batches

BATCH_KERNELS = {
    "median3": lambda x: median_blur(x, size=3),
    "median5": lambda x: median_blur(x, size=5),
    "otsu": otsu_threshold,
    "binarize_otsu": lambda x: binarize(x, method="otsu"),
    "binarize_fixed": lambda x: binarize(x, method="fixed", threshold=0.3),
    "deskew": deskew,
    "deskew_nocenter": lambda x: deskew(x, center=False),
    "center": center_of_mass_shift,
    "unit_float": to_unit_float,
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n) if n.startswith("deskew") else n for n in sorted(BATCH_KERNELS)],
)
def test_kernels_are_batch_independent(name: str, mnist_like_images: np.ndarray) -> None:
    kernel = BATCH_KERNELS[name]
    x = np.concatenate([mnist_like_images[:24], random_blobs(8, seed=9)])
    full = kernel(x)
    for i in range(len(x)):
        np.testing.assert_array_equal(full[i], kernel(x[i : i + 1])[0])
    # And any split into batches.
    parts = np.concatenate([kernel(x[a : a + 5]) for a in range(0, len(x), 5)])
    np.testing.assert_array_equal(parts, full)
