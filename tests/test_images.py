"""Reading image files safely and normalizing them to MNIST format (pipeline.images)."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from pipeline.images import (
    BOX,
    MNIST_CENTER,
    BadImageError,
    decode_gray,
    has_light_background,
    load_digit,
    normalize_digit,
    read_gray,
    refuse_decompression_bombs,
    to_mnist,
)


def mnist_like(seed: int = 0) -> np.ndarray:
    """A 28x28 uint8 stroke drawing, bright ink on black, inside the central 20x20 box."""
    rng = np.random.default_rng(seed)
    im = Image.new("L", (28, 28), 0)
    points = [tuple(int(v) for v in rng.integers(5, 23, size=2)) for _ in range(4)]
    ImageDraw.Draw(im).line(points, fill=255, width=3)
    return np.asarray(im).copy()


def paper_digit(
    size: tuple[int, int] = (120, 200), *, paper: int = 230, ink: int = 20
) -> Image.Image:
    """A dark '7'-like stroke on light paper, ``size`` = (width, height)."""
    w, h = size
    im = Image.new("L", size, paper)
    ImageDraw.Draw(im).line(
        [(w // 4, h // 10), (3 * w // 4, h // 10), (w // 3, 9 * h // 10)], fill=ink, width=w // 10
    )
    return im


def encode(im: Image.Image, fmt: str, **kw: object) -> io.BytesIO:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    buf.seek(0)
    return buf


def centre_of_mass(img: np.ndarray) -> tuple[float, float]:
    m = img.astype(np.float64)
    total = m.sum()
    return float(m.sum(1) @ np.arange(28)) / total, float(m.sum(0) @ np.arange(28)) / total


def ink_box(img: np.ndarray) -> tuple[int, int]:
    """(height, width) of the bounding box of non-zero pixels."""
    rows = np.flatnonzero(img.any(axis=1))
    cols = np.flatnonzero(img.any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


# ----------------------------------------------------------------------- MNIST format


def test_mnist_format_image_is_used_as_is_in_auto_mode() -> None:
    img = mnist_like()
    out = to_mnist(img, normalize="auto")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, img)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [(m, f) for f in ("PNG", "BMP", "TIFF", "WEBP") for m in ("L", "RGB", "RGBA", "LA", "P")
     if not (f == "BMP" and m in ("LA", "RGBA"))],  # BMP has no alpha
)  # fmt: skip
def test_lossless_exports_of_mnist_images_decode_exactly(mode: str, fmt: str) -> None:
    img = mnist_like(3)
    src = Image.fromarray(img).convert(mode)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = to_mnist(decode_gray(encode(src, fmt, **kw)), normalize="auto")
    np.testing.assert_array_equal(out, img)


def test_16_bit_mnist_image_gives_the_8_bit_pixels() -> None:
    img = mnist_like(4)
    src = Image.fromarray(img.astype(np.uint16) * 257)  # full 16-bit range
    gray = decode_gray(encode(src, "PNG"))
    assert gray.dtype == np.float32
    np.testing.assert_array_equal(to_mnist(gray), img)


def test_never_mode_uses_28x28_as_is_and_refuses_other_sizes() -> None:
    light = 255 - mnist_like()
    np.testing.assert_array_equal(to_mnist(light, normalize="never"), light)
    with pytest.raises(BadImageError, match=r"expected a 28x28 image .* got 120x200"):
        to_mnist(np.asarray(paper_digit()), normalize="never")


def test_always_mode_normalizes_even_mnist_format() -> None:
    img = np.zeros((28, 28), np.uint8)
    img[2:8, 2:5] = 255  # a small blob in a corner: already MNIST format, but not centred
    assert np.array_equal(to_mnist(img, normalize="auto"), img)
    out = to_mnist(img, normalize="always")
    assert ink_box(out)[0] == BOX
    cy, cx = centre_of_mass(out)
    assert abs(cy - MNIST_CENTER[0]) <= 0.5 and abs(cx - MNIST_CENTER[1]) <= 0.5


# ---------------------------------------------------------------------- normalization


def test_light_background_is_inverted_cropped_scaled_and_centred() -> None:
    out = to_mnist(np.asarray(paper_digit((120, 200))))
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out.max() == 255
    border = np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]])
    assert border.max() == 0  # black background
    h, w = ink_box(out)
    assert h == BOX  # the longer side (height) is scaled to 20 px
    assert w == pytest.approx(20 * 120 / 200 * 0.9, abs=3)  # aspect kept (ink spans ~90%)
    cy, cx = centre_of_mass(out)
    # Whole-pixel placement of the float patch (<= 0.5 px), then rounding to uint8.
    assert abs(cy - MNIST_CENTER[0]) <= 0.52 and abs(cx - MNIST_CENTER[1]) <= 0.52


def test_28x28_light_background_is_normalized_in_auto_mode() -> None:
    light = 255 - mnist_like(1)
    assert has_light_background(light)
    out = to_mnist(light, normalize="auto")
    assert out[0].max() == 0 and out.max() == 255
    assert max(ink_box(out)) == BOX


def test_wide_digit_scales_its_width_to_20() -> None:
    img = np.zeros((300, 500), np.uint8)
    img[100:160, 50:450] = 200  # 60 x 400 bar: the width is the longer side
    out = normalize_digit(img)
    h, w = ink_box(out)
    assert w == BOX
    assert h == pytest.approx(20 * 60 / 400, abs=1)


def test_small_digit_is_scaled_up() -> None:
    img = np.zeros((28, 28), np.uint8)
    img[10:15, 12:14] = 255  # 5 x 2
    out = normalize_digit(img)
    assert ink_box(out)[0] == BOX


def test_grey_paper_and_faint_ink_are_stretched() -> None:
    im = paper_digit((100, 100), paper=170, ink=120)
    out = to_mnist(np.asarray(im))
    assert out.max() == 255
    assert out[0].max() == 0


def test_blank_image_is_refused() -> None:
    with pytest.raises(BadImageError, match="blank image"):
        to_mnist(np.full((50, 40), 200, np.uint8))


def test_transparent_background_is_composited_on_white() -> None:
    # Black strokes on a fully transparent background, as drawing apps export them.
    rgba = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).line([(20, 10), (60, 70)], fill=(0, 0, 0, 255), width=8)
    gray = decode_gray(encode(rgba, "PNG"))
    assert gray.dtype == np.float32
    assert gray[0, 0] == 1.0  # transparent -> white paper
    out = to_mnist(gray)
    assert out[0].max() == 0 and out.max() == 255
    assert max(ink_box(out)) == BOX


def test_palette_with_transparency_and_bilevel_images() -> None:
    p = paper_digit((60, 90)).convert("P")
    p.info["transparency"] = 0
    out_p = to_mnist(decode_gray(encode(p, "PNG")))
    out_1 = to_mnist(decode_gray(encode(paper_digit((60, 90)).convert("1"), "PNG")))
    out_gif = to_mnist(decode_gray(encode(paper_digit((60, 90)), "GIF")))
    for out in (out_p, out_1, out_gif):
        assert out.shape == (28, 28) and out.max() == 255 and out[0].max() == 0


def test_jpeg_exif_orientation_is_applied() -> None:
    tall = Image.new("L", (40, 120), 255)
    ImageDraw.Draw(tall).rectangle([10, 10, 30, 110], fill=0)  # tall bar
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it by 90 degrees
    buf = encode(tall, "JPEG", exif=exif.tobytes(), quality=95)
    h, w = ink_box(to_mnist(decode_gray(buf)))
    assert w == BOX and h < BOX  # shown (and scored) as a wide bar


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    h=st.integers(24, 300),
    w=st.integers(24, 300),
    light=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_digit_picture_becomes_mnist_format(h: int, w: int, light: bool, seed: int) -> None:
    # A pen stroke (a polyline, like a handwritten digit) anywhere inside the picture.
    rng = np.random.default_rng(seed)
    points = [
        (int(rng.integers(w // 6, w - w // 6)), int(rng.integers(h // 6, h - h // 6)))
        for _ in range(4)
    ]
    xs, ys = zip(*points, strict=True)
    assume(max(max(xs) - min(xs), max(ys) - min(ys)) >= 0.3 * min(h, w))
    im = Image.new("L", (w, h), 0)
    width = max(1, round(min(h, w) * rng.uniform(0.04, 0.12)))
    ImageDraw.Draw(im).line(points, fill=int(rng.integers(120, 256)), width=width)
    img = np.asarray(im)
    if light:
        img = 255 - img
    out = to_mnist(img, normalize="always")
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out.max() == 255
    bh, bw = ink_box(out)
    assert max(bh, bw) == BOX
    cy, cx = centre_of_mass(out)
    assert abs(cy - MNIST_CENTER[0]) <= 1.0 and abs(cx - MNIST_CENTER[1]) <= 1.0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_dark_28x28_images_are_never_changed_in_auto_mode(seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    img[0] = img[-1] = 0  # a dark border majority
    img[:, 0] = 0
    assert not has_light_background(img)
    np.testing.assert_array_equal(to_mnist(img), img)


# ----------------------------------------------------------------------------- bad files


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming ``width x height`` 1-bit pixels, then IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_bad_files_raise_bad_image_error(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(mnist_like()).save(good)
    cases = {
        "empty.png": (b"", "empty file"),
        "text.png": (b"hello, not an image\n" * 10, "unrecognized content"),
        "truncated.png": (good.read_bytes()[:60], "corrupt or truncated"),
        "ppm.png": (encode(Image.new("L", (28, 28)), "PPM").getvalue(), "unrecognized content"),
        "bomb.png": (png_header_only(10_000, 10_000), "decompression bomb"),
        "huge-bomb.png": (png_header_only(20_000, 20_000), "decompression bomb"),
    }
    refuse_decompression_bombs()
    limit = Image.MAX_IMAGE_PIXELS
    for name, (data, fragment) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(BadImageError) as info:
            load_digit(path)
        assert fragment in info.value.reason, (name, info.value.reason)
        assert str(info.value).startswith(str(path))
    assert limit == Image.MAX_IMAGE_PIXELS  # refused, not by raising the limit
    assert load_digit(good).shape == (28, 28)


def test_missing_and_unreadable_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BadImageError, match="no such file"):
        read_gray(tmp_path / "nope.png")
    locked = tmp_path / "locked.png"
    Image.fromarray(mnist_like()).save(locked)
    locked.chmod(0)
    if os.geteuid() != 0:  # root reads mode-000 files anyway
        with pytest.raises(BadImageError, match="permission denied"):
            read_gray(locked)
    # Either way, a read error from the OS becomes a BadImageError.
    real_open = open

    def deny(path: object, *args: object, **kw: object) -> object:
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(BadImageError, match="permission denied"):
        read_gray(locked)


def test_large_jpeg_photo_is_decoded_at_reduced_scale() -> None:
    photo = paper_digit((3000, 4000)).convert("RGB")
    gray = decode_gray(encode(photo, "JPEG", quality=90))
    assert gray.shape == (2000, 1500)  # JPEG draft: the smallest scale keeping >= 1024 px
    out = to_mnist(gray)
    assert max(ink_box(out)) == BOX and out.max() == 255


def test_bomb_is_refused_even_when_other_code_resets_the_warning_filters(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(10_000, 10_000))  # above the limit, below twice it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BadImageError, match="got 100000000 pixels"):
            read_gray(bomb)


def test_light_strokes_on_transparency_are_composited_on_black() -> None:
    # White pen on a transparent background would vanish on white paper.
    rgba = Image.new("RGBA", (80, 80), (255, 255, 255, 0))
    ImageDraw.Draw(rgba).line([(20, 10), (60, 70)], fill=(255, 255, 255, 255), width=8)
    gray = decode_gray(encode(rgba, "PNG"))
    assert gray[0, 0] == 0.0 and gray.max() == 1.0
    out = to_mnist(gray)
    assert out[0].max() == 0 and max(ink_box(out)) == BOX
    # A light page with a transparent margin stays on white (dark ink on the page).
    page = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    ImageDraw.Draw(page).rectangle([4, 4, 75, 75], fill=(240, 240, 240, 255))
    ImageDraw.Draw(page).line([(20, 10), (60, 70)], fill=(10, 10, 10, 255), width=8)
    assert decode_gray(encode(page, "PNG"))[0, 0] == 1.0


def test_pictures_without_one_digit_name_the_file(tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    Image.new("L", (120, 90), 200).save(blank)
    with pytest.raises(BadImageError, match="blank image") as e:
        load_digit(blank)
    assert e.value.path == str(blank) and "blank image" in e.value.reason
    two = Image.new("L", (300, 100), 235)
    draw = ImageDraw.Draw(two)
    draw.line([(20, 20), (70, 20), (40, 85)], fill=20, width=8)
    draw.line([(230, 20), (280, 20), (250, 85)], fill=20, width=8)
    two.save(tmp_path / "two.png")
    with pytest.raises(BadImageError, match="expected one digit, got 2 digit-sized marks"):
        load_digit(tmp_path / "two.png")
