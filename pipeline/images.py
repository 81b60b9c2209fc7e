"""Reading image files safely and normalizing them to MNIST's 28x28 format.

Decoding is restricted to an allow-list of Pillow decoders (:data:`ALLOWED_FORMATS`):
``Image.open(..., formats=...)`` never hands a file to any other plugin, whatever its
name, and the detected ``Image.format`` is checked again after opening. Decompression
bombs are refused: :func:`refuse_decompression_bombs` turns Pillow's
``DecompressionBombWarning`` into an error (``Image.MAX_IMAGE_PIXELS`` is left alone).
Every problem with one file raises :class:`BadImageError` with a one-line message, which
``score`` records in that file's row instead of stopping.

Normalization (:func:`to_mnist`) reproduces how MNIST was made (LeCun et al.): ink is
bright on a black background, the digit's bounding box is scaled with anti-aliasing so its
longer side is 20 px, and the result is placed in a 28x28 field with its centre of mass
at the centre. The rules, in order:

1. **Gray.** Colour is reduced to luma (ITU-R 601-2, Pillow's ``convert("L")``);
   palettes are expanded first; 16-bit images keep their precision (scaled to [0, 1]);
   transparency is composited **on white**, because that is how an image with a
   transparent background is shown on a page or screen (dark pen strokes stay visible),
   except light strokes on a mostly transparent background, which go on black. EXIF
   orientation is applied. Float images with NaN or infinite pixels are refused.
2. **Any picture** (:func:`normalize_digit`, one code path: :mod:`pipeline.normalize`):
   the page's light is flattened (a closing wider than strokes; relative darkening), ink
   of either polarity is found with Otsu's threshold, ruled lines, page edges and form
   boxes are removed, the digit is the main stroke mass and the pieces near it (specks
   and far marks dropped), the stroke width is moved toward MNIST's, and the digit is
   scaled (longer side 20 px) and centred by mass at :data:`MNIST_CENTER`, (14.0, 14.0):
   MNIST's own mean centre of mass. A blank picture, only specks, or two digit-sized
   marks far apart raise :class:`BadImageError` (a status row in ``score``).

With ``normalize="auto"`` an image that already *is* in MNIST format, 28x28 after step 1
with a dark background, is used exactly as decoded, so PNG exports of MNIST images give
the same pixels as the dataset (and cost nothing more). ``"always"`` applies step 2 to
every image; ``"never"`` only step 1 and requires 28x28.
"""

from __future__ import annotations

import os
import re
import warnings
from functools import lru_cache
from typing import BinaryIO, Literal

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline.errors import DigitNotFoundError, InputError
from pipeline.normalize import BOX, MNIST_CENTER, check_finite, normalize_picture

Normalize = Literal["auto", "always", "never"]
NORMALIZE_MODES: tuple[Normalize, ...] = ("auto", "always", "never")

#: Pillow format ids that may be decoded. MPO is how Pillow reports multi-picture JPEGs
#: (most phone cameras); it is decoded by the JPEG plugin.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP")
_ACCEPTED_FORMATS = frozenset({*ALLOWED_FORMATS, "MPO"})
_FORMAT_NAMES = "PNG, JPEG, BMP, TIFF, GIF or WebP"

#: File name patterns scanned by default (matched case-insensitively).
DEFAULT_GLOBS: tuple[str, ...] = (
    "*.png", "*.jpg", "*.jpeg", "*.bmp", "*.tif", "*.tiff", "*.gif", "*.webp",
)  # fmt: skip

MNIST_SHAPE = (28, 28)
# BOX (longer side of the digit's box in the 28x28 field, 20) and MNIST_CENTER (where the
# centre of mass goes, (row, column): MNIST's measured mean) come from pipeline.normalize.
__all__ = ["BOX", "MNIST_CENTER"]  # re-exported for callers of this module
#: Larger JPEGs (photos) are decoded at a reduced scale with this longer side at least:
#: the JPEG decoder scales by 1/2 to 1/8 for free, and a digit that fills a fair part of a
#: 1024 px frame keeps far more detail than the 20 px it is reduced to.
JPEG_WORK_SIDE = 1024
_EXIF_FORMATS = frozenset({"JPEG", "MPO", "WEBP", "TIFF"})
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


class BadImageError(InputError):
    """One image file cannot be used: unreadable, not an allowed format, corrupt, too
    large (decompression bomb) or blank.

    ``reason`` is the message without the file name (what ``score`` puts in ``status``).
    """

    def __init__(self, reason: str, *, path: str | None = None) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.reason = reason
        self.path = path


def refuse_decompression_bombs() -> None:
    """Make Pillow's ``DecompressionBombWarning`` an error in this process.

    Images above ``Image.MAX_IMAGE_PIXELS`` then fail in ``Image.open`` like those above
    twice the limit (``DecompressionBombError``) do. A process-wide filter, because
    ``warnings.catch_warnings`` is not thread-safe; it is only added when missing, since
    re-adding removes and re-inserts it, briefly exposing other threads. Call it in every
    process that decodes (dask.distributed workers too). :func:`decode_gray` also checks
    the size itself, so a filter list reset by other code cannot let a bomb through.
    """
    for action, _, category, _, _ in warnings.filters:
        if category is Image.DecompressionBombWarning and action == "error":
            return
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


