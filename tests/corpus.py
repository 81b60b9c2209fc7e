"""A realistic corpus of digit pictures for tests and the benchmark (no network, seeded).

Digits are real handwriting: MNIST test digits (read from the idx files) and
scikit-learn's bundled UCI digits (8x8, other writers). Each ``render_<kind>`` function
turns one digit (28x28 uint8, bright ink on black, as MNIST stores it) into the kind of
picture a user would hand to ``score``: a phone photo of paper, a dusty scan, ruled paper,
a form box, a marker, a thin pen, a small digit in a corner of a page, a rotated digit,
coloured ink on coloured paper, chalk on a board, a transparent PNG, a sideways JPEG with
an EXIF orientation tag. Every kind stays readable by a person at a glance.

:func:`write_corpus` writes ``folder/<kind>/<label>/<i>.<ext>`` (torchvision's ImageFolder
layout, so the label is known from the path).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from pipeline.idx import read_idx

#: The real MNIST folder (``../shared/data/mnist`` beside the repository root).
MNIST_DIR = Path(__file__).resolve().parents[3] / "shared/data/mnist"
if not MNIST_DIR.is_dir():  # the main checkout sits one level higher than the worktrees
    MNIST_DIR = Path(__file__).resolve().parents[2] / "shared/data/mnist"

Renderer = Callable[[np.ndarray, np.random.Generator], Image.Image]


# ------------------------------------------------------------------------ the digits


@lru_cache(maxsize=2)
def mnist_test_digits(mnist_dir: str = str(MNIST_DIR)) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's 10,000 test images (n, 28, 28) uint8 and labels (n,) uint8."""
    d = Path(mnist_dir)
    return (
        read_idx(d / "t10k-images-idx3-ubyte.gz"),
        read_idx(d / "t10k-labels-idx1-ubyte.gz"),
    )


def uci_to_digit28(img8: np.ndarray) -> np.ndarray:
    """A UCI 8x8 digit (values 0-16) as a 28x28 uint8 digit in MNIST's layout.

    The 8x8 counts are block averages of a 32x32 bitmap; they are enlarged smoothly to the
    20x20 box MNIST uses and put in the middle of a 28x28 field.
    """
    a = np.asarray(img8, np.float32) * np.float32(255 / 16)
    big = Image.fromarray(a).resize((20, 20), Image.Resampling.BICUBIC)
    out = np.zeros((28, 28), np.float32)
    out[4:24, 4:24] = np.asarray(big)
    return np.clip(out, 0, 255).astype(np.uint8)


@lru_cache(maxsize=1)
def uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled UCI digits (1,797) as (n, 28, 28) uint8 and labels (n,)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    d = load_digits()
    images = np.stack([uci_to_digit28(im) for im in d.images])
    return images, d.target.astype(np.uint8)


# ---------------------------------------------------------------- drawing primitives


def _ink(
    digit28: np.ndarray, height: int, *, level: float = 0.45, soft: float = 0.25
) -> np.ndarray:
    """Coverage of pen ink (float32 in [0, 1]) for the 28x28 field drawn ``height`` px tall.

    The digit is enlarged smoothly and its edge sharpened around ``level`` (a higher level
    gives a thinner pen), the way a real pen leaves an anti-aliased edge on a photo.
    """
    a = Image.fromarray(np.asarray(digit28, np.float32) / np.float32(255))
    v = np.asarray(a.resize((height, height), Image.Resampling.BICUBIC))
    return np.clip((v - level) / soft + 0.5, 0.0, 1.0).astype(np.float32)


def _place(canvas_hw: tuple[int, int], ink: np.ndarray, top: int, left: int) -> np.ndarray:
    """``ink`` pasted at (top, left) on an empty canvas (clipped at the edges)."""
    H, W = canvas_hw
    out = np.zeros((H, W), np.float32)
    h, w = ink.shape
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + h, H), min(left + w, W)
    out[t0:t1, l0:l1] = ink[t0 - top : t1 - top, l0 - left : l1 - left]
    return out


