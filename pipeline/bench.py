"""The benchmark: every stage beside a peer baseline doing the same job the common way.

All figures come from one run on one machine, so ratios (ours / peer) hold even on a noisy
shared host. Our stages run as the real CLI in subprocesses (so wall time includes start-up
and peak memory is the stage's own, from ``wait4``); peers run in this process.

Records (``bench/results.json``, a list under ``"records"``) have the fields::

    stage     ingest | features | train | score | end_to_end | scale
    impl      ours | peer
    metric    wall_s | images_per_s | mb_per_s | accuracy | peak_rss_mb
    value     median over repetitions (or the single value)
    min, max  over repetitions
    reps      repetitions
    n         images processed
    note      what exactly was measured
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from pipeline.fetch import MNIST_FILES
from pipeline.idx import read_idx, write_idx
from pipeline.logs import get_logger
from pipeline.stage import library_versions

log = get_logger("bench")


@dataclass
class Record:
    stage: str
    impl: str
    metric: str
    value: float
    min: float
    max: float
    reps: int
    n: int
    note: str = ""


def _summary(
    stage: str, impl: str, metric: str, values: Sequence[float], n: int, note: str
) -> Record:
    return Record(
        stage,
        impl,
        metric,
        float(statistics.median(values)),
        float(min(values)),
        float(max(values)),
        len(values),
        n,
        note,
    )


def run_cli(
    args: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None
) -> tuple[float, float]:
    """Run ``python -m jobs ARGS``; return (wall seconds, peak RSS MiB of that process)."""
    cmd = [sys.executable, "-m", "jobs", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0,):
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {err[-2000:]}")
    log.debug("%s\n%s", out, err)
    return wall, usage.ru_maxrss / 1024


def _repeat(fn: Callable[[], float], reps: int) -> list[float]:
    return [fn() for _ in range(reps)]


def make_source(
    source: Path, dest: Path, *, train: int | None, test: int | None, scale: int = 1
) -> dict[str, int]:
    """Write (a subset or ``scale``-times tiling of) MNIST as idx.gz files into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    counts = {}
    for spec, limit in zip(MNIST_FILES, (train, train, test, test), strict=True):
        data = read_idx(source / f"{spec.name}.gz")[:limit]
        if scale > 1:
            data = np.concatenate([data] * scale)
        write_idx(dest / f"{spec.name}.gz", data, compress=True)
        counts[spec.name] = len(data)
    return counts


def peer_features(images: np.ndarray) -> np.ndarray:
    """The common way: per image, ``cv2.medianBlur`` then ``skimage.feature.hog``."""
    import cv2
    from skimage.feature import hog

    out = []
    for img in images:
        blurred = cv2.medianBlur(img, 3)
        out.append(hog(blurred, orientations=9, pixels_per_cell=(7, 7), cells_per_block=(2, 2)))
    return np.asarray(out, np.float32)