# ----------------------------------------------------------------------------- decoding


def _composite_on_white(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``gray`` (uint8) over a white background with coverage ``alpha`` (uint8).

    Light strokes on a mostly transparent background (white pen in a drawing app) would
    vanish on white; they are composited on black instead. Light opaque content covering
    most of the picture is a page with a transparent margin and stays on white.
    """
    if alpha.min() == 255:  # opaque: keep the exact uint8 pixels
        return gray
    a = alpha.astype(np.float32) * np.float32(1 / 255)
    g = gray.astype(np.float32) * np.float32(1 / 255)
    covered = float(a.sum(dtype=np.float64))
    if 0 < covered < 0.5 * a.size and float((g * a).sum(dtype=np.float64)) > 0.5 * covered:
        return g * a
    return g * a + (1.0 - a)


def _pixels_u8(im: Image.Image) -> np.ndarray:
    """The pixels of a loaded 8-bit single-band image, (H, W) uint8, read-only.

    ``np.frombuffer(tobytes())`` is about 20 us faster per image than ``np.asarray(im)``,
    which matters at thousands of small files per second.
    """
    w, h = im.size
    return np.frombuffer(im.tobytes(), np.uint8).reshape(h, w)


def _gray_array(im: Image.Image) -> np.ndarray:
    """Pixels of ``im`` as one gray channel, ink not yet normalized.

    Returns
    -------
    ndarray, shape (H, W)
        uint8 (0-255) when the source is 8-bit and opaque, else float32 in [0, 1].
    """
    if im.format in _JPEG_FORMATS and max(im.size) > 2 * JPEG_WORK_SIDE:
        w, h = im.size
        f = JPEG_WORK_SIDE / max(w, h)
        im.draft("L", (max(1, int(w * f)), max(1, int(h * f))))
    if im.format in _EXIF_FORMATS:
        # Phone photos are often stored sideways with an orientation tag.
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode == "L":
        return _pixels_u8(im)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "L")
        mode = im.mode
        if mode == "L":
            return _pixels_u8(im)
    if mode in ("1", "RGB"):
        return _pixels_u8(im.convert("L"))
    if mode in _ALPHA_MODES:
        la = np.asarray(im.convert("LA"))
        return _composite_on_white(la[..., 0], la[..., 1])
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N (16-bit) and I (32-bit int)
        a = np.asarray(im)
        # "I" carries 16-bit data from PNG/TIFF in practice; wider values are clipped.
        return np.clip(a.astype(np.float32) * np.float32(1 / 65535), 0.0, 1.0)
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        try:
            check_finite(a)  # NaN/inf would make the peak (and every pixel) meaningless
        except DigitNotFoundError as e:
            raise BadImageError(str(e)) from None
        peak = float(a.max(initial=0.0))
        # Float TIFFs come as [0, 1] or [0, 255]; anything else is scaled by its peak.
        scale = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else peak
        return np.clip(a / np.float32(scale), 0.0, 1.0)
    # CMYK, YCbCr, LAB, HSV, RGBX, ...: via RGB.
    return _pixels_u8(im.convert("RGB").convert("L"))


def decode_gray(fp: BinaryIO, *, name: str | None = None) -> np.ndarray:
    """Decode one image file (first frame) into a gray array.

    Parameters
    ----------
    fp : binary file object
        Open for reading; not closed here.
    name : str, optional
        How the file is named in error messages.

    Returns
    -------
    ndarray, shape (H, W)
        uint8 for 8-bit opaque sources, else float32 in [0, 1]; light = white.

    Raises
    ------
    BadImageError
        Not an allowed format, corrupt or truncated, or a decompression bomb.
    """
    try:
        with Image.open(fp, formats=ALLOWED_FORMATS) as im:
            if im.format not in _ACCEPTED_FORMATS:
                raise BadImageError(
                    f"expected a {_FORMAT_NAMES} image, got format {im.format}", path=name
                )
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and im.width * im.height > limit:
                raise Image.DecompressionBombError(f"Image size ({im.width * im.height} pixels)")
            return _gray_array(im)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        got = f"{found.group(1)} pixels" if found else "more"
        raise BadImageError(
            f"expected at most {Image.MAX_IMAGE_PIXELS} pixels, got {got} "
            "(refused as a possible decompression bomb)",
            path=name,
        ) from None
    except UnidentifiedImageError:
        try:
            empty = os.fstat(fp.fileno()).st_size == 0
        except (OSError, AttributeError, ValueError):
            empty = False
        got = (
            "an empty file (0 bytes)"
            if empty
            else "unrecognized content (not an image, or a format that is not allowed)"
        )
        raise BadImageError(f"expected a {_FORMAT_NAMES} image, got {got}", path=name) from None
    except MemoryError:
        raise BadImageError(
            "expected an image that fits in memory, got one too large to decode", path=name
        ) from None
    except Exception as e:  # a malformed file can make a decoder raise almost anything
        detail = str(e) or type(e).__name__
        raise BadImageError(
            f"expected a complete image, got corrupt or truncated data ({detail})", path=name
        ) from None


def read_gray(path: str | os.PathLike[str]) -> np.ndarray:
    """Open and decode the image file at ``path``; see :func:`decode_gray`."""
    name = os.fspath(path)
    try:
        f = open(path, "rb")  # noqa: PTH123, SIM115 (a str path is cheaper than a Path)
    except OSError as e:
        raise BadImageError(
            f"expected a readable file, got {(e.strerror or str(e)).lower()}", path=name
        ) from None
    with f:
        return decode_gray(f, name=name)


# ------------------------------------------------------------------------ normalization


@lru_cache(maxsize=16)
def _border_index(shape: tuple[int, int]) -> np.ndarray:
    """Flat indices of the outermost ring of pixels of an image of ``shape``."""
    ring = np.zeros(shape, bool)
    ring[0] = ring[-1] = True
    ring[:, 0] = ring[:, -1] = True
    return np.flatnonzero(ring)


def _border(gray: np.ndarray) -> np.ndarray:
    # One ``take`` with cached indices: half the cost of concatenating four slices.
    return gray.take(_border_index(gray.shape))


def has_light_background(gray: np.ndarray) -> bool:
    """Whether the median pixel of the outermost ring is light (>= half intensity).

    Parameters
    ----------
    gray : ndarray, shape (H, W), uint8 (0-255) or float in [0, 1]
    """
    half = 128 if gray.dtype == np.uint8 else 0.5
    border = _border(gray)
    # Counting is the median test without a sort, and this runs on every image.
    return bool(np.count_nonzero(border >= half) * 2 > border.size)


def to_unit(gray: np.ndarray) -> np.ndarray:
    """``gray`` as float32 in [0, 1] (uint8 is divided by 255; floats are passed through)."""
    if gray.dtype == np.uint8:
        return gray.astype(np.float32) * np.float32(1 / 255)
    return gray.astype(np.float32, copy=False)


def to_uint8(gray: np.ndarray) -> np.ndarray:
    """``gray`` as uint8 0-255 (uint8 is returned as is; floats in [0, 1] are rounded)."""
    if gray.dtype == np.uint8:
        return gray
    return np.rint(np.clip(gray, 0.0, 1.0) * 255.0).astype(np.uint8)


def normalize_digit(gray: np.ndarray) -> np.ndarray:
    """Normalize any digit picture to MNIST's format (rules 2-6 of the module docstring),
    robustly: :func:`pipeline.normalize.normalize_picture`.

    Parameters
    ----------
    gray : ndarray, shape (H, W), uint8 or float in [0, 1]
        Gray image; ink may be dark or light.

    Returns
    -------
    ndarray, shape (28, 28), uint8
        Bright ink on black, longer side 20 px, centre of mass near (14, 14).

    Raises
    ------
    BadImageError
        No usable digit: blank, only specks, several digits far apart, NaN/inf pixels.
    """
    try:
        return normalize_picture(gray)
    except DigitNotFoundError as e:
        raise BadImageError(str(e)) from None


def to_mnist(gray: np.ndarray, *, normalize: Normalize = "auto") -> np.ndarray:
    """A decoded gray image as a 28x28 uint8 MNIST-format image.

    Parameters
    ----------
    gray : ndarray, shape (H, W), uint8 or float in [0, 1]
    normalize : {"auto", "always", "never"}
        ``"auto"``: use 28x28 dark-background images as they are, normalize the rest;
        ``"always"``: normalize every image; ``"never"``: require 28x28 and use it as is.

    Returns
    -------
    ndarray, shape (28, 28), uint8
    """
    if gray.dtype != np.uint8:  # uint8 (the fast path) cannot hold NaN or inf
        try:
            check_finite(gray)
        except DigitNotFoundError as e:
            raise BadImageError(str(e)) from None
    if normalize == "never":
        if gray.shape != MNIST_SHAPE:
            raise BadImageError(
                f"expected a 28x28 image with --normalize never, got "
                f"{gray.shape[1]}x{gray.shape[0]} (width x height)"
            )
        return to_uint8(gray)
    if normalize == "auto" and gray.shape == MNIST_SHAPE and not has_light_background(gray):
        return to_uint8(gray)
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"expected normalize in {NORMALIZE_MODES}, got {normalize!r}")
    return normalize_digit(gray)


def load_digit(path: str | os.PathLike[str], *, normalize: Normalize = "auto") -> np.ndarray:
    """Read an image file and return it in MNIST format, shape (28, 28), uint8.

    Raises :class:`BadImageError` for any bad file (``reason`` says why).
    """
    gray = read_gray(path)
    try:
        return to_mnist(gray, normalize=normalize)
    except BadImageError as e:
        raise BadImageError(e.reason, path=os.fspath(path)) from None
