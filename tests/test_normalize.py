"""Robust normalization kernels (pipeline.normalize): each step against a reference where
one exists (scikit-image, scipy), each step on synthetic cases, the corpus end to end."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from corpus import KINDS, digits, mnist_test_digits, render, uci_digits, write_corpus
from PIL import Image, ImageDraw
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

import pipeline.normalize as N  # noqa: N812 (short: every test calls it)
from pipeline.errors import DigitNotFoundError
from pipeline.images import NORMALIZE_MODES, BadImageError, decode_gray, read_gray, to_mnist


def seven(
    size: tuple[int, int] = (200, 160), *, width: int = 12, at: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """A dark '7' (two strokes) on white, ``size`` = (width, height), offset ``at``."""
    im = Image.new("L", size, 235)
    x, y = at
    ImageDraw.Draw(im).line(
        [(x + 50, y + 30), (x + 130, y + 30), (x + 80, y + 140)], fill=20, width=width
    )
    return np.asarray(im).copy()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


# ---------------------------------------------------------------------------- threshold


@pytest.mark.parametrize("seed", range(5))
def test_otsu_equals_scikit_image(seed: int) -> None:
    rng = np.random.default_rng(seed)
    paper = rng.normal(0.05, 0.03, 5000)
    ink = rng.normal(0.7, 0.1, int(rng.integers(50, 2000)))
    values = np.clip(np.concatenate([paper, ink]), 0, 1).astype(np.float32)
    assert N.otsu_threshold(values) == pytest.approx(threshold_otsu(values), abs=1e-9)


def test_otsu_equals_scikit_image_on_a_flattened_photo() -> None:
    gray = np.asarray(render("photo", mnist_test_digits()[0][0], np.random.default_rng(3)))
    steps = N.normalize_steps(gray.mean(axis=2).astype(np.uint8))
    # skimage bins the float32 values, this the same values as float64: one bin apart at most.
    assert steps.threshold == pytest.approx(threshold_otsu(steps.flat), abs=1e-6)


# --------------------------------------------------------------------------- background


def test_gradient_light_and_shadow_are_flattened() -> None:
    h, w = 240, 320
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    light = 0.35 + 0.6 * xx / w  # strong left-to-right gradient
    light *= np.where(yy > 150, 0.6, 1.0)  # a shadow over the bottom
    ink = np.zeros((h, w), np.float32)
    ink[60:200, 100:112] = 1.0  # a vertical stroke crossing into the shadow
    ink[60:72, 100:220] = 1.0
    x = light * (0.85 * (1 - ink) + 0.35 * ink)  # a grey pencil
    flat = N.flatten_background(x, window=80)
    paper = (ndi.distance_transform_edt(ink == 0) > 6) & (np.abs(yy - 150) > 10)
    assert flat[paper].max() < 0.08  # the page reads as paper everywhere
    assert flat[ink > 0].min() > 0.5  # the ink, in light and in shadow: 1 - 0.35 / 0.85
    # A global threshold cannot separate them: the shadowed dark paper is darker than the
    # ink in the bright part.
    assert x[paper].min() < x[ink > 0].max()


def test_light_ink_is_detected_and_gives_the_same_digit() -> None:
    digit = mnist_test_digits()[0][7]
    dark = np.asarray(render("uci_scan", digit, np.random.default_rng(0)))
    assert not N.ink_is_light(dark.astype(np.float32) / 255)
    assert N.ink_is_light((255 - dark).astype(np.float32) / 255)
    a = N.normalize_picture(dark)
    b = N.normalize_picture(255 - dark)
    assert correlation(a, b) > 0.98


# -------------------------------------------------------------------------------- lines


def test_runs_equal_a_binary_opening_with_a_line() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((60, 90)) < 0.7
    mask[20, 5:80] = True
    for axis, length in ((1, 31), (0, 21)):
        se = np.ones((1, length) if axis == 1 else (length, 1), bool)
        expected = ndi.binary_opening(mask, structure=se)
        np.testing.assert_array_equal(N._runs(mask, length, axis), expected)


def test_ruled_lines_are_removed_and_the_crossed_digit_bridged() -> None:
    img = seven((200, 180))
    img[25:28, :] = 150  # a ruled line through the 7's top stroke
    img[100:102, :] = 150  # and one through its leg
    mask = N.flatten_background(img.astype(np.float32) / 255, window=50) > 0.3
    kept, lines = N.remove_lines(mask)
    assert lines[101, :30].all() and not kept[101, :30].any()
    assert kept[101, 80:120].any()  # the leg is bridged across the removed line
    _, n = ndi.label(kept, structure=np.ones((3, 3)))
    assert n == 1  # the 7 is one piece again


def test_form_box_is_removed_but_long_digit_strokes_are_not() -> None:
    img = np.full((200, 200), 240, np.uint8)
    img[10:14, 10:190] = img[186:190, 10:190] = 20  # box: top and bottom
    img[10:190, 10:14] = img[10:190, 186:190] = 20  # left and right
    img[30:170, 95:107] = 20  # a '1' spanning 70% of the height
    mask = img < 128
    kept, _ = N.remove_lines(mask)
    assert not kept[12, :].any() and not kept[:, 12].any()  # the box is gone
    assert kept[30:170, 95:107].all()  # the 1 is intact
    # Without the box the 1 and a 3-like digit with long straight bars are kept whole.
    three = np.zeros((128, 128), bool)
    three[20:32, 20:100] = three[58:70, 40:100] = three[96:108, 20:100] = True
    three[20:108, 88:100] = True
    assert not N.remove_lines(three)[1].any()


# --------------------------------------------------------------------------- components


def test_component_boxes_equal_scipy_find_objects() -> None:
    rng = np.random.default_rng(1)
    labels, n = ndi.label(rng.random((50, 70)) < 0.3)
    box = N._component_boxes(labels, n)
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        assert tuple(box[i]) == (sl[0].start, sl[0].stop - 1, sl[1].start, sl[1].stop - 1)


def test_far_speck_is_dropped_and_near_pieces_kept() -> None:
    img = seven()
    img[150:154, 180:184] = 20  # a speck far from the digit
    img[5:8, 5:8] = 20  # dust in a corner
    img[152:156, 84:88] = 20  # a dot just below the leg (near, but small, outside its box)
    mask = img < 128
    digit, stroke = N.select_digit(mask, mask.astype(np.float32))
    assert not digit[150:154, 180:184].any() and not digit[5:8, 5:8].any()
    assert not digit[152:156, 84:88].any()
    assert digit[30, 60:120].all()
    assert stroke == pytest.approx(12, abs=2)
    # A 7 written in two strokes with a small gap stays whole.
    broken = mask.copy()
    broken[36:44, :] = False
    digit, _ = N.select_digit(broken, broken.astype(np.float32))
    assert digit[30, 60:120].all() and digit[100:130].any()


def test_marks_touching_the_border_are_dropped() -> None:
    img = seven()
    img[:, :4] = 20  # a page edge along the left border
    img[-30:, -45:] = 20  # a dark corner (a finger), heavier than the digit
    out = N.normalize_steps(img)
    assert not out.light_ink
    assert not out.digit[:, :4].any() and not out.digit[-30:, -45:].any()
    assert correlation(out.out, N.normalize_picture(seven())) > 0.95


def test_two_digits_far_apart_get_a_status() -> None:
    img = np.full((160, 420), 235, np.uint8)
    img[:, :200] = np.minimum(img[:, :200], seven())
    img[:, 220:] = np.minimum(img[:, 220:], seven())
    with pytest.raises(DigitNotFoundError, match="expected one digit, got 2 digit-sized"):
        N.normalize_picture(img)
    with pytest.raises(BadImageError, match="expected one digit"):
        to_mnist(img)


def test_blank_pages_and_specks_only_get_a_status() -> None:
    rng = np.random.default_rng(0)
    page = np.clip(rng.normal(200, 4, (300, 300)), 0, 255).astype(np.uint8)
    with pytest.raises(DigitNotFoundError, match="blank image"):
        N.normalize_picture(page)
    page[100:103, 100:103] = 20
    page[200:202, 50:52] = 20
    with pytest.raises(DigitNotFoundError, match="only specks"):
        N.normalize_picture(page)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_pixels_get_a_status(bad: float) -> None:
    img = seven().astype(np.float32) / 255
    img[3, 4] = bad
    with pytest.raises(DigitNotFoundError, match="NaN or infinite"):
        N.normalize_picture(img)
    small = np.zeros((28, 28), np.float32)  # the MNIST-format path too
    small[10:20, 12:15] = 1.0
    small[0, 0] = bad
    for mode in NORMALIZE_MODES:
        with pytest.raises(BadImageError, match="NaN or infinite"):
            to_mnist(small, normalize=mode)


def test_float_tiff_with_nan_is_refused_when_decoded(tmp_path: Path) -> None:
    a = np.zeros((28, 28), np.float32)
    a[5:20, 10:14] = 200.0
    a[2, 2] = np.nan
    path = tmp_path / "f.tif"
    Image.fromarray(a, "F").save(path)
    with pytest.raises(BadImageError, match="NaN or infinite"):
        read_gray(path)


# ------------------------------------------------------------------------- stroke width


@pytest.mark.parametrize("width", [3, 8, 15])
def test_stroke_width_from_the_distance_transform(width: int) -> None:
    mask = np.zeros((120, 120), bool)
    mask[10:110, 50 : 50 + width] = True
    d = ndi.distance_transform_edt(mask)
    assert N.stroke_width(mask) == 2 * d.max()  # a bar's ridge: its centre line
    assert N.stroke_width(mask) == pytest.approx(width + 1, abs=1.01)


def test_markers_are_thinned_and_thin_pens_thickened() -> None:
    scale = N.SHAPE_SCALE
    thick = np.zeros((90, 90), bool)
    thick[5:85, 30:55] = True  # 25 px = 6.2 px of the 28x28 field
    thinner, before = N.normalize_stroke_width(thick, scale=scale)
    assert before > N.THICK
    assert N.stroke_width(thinner) / scale == pytest.approx(N.THICK_TARGET, abs=0.6)
    thin = np.zeros((90, 90), bool)
    thin[5:85, 40:43] = True  # 3 px = 0.75 px of the field
    thicker, before = N.normalize_stroke_width(thin, scale=scale)
    assert before < N.THIN
    assert N.stroke_width(thicker) / scale == pytest.approx(N.THIN_TARGET, abs=0.6)
    usual = np.zeros((90, 90), bool)
    usual[5:85, 40:50] = True  # MNIST's width: unchanged
    assert N.normalize_stroke_width(usual, scale=scale)[0] is usual


def test_mnist_digits_keep_their_shape_through_the_robust_path() -> None:
    images = mnist_test_digits()[0][:200]
    out = np.stack([N.normalize_picture(255 - im) for im in images])
    corr = [correlation(a, b) for a, b in zip(out, images, strict=True)]
    assert np.median(corr) > 0.8 and np.mean(np.array(corr) > 0.6) > 0.95


# ------------------------------------------------------------------------------ corpus


def test_corpus_is_deterministic_and_in_imagefolder_layout(tmp_path: Path) -> None:
    a = write_corpus(tmp_path / "a", ["photo", "exif", "rgba"], 3, seed=5)
    b = write_corpus(tmp_path / "b", ["photo", "exif", "rgba"], 3, seed=5)
    assert [p.relative_to(tmp_path / "a") for p, _, _ in a] == [
        p.relative_to(tmp_path / "b") for p, _, _ in b
    ]
    for (pa, label, kind), (pb, _, _) in zip(a, b, strict=True):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.parent.name == str(label) and pa.parent.parent.name == kind
    exif = next(p for p, _, k in a if k == "exif")
    with Image.open(exif) as im:
        assert im.getexif().get(0x0112) in (3, 6, 8)
    with Image.open(next(p for p, _, k in a if k == "rgba")) as im:
        assert im.mode == "RGBA" and np.asarray(im)[..., 3].min() == 0


def test_uci_digits_are_the_bundled_real_handwriting() -> None:
    images, labels = uci_digits()
    assert images.shape == (1797, 28, 28) and images.dtype == np.uint8
    assert set(labels.tolist()) == set(range(10))
    assert images[:, :4].max() == 0  # MNIST's empty margin


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_corpus_kind_normalizes_to_its_digit(kind: str) -> None:
    """End to end without a model: the 28x28 image the model would see resembles the source
    digit as MNIST shows it (correlation with the normalized clean digit)."""
    source = KINDS[kind][0]
    images, _ = digits(source)
    n = 24
    scores = []
    for i in range(n):
        rng = np.random.default_rng([99, i])
        digit = images[(i * 37) % len(images)]
        im = render(kind, digit, rng)
        path_like = _roundtrip(im, kind)
        out = to_mnist(decode_gray(path_like))
        scores.append(correlation(out, N.normalize_picture(255 - digit)))
    scores_a = np.array(scores)
    # A rotated digit is compared with the upright one: lower correlation by construction.
    median, low = (0.6, 0.45) if kind == "rotated" else (0.7, 0.5)
    assert np.median(scores_a) > median, (kind, np.round(scores_a, 2))
    assert np.mean(scores_a > low) >= 0.9, (kind, np.round(scores_a, 2))


def _roundtrip(im: Image.Image, kind: str) -> io.BytesIO:
    _, _, ext, options = KINDS[kind]
    buf = io.BytesIO()
    save = dict(options)
    if "exif" in im.info:
        save["exif"] = im.info["exif"]
    im.save(buf, "JPEG" if ext == "jpg" else "PNG", **save)
    buf.seek(0)
    return buf


def test_dust_touching_a_stroke_is_opened_away() -> None:
    mask = np.zeros((120, 120), bool)
    mask[10:110, 50:62] = True  # a stroke 12 px wide (13 by the ridge measure)
    mask[60:63, 62:65] = True  # a 3 px speck stuck to its side
    mask[100:103, 68:71] = True  # and one just beside it
    stroke = N.stroke_width(mask)
    out = N.remove_specks(mask, stroke=stroke)
    assert not out[60:63, 63:65].any() and not out[100:103, 68:71].any()
    # The stroke is intact (an opening only rounds its square ends).
    np.testing.assert_array_equal(out[14:106, 50:62], mask[14:106, 50:62])
    r = N.SPECK_OPEN * stroke
    yy, xx = np.mgrid[-4:5, -4:5]
    reference = ndi.binary_opening(mask, structure=(yy**2 + xx**2) <= r * r)
    np.testing.assert_array_equal(out, reference)
