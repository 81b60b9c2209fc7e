"""Shape feature kernels (pipeline.shape_features) against scikit-image and hand-made answers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.draw import disk, ellipse, line
from skimage.measure import block_reduce, label
from skimage.measure import euler_number as sk_euler_number

from pipeline.shape_features import (
    MOMENT_NAMES,
    TOPOLOGY_NAMES,
    component_count,
    crossings,
    euler_number,
    moment_features,
    pixel_grid,
    projection_profiles,
    topology,
    zoning,
)

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
M = {name: i for i, name in enumerate(MOMENT_NAMES)}


def random_masks(seed: int, shape: tuple[int, int, int], density: float) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < density


# ----------------------------------------------------------------------------- topology


@SETTINGS
@given(
    n=st.integers(1, 5),
    H=st.integers(1, 15),
    W=st.integers(1, 15),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_euler_number_equals_skimage(n: int, H: int, W: int, density: float, seed: int) -> None:
    ink = random_masks(seed, (n, H, W), density)
    want = [sk_euler_number(img, connectivity=2) for img in ink]
    np.testing.assert_array_equal(euler_number(ink), want)


@SETTINGS
@given(
    n=st.integers(1, 5),
    H=st.integers(1, 15),
    W=st.integers(1, 15),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_component_count_equals_skimage_label(
    n: int, H: int, W: int, density: float, seed: int
) -> None:
    ink = random_masks(seed, (n, H, W), density)
    want = [label(img, connectivity=2).max() for img in ink]
    np.testing.assert_array_equal(component_count(ink), want)


def test_component_count_with_blank_images_between() -> None:
    ink = np.zeros((5, 6, 6), bool)
    ink[1, 0, 0] = ink[1, 5, 5] = True  # two components
    ink[3, :, 2] = True  # one, touching the top and bottom rows
    ink[4, 5, :] = True  # one, on the last row (next to where image 3's column ends)
    np.testing.assert_array_equal(component_count(ink), [0, 2, 0, 1, 1])


def test_diagonal_touch_is_one_component() -> None:
    ink = np.zeros((1, 4, 4), bool)
    ink[0, 0, 0] = ink[0, 1, 1] = ink[0, 2, 2] = True
    np.testing.assert_array_equal(component_count(ink), [1])
    np.testing.assert_array_equal(euler_number(ink), [1])


def ring(shape: tuple[int, int], center: tuple[int, int], outer: int, inner: int) -> np.ndarray:
    img = np.zeros(shape, np.float32)
    img[disk(center, outer, shape=shape)] = 1.0
    img[disk(center, inner, shape=shape)] = 0.0
    return img


def digit_zero() -> np.ndarray:
    img = np.zeros((28, 28), np.float32)
    img[ellipse(14, 14, 10, 7, shape=img.shape)] = 1.0
    img[ellipse(14, 14, 7, 4, shape=img.shape)] = 0.0
    return img


def digit_eight() -> np.ndarray:
    return np.maximum(ring((28, 28), (8, 14), 6, 3), ring((28, 28), (19, 14), 7, 4))


def digit_one() -> np.ndarray:
    img = np.zeros((28, 28), np.float32)
    for dc in (0, 1, 2):
        rr, cc = line(4, 16 + dc, 23, 11 + dc)
        img[rr, cc] = 1.0
    return img


@pytest.mark.parametrize(
    ("make", "components", "holes"),
    [(digit_zero, 1, 1), (digit_eight, 1, 2), (digit_one, 1, 0)],
    ids=["zero", "eight", "one"],
)
def test_topology_of_drawn_digits(make: object, components: int, holes: int) -> None:
    img = make()  # type: ignore[operator]
    out = topology(img[None])
    assert out.dtype == np.float32 and out.shape == (1, len(TOPOLOGY_NAMES))
    assert dict(zip(TOPOLOGY_NAMES, out[0].tolist(), strict=True)) == {
        "components": components,
        "holes": holes,
        "euler": components - holes,
    }


def test_topology_threshold_and_batch() -> None:
    imgs = np.stack([digit_zero(), digit_eight(), digit_one(), np.zeros((28, 28), np.float32)])
    dim = imgs * 0.4  # below the default threshold 0.5: no ink
    np.testing.assert_array_equal(topology(dim), np.zeros((4, 3)))
    np.testing.assert_array_equal(
        topology(dim, threshold=0.3), [[1, 1, 0], [1, 2, -1], [1, 0, 1], [0, 0, 0]]
    )
    u8 = np.rint(imgs * 255).astype(np.uint8)
    np.testing.assert_array_equal(topology(u8), topology(imgs))


# ----------------------------------------------------------------------------- zoning


def zoning_reference(img: np.ndarray, grid: int) -> np.ndarray:
    """Mean of each cell; cell boundaries at round(i * side / grid)."""
    H, W = img.shape
    re = [round(i * H / grid) for i in range(grid + 1)]
    ce = [round(i * W / grid) for i in range(grid + 1)]
    return np.array(
        [img[re[r] : re[r + 1], ce[c] : ce[c + 1]].mean() for r in range(grid) for c in range(grid)]
    )


@pytest.mark.parametrize(
    ("shape", "grid"),
    [((28, 28), 4), ((28, 28), 3), ((28, 28), 5), ((20, 32), 4), ((13, 7), 7), ((9, 9), 1)],
)
def test_zoning_equals_cell_means(shape: tuple[int, int], grid: int) -> None:
    x = np.random.default_rng(grid).integers(0, 256, size=(3, *shape), dtype=np.uint8)
    got = zoning(x, grid=grid)
    assert got.dtype == np.float32 and got.shape == (3, grid * grid)
    for img, row in zip(x, got, strict=True):
        np.testing.assert_allclose(row, zoning_reference(img / 255.0, grid), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("side", "grid"), [(28, 3), (28, 5), (20, 6), (7, 7), (100, 9)])
def test_zoning_cells_are_as_equal_as_possible(side: int, grid: int) -> None:
    """Cell heights differ by at most one pixel, measured through zoning itself: a single
    full row of ink lands in one cell row, with density 1 / (height of that cell row)."""
    x = np.zeros((side, side, side), np.float32)
    x[np.arange(side), np.arange(side), :] = 1.0  # image r: row r full of ink
    cells = zoning(x, grid=grid).reshape(side, grid, grid)[:, :, 0]  # first cell column
    assert ((cells > 0).sum(axis=1) == 1).all()
    cell_row = cells.argmax(axis=1)
    assert (np.diff(cell_row) >= 0).all() and cell_row[0] == 0 and cell_row[-1] == grid - 1
    heights = np.bincount(cell_row, minlength=grid)
    assert heights.sum() == side and heights.max() - heights.min() <= 1
    np.testing.assert_allclose(cells.max(axis=1), 1 / heights[cell_row], rtol=1e-6)


def test_zoning_rejects_bad_grids() -> None:
    with pytest.raises(ValueError, match="expected 1 <= grid"):
        zoning(np.zeros((1, 5, 8), np.uint8), grid=6)
    with pytest.raises(ValueError, match="expected 1 <= grid"):
        zoning(np.zeros((1, 5, 8), np.uint8), grid=0)


# ----------------------------------------------------------------------------- pixel grid


@pytest.mark.parametrize(
    ("shape", "factor"),
    [((28, 28), 2), ((28, 28), 4), ((28, 28), 7), ((20, 32), 4), ((6, 9), 3), ((28, 28), 28)],
)
def test_pixel_grid_equals_block_reduce_mean(shape: tuple[int, int], factor: int) -> None:
    x = np.random.default_rng(factor).integers(0, 256, size=(3, *shape), dtype=np.uint8)
    got = pixel_grid(x, factor=factor)
    assert got.dtype == np.float32
    want = np.stack([block_reduce(img / 255.0, (factor, factor), np.mean).ravel() for img in x])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_pixel_grid_factor_1_is_raw_pixels() -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(2, 5, 7), dtype=np.uint8)
    got = pixel_grid(x, factor=1)
    assert got.dtype == np.float32 and got.shape == (2, 35)
    np.testing.assert_allclose(got, (x / 255.0).reshape(2, -1), rtol=1e-6)


@pytest.mark.parametrize(("shape", "factor"), [((28, 28), 3), ((20, 32), 8), ((28, 28), 0)])
def test_pixel_grid_rejects_factors_not_dividing(shape: tuple[int, int], factor: int) -> None:
    with pytest.raises(ValueError, match="expected a factor dividing"):
        pixel_grid(np.zeros((1, *shape), np.uint8), factor=factor)


# ----------------------------------------------------------------------------- profiles


def test_projection_profiles_known_answer() -> None:
    img = np.zeros((1, 3, 4), np.float32)
    img[0, 0, :] = 1.0  # full top row
    img[0, 2, 1] = 0.5
    got = projection_profiles(img)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[0], [1.0, 0.0, 0.125, 1 / 3, 0.5, 1 / 3, 1 / 3])


def test_projection_profiles_uint8_scaled() -> None:
    img = np.full((2, 4, 2), 255, np.uint8)
    np.testing.assert_array_equal(projection_profiles(img), np.ones((2, 6)))


def test_crossings_known_answer() -> None:
    # rows: "#.#.", "....", "####", ".#.#"  (ink = 1)
    rows = ["#.#.", "....", "####", ".#.#"]
    img = np.array([[c == "#" for c in r] for r in rows], np.float32)[None]
    got = crossings(img)
    assert got.dtype == np.float32 and got.shape == (1, 8)
    # per row: 2, 0, 1, 2 runs; per column: col0 "#.#." 2, col1 "..##" 1, col2 "#.#." 2,
    # col3 "..##" 1
    np.testing.assert_array_equal(got[0], [2, 0, 1, 2, 2, 1, 2, 1])


def test_crossings_threshold() -> None:
    img = np.array([[[0.2, 0.6, 0.2, 0.6, 0.9]]], np.float32)
    np.testing.assert_array_equal(crossings(img)[0, :1], [2])
    np.testing.assert_array_equal(crossings(img, threshold=0.1)[0, :1], [1])
    np.testing.assert_array_equal(crossings(img, threshold=0.7)[0, :1], [1])
    np.testing.assert_array_equal(crossings(img, threshold=0.95)[0, :1], [0])


# ----------------------------------------------------------------------------- moments


def centred_square() -> np.ndarray:
    img = np.zeros((1, 28, 28), np.float32)
    img[0, 10:18, 10:18] = 1.0
    return img


def test_moment_features_of_a_centred_square() -> None:
    f = moment_features(centred_square())
    assert f.dtype == np.float32 and f.shape == (1, len(MOMENT_NAMES))
    f = f[0]
    assert f[M["ink"]] == pytest.approx(64 / 784)
    assert f[M["correlation"]] == pytest.approx(0, abs=1e-6)
    assert f[M["slant"]] == pytest.approx(0, abs=1e-6)
    assert f[M["skew_y"]] == pytest.approx(0, abs=1e-5)
    assert f[M["skew_x"]] == pytest.approx(0, abs=1e-5)
    assert f[M["aspect"]] == 1.0
    assert f[M["height"]] == pytest.approx(8 / 28)
    assert f[M["width"]] == pytest.approx(8 / 28)
    # Standard deviation of a uniform 8-pixel run: sqrt((8^2 - 1) / 12) pixels.
    assert f[M["spread_y"]] == pytest.approx(np.sqrt(63 / 12) / 28, rel=1e-5)
    assert f[M["spread_x"]] == pytest.approx(np.sqrt(63 / 12) / 28, rel=1e-5)


def test_moment_features_centroid_of_a_centred_square_is_one_half() -> None:
    f = moment_features(centred_square())[0]
    assert f[M["centroid_y"]] == pytest.approx(0.5, abs=1e-6)
    assert f[M["centroid_x"]] == pytest.approx(0.5, abs=1e-6)


def test_moment_features_centroid_is_monotone_and_scaled() -> None:
    """Centroid fractions grow by exactly 1/side per pixel of translation."""
    a = centred_square()
    b = np.roll(a, (3, -2), axis=(1, 2))
    fa, fb = moment_features(np.concatenate([a, b]))
    assert fb[M["centroid_y"]] - fa[M["centroid_y"]] == pytest.approx(3 / 28, abs=1e-6)
    assert fb[M["centroid_x"]] - fa[M["centroid_x"]] == pytest.approx(-2 / 28, abs=1e-6)


def test_moment_features_of_slanted_and_elongated_shapes() -> None:
    diag = np.zeros((1, 28, 28), np.float32)
    rr, cc = line(4, 4, 23, 23)
    diag[0, rr, cc] = 1.0
    anti = diag[:, :, ::-1]
    bar = np.zeros((1, 28, 28), np.float32)
    bar[0, 4:24, 12:16] = 1.0
    f = moment_features(np.concatenate([diag, anti, bar]))
    assert f[0, M["correlation"]] == pytest.approx(1.0, abs=1e-5)
    assert f[0, M["slant"]] == pytest.approx(1.0, abs=1e-5)
    assert f[1, M["correlation"]] == pytest.approx(-1.0, abs=1e-5)
    assert f[1, M["slant"]] == pytest.approx(-1.0, abs=1e-5)
    assert f[2, M["aspect"]] == pytest.approx(5.0)
    assert f[2, M["height"]] == pytest.approx(20 / 28)


def test_moment_features_skew_sign() -> None:
    img = np.zeros((1, 20, 20), np.float32)
    img[0, 2:10, 5] = 1.0
    img[0, 2, 5:15] = 1.0  # more ink at the top: the row distribution has a long lower tail
    f = moment_features(img)[0]
    assert f[M["skew_y"]] > 0.5
    assert f[M["skew_x"]] > 0.1


@pytest.mark.parametrize("shape", [(28, 28), (1, 1), (1, 9), (7, 1), (20, 32)])
def test_moment_features_of_empty_and_degenerate_images_are_finite(shape: tuple[int, int]) -> None:
    H, W = shape
    blank = np.zeros((1, H, W), np.float32)
    dot = blank.copy()
    dot[0, H // 2, W // 2] = 1.0
    row = blank.copy()
    row[0, H // 2, :] = 0.7
    col = blank.copy()
    col[0, :, W // 2] = 0.3
    full = np.ones((1, H, W), np.float32)
    with np.errstate(divide="raise", invalid="raise", over="raise"):  # no warnings leak
        f = moment_features(np.concatenate([blank, dot, row, col, full]))
    assert np.isfinite(f).all(), f
    assert f[0, M["ink"]] == 0 and f[0, M["height"]] == 0 and f[0, M["aspect"]] == 0


@SETTINGS
@given(
    n=st.integers(1, 4),
    H=st.integers(1, 12),
    W=st.integers(1, 12),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_shape_kernel_is_finite_float32(
    n: int, H: int, W: int, density: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, H, W), dtype=np.uint8)
    x[rng.random(x.shape) > density] = 0
    for out in (
        moment_features(x),
        zoning(x, grid=1),
        pixel_grid(x, factor=1),
        projection_profiles(x),
        crossings(x),
        topology(x),
    ):
        assert out.dtype == np.float32 and out.shape[0] == n
        assert np.isfinite(out).all()


SHAPE_KERNELS = {
    "moments": moment_features,
    "zoning3": lambda x: zoning(x, grid=3),
    "pixels2": lambda x: pixel_grid(x, factor=2),
    "profiles": projection_profiles,
    "crossings": crossings,
    "topology": topology,
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n) if n == "moments" else n for n in sorted(SHAPE_KERNELS)],
)
def test_shape_kernels_are_batch_independent(name: str, mnist_like_images: np.ndarray) -> None:
    kernel = SHAPE_KERNELS[name]
    x = mnist_like_images[:40]
    full = kernel(x)
    for i in range(len(x)):
        np.testing.assert_array_equal(full[i], kernel(x[i : i + 1])[0])