def _random_place(
    rng: np.random.Generator, canvas_hw: tuple[int, int], ink: np.ndarray, margin: float = 0.05
) -> np.ndarray:
    H, W = canvas_hw
    h, w = ink.shape
    # The 28x28 field has a 4 px empty margin; let it overlap the canvas edge a little.
    slack = int(h * 4 / 28 * 0.5)
    my, mx = int(margin * H) - slack, int(margin * W) - slack
    top = int(rng.integers(my, max(my + 1, H - h - my)))
    left = int(rng.integers(mx, max(mx + 1, W - w - mx)))
    return _place(canvas_hw, ink, top, left)


def _compose(
    paper: np.ndarray, ink_rgb: Sequence[float] | np.ndarray, cover: np.ndarray
) -> np.ndarray:
    """RGB float image: ``paper`` (H, W, 3) covered by ink colour where ``cover`` > 0."""
    c = cover[..., None]
    return paper * (1.0 - c) + np.asarray(ink_rgb, np.float32) * c


def _paper(hw: tuple[int, int], rgb: Sequence[float] | np.ndarray) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, np.float32), (*hw, 3)).copy()


def _texture(rng: np.random.Generator, hw: tuple[int, int], amount: float) -> np.ndarray:
    """Paper fibre: smooth noise at a few pixels' scale, multiplicative around 1."""
    n = ndi.gaussian_filter(rng.standard_normal(hw).astype(np.float32), 1.5)
    return 1.0 + amount * n / max(float(n.std()), 1e-6)


def _to_image(rgb: np.ndarray, rng: np.random.Generator, noise: float = 0.0) -> Image.Image:
    """Float RGB (0-255) with optional sensor noise -> 8-bit RGB image."""
    if noise:
        rgb = rgb + rng.normal(0.0, noise, rgb.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")


def _gray_image(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8), "L")


