"""Shared fixtures: tiny synthetic idx datasets, the real MNIST folder, clean logging."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.idx import write_idx
from pipeline.logs import LOGGER_NAME

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_MNIST_DIR = REPO_ROOT.parent / "shared/data/mnist"
MNIST_NAMES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class SyntheticDataset:
    """A small MNIST-like dataset written as idx files into ``raw_dir``."""

    raw_dir: Path
    compressed: bool
    arrays: dict[tuple[str, str], np.ndarray]  # (split, kind) -> array
    paths: dict[tuple[str, str], Path]  # (split, kind) -> idx file

    def images(self, split: str) -> np.ndarray:
        return self.arrays[(split, "images")]

    def labels(self, split: str) -> np.ndarray:
        return self.arrays[(split, "labels")]


def write_synthetic_dataset(
    raw_dir: Path,
    *,
    n_train: int = 50,
    n_test: int = 20,
    image_shape: tuple[int, ...] = (28, 28),
    compress: bool = True,
    num_classes: int = 10,
    seed: int = 0,
) -> SyntheticDataset:
    """Write random uint8 images and labels in ``[0, num_classes)`` under the MNIST names."""
    rng = np.random.default_rng(seed)
    raw_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[tuple[str, str], np.ndarray] = {}
    paths: dict[tuple[str, str], Path] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        arrays[(split, "images")] = rng.integers(0, 256, size=(n, *image_shape), dtype=np.uint8)
        arrays[(split, "labels")] = rng.integers(0, num_classes, size=n, dtype=np.uint8)
        for kind in ("images", "labels"):
            name = MNIST_NAMES[(split, kind)] + (".gz" if compress else "")
            path = raw_dir / name
            write_idx(path, arrays[(split, kind)], compress=compress)
            paths[(split, kind)] = path
    return SyntheticDataset(raw_dir=raw_dir, compressed=compress, arrays=arrays, paths=paths)


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., SyntheticDataset]:
    """Factory: ``make_dataset(name="raw", **kwargs)`` writes a dataset under tmp_path/name."""

    def make(name: str = "raw", **kwargs: object) -> SyntheticDataset:
        return write_synthetic_dataset(tmp_path / name, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture
def dataset(make_dataset: Callable[..., SyntheticDataset]) -> SyntheticDataset:
    """50 train / 20 test gzip-compressed 28x28 uint8 images with labels 0-9."""
    return make_dataset("raw")


@pytest.fixture
def dataset_12x17(make_dataset: Callable[..., SyntheticDataset]) -> SyntheticDataset:
    """Like :func:`dataset` but with 12x17 images stored as raw (uncompressed) idx."""
    return make_dataset("raw_12x17", image_shape=(12, 17), compress=False, seed=1)


@pytest.fixture
def real_mnist_dir() -> Path:
    """The folder with the real MNIST .gz files (../shared/data/mnist from the repo root)."""
    names = [f"{name}.gz" for name in MNIST_NAMES.values()]
    missing = [n for n in names if not (REAL_MNIST_DIR / n).is_file()]
    if missing:
        pytest.skip(f"real MNIST files not found in {REAL_MNIST_DIR} (missing: {missing})")
    return REAL_MNIST_DIR


@pytest.fixture(autouse=True)
def _restore_pipeline_logger() -> Iterator[None]:
    """Jobs reconfigure the pipeline's logger (e.g. onto CliRunner's stderr); undo that."""
    logger = logging.getLogger(LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
    if hasattr(logger, "log_format"):
        del logger.log_format


def separable_images(
    labels: np.ndarray, *, seed: int = 0, shape: tuple[int, int] = (28, 28)
) -> np.ndarray:
    """uint8 images whose class is a vertical bar position (plus noise): learnable data."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    images = rng.integers(0, 40, size=(n, *shape), dtype=np.uint8)
    cols = 3 + 2 * labels.astype(np.intp)
    rows = np.arange(4, shape[0] - 4)
    images[np.arange(n)[:, None], rows[None, :], cols[:, None]] = 255
    return images


@dataclass(frozen=True)
class FeatureFixture:
    store: Path
    features: Path
    config: object