def peer_train(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    *,
    Cs: Sequence[float],
) -> float:
    """``GridSearchCV(LogisticRegression(), cv=3)`` on raw pixels / 255; returns test accuracy."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        search = GridSearchCV(LogisticRegression(max_iter=200), {"C": list(Cs)}, cv=3, n_jobs=-1)
        search.fit(X_train.reshape(len(X_train), -1) / 255.0, y_train)
    return float(search.score(X_test.reshape(len(X_test), -1) / 255.0, y_test))


def write_pngs(images: np.ndarray, folder: Path, *, count: int) -> None:
    """Write ``count`` PNG files (cycling through ``images``) into 100 sub-folders."""
    from PIL import Image

    for i in range(count):
        sub = folder / f"{i % 100:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i % len(images)]).save(sub / f"{i:07d}.png", compress_level=1)


def peer_score(folder: Path, model_dir: Path, *, limit: int) -> float:
    """Plain loop: ``Image.open`` -> numpy -> same features -> predict; returns images/s."""
    from PIL import Image

    from pipeline.catalogue import load_config
    from pipeline.extract import extract_features
    from pipeline.model import load_model

    model = load_model(model_dir)
    config = load_config(model.meta["feature_config"])
    files = sorted(folder.rglob("*.png"))[:limit]
    t0 = time.perf_counter()
    for f in files:
        img = np.asarray(Image.open(f).convert("L"))
        model.predict(extract_features(img[None], config))
    return len(files) / (time.perf_counter() - t0)


def run_benchmark(
    *,
    source: Path,
    workdir: Path,
    results: Path,
    quick: bool = False,
    scale: int = 0,
    reps: int | None = None,
) -> list[Record]:
    """Run every measurement and write ``results``; returns the records."""
    workdir = workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    reps = reps or (2 if quick else 3)
    n_train, n_test = (10_000, 2_000) if quick else (None, None)
    raw = workdir / "raw"
    counts = make_source(Path(source), raw, train=n_train, test=n_test)
    n_images = counts["train-images-idx3-ubyte"] + counts["t10k-images-idx3-ubyte"]
    records: list[Record] = []

    def cli(*args: str) -> tuple[float, float]:
        return run_cli(list(args), cwd=workdir)

    # ingest: idx.gz -> zarr
    idx_mb = sum((raw / f"{s.name}.gz").stat().st_size for s in MNIST_FILES) / 2**20
    raw_mb = (
        sum(len(gzip.decompress((raw / f"{s.name}.gz").read_bytes())) for s in MNIST_FILES) / 2**20
    )
    walls, rss = [], []
    for _ in range(reps):
        w, m = cli("ingest", "--raw-dir", str(raw), "--out", "mnist.zarr", "--force")
        walls.append(w)
        rss.append(m)
    records.append(_summary("ingest", "ours", "wall_s", walls, n_images, "idx.gz -> zarr v3, CLI"))
    records.append(
        _summary(
            "ingest",
            "ours",
            "mb_per_s",
            [raw_mb / w for w in walls],
            n_images,
            f"uncompressed idx MB/s ({raw_mb:.1f} MB; {idx_mb:.1f} MB gz)",
        )
    )

    # features: ours (CLI, zarr -> parquet) vs per-image cv2 + skimage loop
    walls, rss = [], []
    for _ in range(reps):
        w, m = cli("features", "--store", "mnist.zarr", "--out", "features", "--force")
        walls.append(w)
        rss.append(m)
    records.append(
        _summary(
            "features",
            "ours",
            "images_per_s",
            [n_images / w for w in walls],
            n_images,
            "default feature set, zarr -> parquet, CLI wall time",
        )
    )
    records.append(_summary("features", "ours", "peak_rss_mb", rss, n_images, ""))
    images = read_idx(raw / "t10k-images-idx3-ubyte.gz")
    peer_n = min(len(images), 2_000 if quick else 10_000)
    peer_walls = []
    for _ in range(reps):
        t0 = time.perf_counter()
        peer_features(images[:peer_n])
        peer_walls.append(time.perf_counter() - t0)
    records.append(
        _summary(
            "features",
            "peer",
            "images_per_s",
            [peer_n / w for w in peer_walls],
            peer_n,
            "loop: cv2.medianBlur + skimage hog 7x7/9",
        )
    )

    # train: ours (grid search + refit + report) vs GridSearchCV on raw pixels
    from pipeline.train import DEFAULT_GRID

    w, m = cli("train", "--features", "features", "--out", "model", "--force")
    acc = json.loads((workdir / "model" / "metrics.json").read_text())["accuracy"]
    records.append(
        _summary("train", "ours", "wall_s", [w], n_images, "grid search + refit + report")
    )
    records.append(_summary("train", "ours", "accuracy", [acc], n_images, "test split"))
    records.append(_summary("train", "ours", "peak_rss_mb", [m], n_images, ""))
    Xtr = read_idx(raw / "train-images-idx3-ubyte.gz")
    ytr = read_idx(raw / "train-labels-idx1-ubyte.gz")
    yte = read_idx(raw / "t10k-labels-idx1-ubyte.gz")
    t0 = time.perf_counter()
    peer_acc = peer_train(Xtr, ytr, images, yte, Cs=DEFAULT_GRID["C"])
    records.append(
        _summary(
            "train",
            "peer",
            "wall_s",
            [time.perf_counter() - t0],
            n_images,
            "GridSearchCV(LogisticRegression(), cv=3), raw pixels, same C grid",
        )
    )
    records.append(_summary("train", "peer", "accuracy", [peer_acc], n_images, "test split"))

    # end to end: ingest + features + train from scratch
    peak, total = 0.0, 0.0
    for args in (
        ("ingest", "--raw-dir", str(raw), "--out", "e2e.zarr", "--force"),
        ("features", "--store", "e2e.zarr", "--out", "e2e-features", "--force"),
        ("train", "--features", "e2e-features", "--out", "e2e-model", "--force"),
    ):
        w, m = cli(*args)
        total += w
        peak = max(peak, m)
    records.append(
        _summary(
            "end_to_end", "ours", "wall_s", [total], n_images, "ingest + features + train, CLI"
        )
    )
    records.append(
        _summary("end_to_end", "ours", "peak_rss_mb", [peak], n_images, "max over the three stages")
    )

    # score: folder of PNG files, ours (CLI) vs plain Pillow loop
    n_png = 2_000 if quick else 20_000
    pngs = workdir / "pngs"
    write_pngs(images, pngs, count=n_png)
    walls, rss = [], []
    for _ in range(reps):
        w, m = cli("score", "--model", "model", str(pngs), "--out", "pred.parquet", "--force")
        walls.append(w)
        rss.append(m)
    records.append(
        _summary(
            "score",
            "ours",
            "images_per_s",
            [n_png / w for w in walls],
            n_png,
            "28x28 PNG folder -> predictions parquet, CLI",
        )
    )
    records.append(_summary("score", "ours", "peak_rss_mb", rss, n_png, ""))
    peer_rates = _repeat(lambda: peer_score(pngs, workdir / "model", limit=min(n_png, 2_000)), reps)
    records.append(
        _summary(
            "score",
            "peer",
            "images_per_s",
            peer_rates,
            min(n_png, 2_000),
            "loop: Image.open -> numpy -> same features -> predict",
        )
    )

    # scale: time and memory against N for features and score
    for k in range(1, scale + 1) if scale else ():
        tiled = workdir / f"raw-x{k}"
        make_source(Path(source), tiled, train=n_train, test=n_test, scale=k)
        cli("ingest", "--raw-dir", str(tiled), "--out", f"x{k}.zarr", "--force")
        w, m = cli("features", "--store", f"x{k}.zarr", "--out", f"x{k}-features", "--force")
        n = n_images * k
        records.append(_summary("scale", "ours", "features_wall_s", [w], n, f"x{k}"))
        records.append(_summary("scale", "ours", "features_peak_rss_mb", [m], n, f"x{k}"))
        folder = workdir / f"pngs-x{k}"
        write_pngs(images, folder, count=n_png * k)
        w, m = cli("score", "--model", "model", str(folder), "--out", f"x{k}.parquet", "--force")
        records.append(_summary("scale", "ours", "score_wall_s", [w], n_png * k, f"x{k}"))
        records.append(_summary("scale", "ours", "score_peak_rss_mb", [m], n_png * k, f"x{k}"))
        shutil.rmtree(folder)

    doc = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "quick": quick,
        "versions": library_versions(),
        "records": [asdict(r) for r in records],
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(doc, indent=2) + "\n")
    return records


def markdown_table(records: Sequence[Record]) -> str:
    """The records as a Markdown table, ours beside peer with the ratio where both exist."""
    rows = [
        "| stage | metric | ours | peer | ours / peer | n | note |",
        "|---|---|---|---|---|---|---|",
    ]
    by_key: dict[tuple[str, str], dict[str, Record]] = {}
    for r in records:
        by_key.setdefault((r.stage, r.metric), {})[r.impl] = r
    for (stage, metric), impls in by_key.items():
        ours, peer = impls.get("ours"), impls.get("peer")

        def fmt(r: Record | None) -> str:
            if r is None:
                return "-"
            spread = f" ({r.min:.3g}-{r.max:.3g})" if r.reps > 1 else ""
            return f"{r.value:.4g}{spread}"

        ratio = f"{ours.value / peer.value:.2f}x" if ours and peer and peer.value else "-"
        first = ours or peer
        note, n = (first.note, first.n) if first else ("", 0)
        rows.append(f"| {stage} | {metric} | {fmt(ours)} | {fmt(peer)} | {ratio} | {n} | {note} |")
    return "\n".join(rows)