def _illumination(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """Graded light (a plane of 0.55-1.0 in a random direction), a vignette and a soft
    shadow (a half-plane darkened to 0.55-0.75 with a blurred edge)."""
    H, W = hw
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    yy /= H
    xx /= W
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    low = rng.uniform(0.55, 0.75)
    light = low + (1.0 - low) * ramp
    light *= 1.0 - 0.25 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    # The shadow of a hand or phone: one side of a line through a point near an edge.
    a2 = rng.uniform(0, 2 * np.pi)
    px, py = rng.uniform(0, 1), rng.uniform(0, 1)
    side = (np.cos(a2) * (xx - px) + np.sin(a2) * (yy - py)) > 0.25
    shade = np.where(side, np.float32(rng.uniform(0.55, 0.75)), np.float32(1.0))
    shade = ndi.gaussian_filter(shade, rng.uniform(0.03, 0.08) * max(H, W))
    return (light * shade).astype(np.float32)


def _canvas(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int]:
    return int(rng.integers(lo, hi)), int(rng.integers(lo, hi))


# ------------------------------------------------------------------------- the kinds


def render_mnist(digit28: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """The MNIST image itself, as a PNG export would store it (the exact fast path)."""
    return Image.fromarray(np.asarray(digit28, np.uint8), "L")


def render_photo(digit28: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A phone photo: grey or beige paper, graded light, a soft shadow, slight defocus,
    sensor noise (saved as JPEG q~70 by :func:`write_corpus`)."""
    hw = _canvas(rng, 200, 400)
    size = int(min(hw) * rng.uniform(0.55, 0.85))
    cover = _random_place(rng, hw, _ink(digit28, size), 0.04)
    cover = ndi.gaussian_filter(cover, rng.uniform(0.5, 1.2))
    base = rng.uniform(170, 230)
    tint = np.array([1.0, rng.uniform(0.95, 1.0), rng.uniform(0.82, 1.0)], np.float32)
    paper = _paper(hw, base * tint) * _texture(rng, hw, 0.02)[..., None]
    ink = np.array([rng.uniform(20, 60)] * 2 + [rng.uniform(30, 90)], np.float32)
    rgb = _compose(paper, ink, cover * rng.uniform(0.85, 1.0))
    rgb *= _illumination(rng, hw)[..., None]
    return _to_image(rgb, rng, noise=rng.uniform(3, 7))


def render_scan_dust(digit28: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A clean scan of white paper with dust specks and hairs anywhere on the page."""
    hw = _canvas(rng, 150, 300)
    size = int(min(hw) * rng.uniform(0.5, 0.8))
    cover = _random_place(rng, hw, _ink(digit28, size), 0.05)
    dust = np.zeros(hw, np.float32)
    for _ in range(int(rng.integers(6, 25))):
        y, x = int(rng.integers(0, hw[0])), int(rng.integers(0, hw[1]))
        r = int(rng.integers(1, 4))
        dust[max(0, y - r) : y + r, max(0, x - r) : x + r] = 1.0
    dust = ndi.gaussian_filter(dust, 0.7) * 1.5
    gray = rng.uniform(235, 252) * (1 - np.clip(cover + dust, 0, 1)) + 15 * np.clip(
        cover + dust, 0, 1
    )
    gray += rng.normal(0, 2, hw)
    return _gray_image(gray)


def render_ruled(digit28: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A digit written on ruled paper: light blue lines across the page, sometimes a red
    margin line, the digit crossing a line or two."""
    hw = _canvas(rng, 200, 320)
    spacing = int(rng.integers(24, 40))
    size = int(spacing * rng.uniform(2.0, 3.0))
    cover = _random_place(rng, hw, _ink(digit28, size), 0.08)
    lines = np.zeros(hw, np.float32)
    thick = int(rng.integers(1, 4))
    for y in range(int(rng.integers(5, spacing)), hw[0], spacing):
        lines[y : y + thick] = 1.0
    paper = _paper(hw, (250, 250, 245))
    rgb = _compose(paper, (120, 160, 225), lines)
    if rng.random() < 0.5:
        x = int(rng.integers(10, 30))
        rgb[:, x : x + 2] = (220, 90, 90)
    pen = (20, 20, 60) if rng.random() < 0.5 else (15, 15, 15)
    return _to_image(_compose(rgb, pen, cover), rng, noise=2)


def render_form_box(digit28: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A digit written in a form's box: a dark rectangle inset from the image edge (as a
    crop of one field of a scanned form), the digit inside, sometimes touching it."""
    hw = _canvas(rng, 120, 240)
    H, W = hw
    t, b = int(H * rng.uniform(0.03, 0.12)), int(H * rng.uniform(0.88, 0.97))
    lft, r = int(W * rng.uniform(0.03, 0.12)), int(W * rng.uniform(0.88, 0.97))
    k = int(rng.integers(2, 5))
    box = np.zeros(hw, np.float32)
    box[t : t + k, lft:r] = box[b - k : b, lft:r] = 1.0
    box[t:b, lft : lft + k] = box[t:b, r - k : r] = 1.0
    size = int(min(b - t, r - lft) * rng.uniform(0.85, 1.1))
    ink = _ink(digit28, size)
    top = t + (b - t - size) // 2 + int(rng.integers(-3, 4))
    left = lft + (r - lft - size) // 2 + int(rng.integers(-3, 4))
    inner = _place(hw, ink, top, left)
    cover = np.clip(inner + box * 0.9, 0, 1)
    gray = 245 * (1 - cover) + 25 * cover + rng.normal(0, 2, hw)
    return _gray_image(gray)


def render_marker(digit28: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Thick marker strokes (about 2-3 times MNIST's width), black on white, JPEG."""
    hw = _canvas(rng, 150, 300)
    size = int(min(hw) * rng.uniform(0.55, 0.8))
    ink = _ink(digit28, size, level=0.3)
    r = max(1, int(size * rng.uniform(0.03, 0.045)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    ink = ndi.grey_dilation(ink, footprint=(yy**2 + xx**2) <= r * r)
    cover = _random_place(rng, hw, ink, 0.04)
    gray = 248 * (1 - cover) + 10 * cover + rng.normal(0, 2, hw)
    return _gray_image(gray)


def render_thin_pen(digit28: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A thin ball-point pen: a continuous line along the digit's centre line (its
    skeleton), a quarter to a third of MNIST's relative width, dark grey on white."""
    from skimage.morphology import skeletonize  # dev/bench dependency, tests only

    hw = _canvas(rng, 150, 300)
    size = int(min(hw) * rng.uniform(0.6, 0.85))
    centre = skeletonize(_ink(digit28, size) > 0.5)
    radius = size * rng.uniform(0.01, 0.016)
    d = ndi.distance_transform_edt(~centre)
    pen = np.clip(radius + 0.5 - d, 0.0, 1.0).astype(np.float32)
    cover = _random_place(rng, hw, pen, 0.04)
    ink = rng.uniform(30, 90)
    gray = 245 * (1 - cover) + ink * cover + rng.normal(0, 2, hw)
    return _gray_image(gray)


def render_small_corner(digit28: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A small digit (10-15% of the page) near a corner of a large, slightly noisy page."""
    hw = _canvas(rng, 300, 480)
    H, W = hw
    size = int(min(hw) * rng.uniform(0.14, 0.2))
    top = int(rng.integers(5, 20)) if rng.random() < 0.5 else H - size - int(rng.integers(5, 20))
    left = int(rng.integers(5, 20)) if rng.random() < 0.5 else W - size - int(rng.integers(5, 20))
    cover = _place(hw, _ink(digit28, size), top, left)
    gray = 240 * (1 - cover) + 30 * cover + rng.normal(0, 3, hw)
    return _gray_image(gray)


def render_rotated(digit28: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """The digit rotated by 10-20 degrees either way, black on white."""
    hw = _canvas(rng, 100, 220)
    size = int(min(hw) * rng.uniform(0.6, 0.85))
    upright = Image.fromarray(_ink(digit28, size))
    angle = rng.uniform(10, 20) * rng.choice([-1, 1])
    turned = upright.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=0.0)
    ink = np.clip(np.asarray(turned), 0, 1)
    pad = _random_place(rng, hw, ink[: hw[0], : hw[1]], 0.02)
    gray = 245 * (1 - pad) + 20 * pad + rng.normal(0, 2, hw)
    return _gray_image(gray)


_PAPERS = ((250, 235, 150), (250, 205, 215), (200, 235, 200), (195, 220, 250), (245, 225, 200))
_INKS = ((30, 50, 170), (190, 25, 30), (20, 110, 40), (100, 30, 130), (10, 10, 10))


def render_color(digit28: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Coloured ink (blue, red, green, purple, black) on coloured paper, JPEG."""
    hw = _canvas(rng, 150, 300)
    size = int(min(hw) * rng.uniform(0.55, 0.8))
    cover = _random_place(rng, hw, _ink(digit28, size), 0.04)
    paper = (
        _paper(hw, _PAPERS[int(rng.integers(len(_PAPERS)))]) * _texture(rng, hw, 0.02)[..., None]
    )
    rgb = _compose(paper, _INKS[int(rng.integers(len(_INKS)))], cover)
    return _to_image(rgb, rng, noise=3)


def render_light_on_dark(digit28: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Chalk on a board: light strokes on a dark green or grey, slightly uneven board."""
    hw = _canvas(rng, 150, 300)
    size = int(min(hw) * rng.uniform(0.55, 0.8))
    cover = _random_place(rng, hw, _ink(digit28, size), 0.04)
    cover *= rng.uniform(0.75, 1.0) * _texture(rng, hw, 0.08)
    board = (40, 70, 50) if rng.random() < 0.5 else (45, 45, 50)
    paper = _paper(hw, board) * _texture(rng, hw, 0.05)[..., None]
    yy = np.linspace(0.85, 1.15, hw[0], dtype=np.float32)[:, None, None]
    rgb = _compose(paper * yy, (235, 235, 225), np.clip(cover, 0, 1))
    return _to_image(rgb, rng, noise=3)


def render_rgba(digit28: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Dark strokes on a fully transparent background, as drawing apps export them."""
    hw = _canvas(rng, 100, 250)
    size = int(min(hw) * rng.uniform(0.6, 0.85))
    cover = _random_place(rng, hw, _ink(digit28, size), 0.04)
    rgba = np.zeros((*hw, 4), np.uint8)
    rgba[..., :3] = (20, 20, 30) if rng.random() < 0.7 else (40, 60, 160)
    rgba[..., 3] = np.rint(cover * 255).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA")


#: EXIF orientation -> the transpose that stores an upright picture so that a viewer
#: applying the tag shows it upright again.
_EXIF_STORE = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


def render_exif(digit28: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A phone photo stored sideways or upside down with an EXIF orientation tag (shown
    upright by viewers); the tag travels in ``info["exif"]`` for :func:`write_corpus`."""
    upright = render_photo(digit28, rng)
    orientation = int(rng.choice(list(_EXIF_STORE)))
    stored = upright.transpose(_EXIF_STORE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.info["exif"] = exif.tobytes()
    return stored


def render_uci_scan(digit28: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A clean black-on-white scan (meant for UCI digits: real low-resolution handwriting)."""
    hw = _canvas(rng, 80, 180)
    size = int(min(hw) * rng.uniform(0.6, 0.85))
    cover = _random_place(rng, hw, _ink(digit28, size), 0.04)
    gray = 245 * (1 - cover) + 20 * cover + rng.normal(0, 2, hw)
    return _gray_image(gray)


#: kind -> (source of digits, renderer, file extension, Pillow save options).
KINDS: dict[str, tuple[str, Renderer, str, dict[str, Any]]] = {
    "mnist": ("mnist", render_mnist, "png", {}),
    "photo": ("mnist", render_photo, "jpg", {"quality": 70}),
    "scan_dust": ("mnist", render_scan_dust, "png", {}),
    "ruled": ("mnist", render_ruled, "png", {}),
    "form_box": ("mnist", render_form_box, "png", {}),
    "marker": ("mnist", render_marker, "jpg", {"quality": 85}),
    "thin_pen": ("mnist", render_thin_pen, "png", {}),
    "small_corner": ("mnist", render_small_corner, "png", {}),
    "rotated": ("mnist", render_rotated, "png", {}),
    "color": ("mnist", render_color, "jpg", {"quality": 85}),
    "light_on_dark": ("mnist", render_light_on_dark, "png", {}),
    "rgba": ("mnist", render_rgba, "png", {}),
    "exif": ("mnist", render_exif, "jpg", {"quality": 75}),
    "uci_scan": ("uci", render_uci_scan, "png", {}),
    "uci_photo": ("uci", render_photo, "jpg", {"quality": 70}),
}


def digits(source: str) -> tuple[np.ndarray, np.ndarray]:
    """The (images, labels) of ``source``: ``"mnist"`` (test set) or ``"uci"``."""
    if source == "mnist":
        return mnist_test_digits()
    if source == "uci":
        return uci_digits()
    raise ValueError(f"expected source 'mnist' or 'uci', got {source!r}")


def render(kind: str, digit28: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Render one digit as ``kind`` (a key of :data:`KINDS`)."""
    return KINDS[kind][1](digit28, rng)


def write_corpus(
    folder: str | Path,
    kinds: Sequence[str] = tuple(KINDS),
    n_per_kind: int = 100,
    seed: int = 0,
) -> list[tuple[Path, int, str]]:
    """Write ``n_per_kind`` pictures of each kind as ``folder/<kind>/<label>/<i>.<ext>``.

    Deterministic in ``seed``: the same digits and the same degradations every time (each
    kind draws from its own random stream, so adding a kind changes no other).

    Returns
    -------
    list of (path, label, kind)
    """
    folder = Path(folder)
    written: list[tuple[Path, int, str]] = []
    for kind in kinds:
        source, renderer, ext, options = KINDS[kind]
        images, labels = digits(source)
        k = list(KINDS).index(kind)
        pick = np.random.default_rng([seed, k, 0]).choice(len(images), n_per_kind, replace=False)
        for i, idx in enumerate(pick):
            rng = np.random.default_rng([seed, k, 1, i])
            im = renderer(images[idx], rng)
            label = int(labels[idx])
            path = folder / kind / str(label) / f"{i}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            save: dict[str, Any] = dict(options)
            if "exif" in im.info:
                save["exif"] = im.info["exif"]
            im.save(path, **save)
            written.append((path, label, kind))
    return written