@pytest.fixture
def learnable_features(tmp_path: Path) -> FeatureFixture:
    """A zarr store and feature parquet of 400 train / 100 test separable images."""
    from pipeline.catalogue import load_config
    from pipeline.features import features
    from pipeline.ingest import SplitFiles, ingest

    rng = np.random.default_rng(1)
    raw = tmp_path / "raw"
    raw.mkdir()
    sources = {}
    for split, n in (("train", 400), ("test", 100)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        labels[:10] = np.arange(10)  # every class present
        img, lab = raw / f"{split}-images", raw / f"{split}-labels"
        write_idx(img, separable_images(labels, seed=n))
        write_idx(lab, labels)
        sources[split] = SplitFiles(img, lab)
    store = tmp_path / "mnist.zarr"
    ingest(out=store, sources=sources, chunk_size=128)
    config = load_config({"views": {}, "features": [{"family": "pixels", "factor": 2}]})
    out = tmp_path / "features"
    features(store=store, out=out, config=config, workers=1)
    return FeatureFixture(store=store, features=out, config=config)


@pytest.fixture(scope="session")
def real_pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The whole pipeline with defaults on the real MNIST: fetch, ingest, features, train.

    Session-scoped: the real-data tests of train and score share one run (a few minutes).
    """
    names = [f"{name}.gz" for name in MNIST_NAMES.values()]
    if not all((REAL_MNIST_DIR / n).is_file() for n in names):
        pytest.skip(f"real MNIST files not found in {REAL_MNIST_DIR}")
    from pipeline.catalogue import load_config
    from pipeline.features import features
    from pipeline.fetch import fetch
    from pipeline.ingest import default_sources, ingest
    from pipeline.train import train

    root = tmp_path_factory.mktemp("real")
    raw = root / "raw"
    fetch(dest_dir=raw, source=str(REAL_MNIST_DIR))
    store = root / "mnist.zarr"
    ingest(out=store, sources=default_sources(raw))
    feats = root / "features"
    features(store=store, out=feats, config=load_config())
    model = root / "models" / "default"
    train(features=feats, out=model, store=store)
    return {"root": root, "raw": raw, "store": store, "features": feats, "model": model}


def synthetic_digits(n: int, *, seed: int = 0, shape: tuple[int, int] = (28, 28)) -> np.ndarray:
    """uint8 MNIST-like drawings: thick anti-aliased strokes and loops inside a blank margin."""
    from skimage.draw import ellipse_perimeter, line_aa

    rng = np.random.default_rng(seed)
    H, W = shape
    out = np.zeros((n, H, W), np.float64)
    for i in range(n):
        img = out[i]
        for _ in range(int(rng.integers(1, 4))):
            if rng.random() < 0.3:
                cy, cx = int(rng.integers(9, H - 9)), int(rng.integers(9, W - 9))
                rr, cc = ellipse_perimeter(
                    cy, cx, int(rng.integers(2, 5)), int(rng.integers(2, 5)), shape=shape
                )
                img[rr, cc] = 1.0
            else:
                r0, r1 = (int(v) for v in rng.integers(5, H - 5, 2))
                c0, c1 = (int(v) for v in rng.integers(5, W - 5, 2))
                rr, cc, val = line_aa(r0, c0, r1, c1)
                img[rr, cc] = np.maximum(img[rr, cc], val)
        # Thicken the strokes a little, as handwriting is.
        img[1:, :] = np.maximum(img[1:, :], 0.8 * img[:-1, :])
        img[:, 1:] = np.maximum(img[:, 1:], 0.6 * img[:, :-1])
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def mnist_like_images() -> np.ndarray:
    """512 uint8 28x28 digit images: the first real MNIST test images when the real files
    are there, else :func:`synthetic_digits` (so the tests that use them never skip)."""
    path = REAL_MNIST_DIR / f"{MNIST_NAMES[('test', 'images')]}.gz"
    if path.is_file():
        from pipeline.idx import read_idx

        return np.ascontiguousarray(read_idx(path)[:512])
    return synthetic_digits(512, seed=12345)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "distributed: starts a real local dask.distributed cluster (a few seconds)"
    )


@pytest.fixture
def make_store(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_store(name, chunk_size=16, **dataset_kwargs)`` writes a synthetic idx
    dataset (see :func:`write_synthetic_dataset`) under tmp_path and ingests it into the
    zarr store tmp_path/name; returns the store path."""
    from pipeline.ingest import default_sources, ingest

    def make(name: str = "mnist.zarr", *, chunk_size: int = 16, **kwargs: object) -> Path:
        ds = write_synthetic_dataset(tmp_path / f"raw-{name}", **kwargs)  # type: ignore[arg-type]
        out = tmp_path / name
        ingest(out=out, sources=default_sources(ds.raw_dir), chunk_size=chunk_size, force=True)
        return out

    return make


@dataclass(frozen=True)
class Slurm:
    """A running SLURM (see :func:`slurm`): ``conf`` is its ``SLURM_CONF``."""

    conf: Path

    def env(self) -> dict[str, str]:
        """os.environ for SLURM commands and the jobs they start (this checkout first)."""
        import os

        paths = [str(REPO_ROOT), *(p for p in os.environ.get("PYTHONPATH", "").split(":") if p)]
        return {**os.environ, "SLURM_CONF": str(self.conf), "PYTHONPATH": ":".join(paths)}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    """A single-node SLURM on localhost: the one ``.ci/run`` started (its config in
    ``MNIST_PIPELINE_TEST_SLURM_CONF``), else one started here with ``.ci/slurm.sh`` (needs
    root and Debian's slurm-wlm and munge), else the test is skipped saying why."""
    import os
    import shutil
    import subprocess

    given = os.environ.get("MNIST_PIPELINE_TEST_SLURM_CONF")
    if given:
        ping = subprocess.run(
            ["scontrol", "ping"], env={**os.environ, "SLURM_CONF": given},
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if "UP" not in ping.stdout:  # CI said it runs: that it does not is a failure
            pytest.fail(f"MNIST_PIPELINE_TEST_SLURM_CONF={given}: SLURM is not up: {ping}")
        yield Slurm(Path(given))
        return
    missing = [c for c in ("slurmctld", "slurmd", "munged", "sbatch") if not shutil.which(c)]
    if missing:
        pytest.skip(f"no SLURM: {', '.join(missing)} not installed (.ci/slurm.sh install)")
    if os.geteuid() != 0:
        pytest.skip("no SLURM: starting the test SLURM needs root (SlurmUser=root)")
    folder = tmp_path_factory.mktemp("slurm")
    script = REPO_ROOT / ".ci/slurm.sh"
    started = subprocess.run(
        [str(script), "start", str(folder)], capture_output=True, text=True, check=False
    )
    if started.returncode != 0:
        pytest.skip(f"SLURM could not start here: {started.stderr.strip()}")
    try:
        yield Slurm(folder / "slurm.conf")
    finally:
        subprocess.run([str(script), "stop", str(folder)], capture_output=True, check=False)
