"""The benchmark: every stage beside a peer baseline doing the same job the common way.

All figures come from one run on one machine, so ratios (ours / peer) hold even on a noisy
shared host. Our stages run as the real CLI in subprocesses (so wall time includes start-up
and peak memory is the stage's own, from ``wait4``); peers run in this process.

Records (``bench/results.json``, a list under ``"records"``, beside ``date``, ``machine``
(cpus, RAM), ``versions``) have the fields::

    stage     ingest | features | train | train_fashion | end_to_end | score |
              scale_features | scale_score
    impl      ours | peer
    metric    stage_s (the stage's own time, from its run manifest) | cli_wall_s (the whole
              CLI process, with interpreter start-up) | images_per_s | mb_per_s | accuracy |
              output_mb (on disk) | lz4_images_per_s, lz4_output_mb (features with
              ``--compression lz4``) |
              holdout_accuracy, lbfgs_iterations (train) |
              peak_rss_mb, peak_pss_mb (sampled over the job's process tree: RSS sums count
              shared pages once per process, PSS sums once in all) | x<K>_stage_s,
              x<K>_peak_rss_mb, x<K>_peak_pss_mb (scale runs on K times the data)
    value     median over repetitions (or the single value)
    min, max  over repetitions
    reps      repetitions
    n         images processed
    note      what exactly was measured
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError, PipelineError
from pipeline.fetch import MNIST_FILES
from pipeline.idx import read_idx, write_idx
from pipeline.logs import get_logger
from pipeline.stage import disk_usage, library_versions, write_json_atomic

log = get_logger("bench")

#: Seconds between memory samples of a running job, and every how many samples PSS is read.
SAMPLE_S = 0.05
PSS_EVERY = 5


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


#: File that marks a scratch folder as the benchmark's own, safe to empty.
WORKDIR_MARKER = ".mnist-pipeline-bench"


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


def run_cli(args: Sequence[str], *, cwd: Path) -> tuple[float, float, float]:
    """Run ``python -m jobs ARGS``; return (wall seconds, peak RSS, peak PSS in MiB).

    Both peaks are sampled over the whole process tree, the job and any worker processes it
    starts (RSS every 50 ms, PSS every 250 ms). RSS sums count a page shared by several
    processes (libraries, pages inherited from the forkserver) once per process; PSS sums
    count it once in all, which is what the job holds. Output goes to files, not pipes: a
    full pipe would block the child.
    """
    import psutil

    cmd = [sys.executable, "-m", "jobs", *args]
    peak_rss = peak_pss = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err)
        root = psutil.Process(proc.pid)
        samples = 0
        while proc.poll() is None:
            # PSS (smaps) costs ~5 ms a process against ~0.3 ms for RSS: read it on every
            # PSS_EVERY-th sample only, so the sampler does not slow the job it measures.
            full = samples % PSS_EVERY == 0
            samples += 1
            try:
                tree = [root, *root.children(recursive=True)]
                rss = pss = 0
                for p in tree:
                    with contextlib.suppress(psutil.Error):
                        mem = p.memory_full_info() if full else p.memory_info()
                        rss += mem.rss
                        pss += getattr(mem, "pss", mem.rss)  # PSS is Linux-only
                peak_rss = max(peak_rss, rss)
                if full:
                    peak_pss = max(peak_pss, pss)
            except psutil.Error:
                pass
            time.sleep(SAMPLE_S)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-1:]
            raise PipelineError(
                f"bench: expected `{' '.join(args)}` to succeed, got exit {proc.returncode}: "
                f"{tail[0] if tail else ''}"
            )
    return wall, peak_rss / 2**20, peak_pss / 2**20


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


@dataclass
class Run:
    """One CLI run of a stage: wall time of the process, the stage's own time (from its
    manifest: excludes interpreter start-up and imports), and peak RSS."""

    wall_s: float
    stage_s: float
    peak_rss_mb: float
    peak_pss_mb: float


def _stage(cwd: Path, output: str, *args: str) -> Run:
    wall, peak_rss, peak_pss = run_cli(args, cwd=cwd)
    run = json.loads((cwd / f"{output}.manifest.json").read_text())["run"]
    return Run(wall, float(run["wall_seconds"]), peak_rss, peak_pss)


def _train_note(metrics: dict[str, Any]) -> str:
    """What a train run chose: grid (with auto extensions), C, rule, iterations."""
    grid = [g["params"]["C"] for g in metrics["grid"]]
    note = (
        f"grid C={grid} ({metrics['selection']}), chose C={metrics['best_params']['C']}, "
        f"{_iterations(metrics)} lbfgs iterations, median of runs"
    )
    if metrics.get("grid_warning"):
        note += f"; warning: {metrics['grid_warning']}"
    return note


def _iterations(metrics: dict[str, Any]) -> int:
    return int(sum(g["n_iter"] for g in metrics["grid"]) + metrics["final_fit"]["n_iter"])


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def run_benchmark(
    *,
    source: Path,
    workdir: Path,
    results: Path,
    quick: bool = False,
    scale: int = 0,
    reps: int | None = None,
    fashion_source: Path | None = None,
) -> list[Record]:
    """Run every measurement and write ``results``; returns the records.

    ``fashion_source``: Fashion-MNIST idx files for its train records (default: a
    ``fashion-mnist`` folder beside ``source``; left out when there is none)."""
    if not Path(source).is_dir():
        raise InputError(f"--source: expected a folder with the MNIST idx files, got {source}")
    workdir = workdir.resolve()
    marker = workdir / WORKDIR_MARKER
    if workdir.exists():
        # Only a scratch folder the benchmark made itself is emptied (never, say, data/).
        if any(workdir.iterdir()) and not marker.is_file():
            raise InputError(
                f"{workdir}: refusing to empty it: expected a new folder or a scratch folder "
                f"of an earlier benchmark (with {WORKDIR_MARKER}), got a folder this pipeline "
                "did not make"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    marker.write_text("scratch folder of mnist-pipeline bench; emptied by every run\n")
    reps = reps or (2 if quick else 3)
    n_train, n_test = (10_000, 2_000) if quick else (None, None)
    raw = workdir / "raw"
    counts = make_source(Path(source), raw, train=n_train, test=n_test)
    n_images = counts["train-images-idx3-ubyte"] + counts["t10k-images-idx3-ubyte"]
    holdout = ["--validation-size", "2000"] if quick else []
    records: list[Record] = []

    def add(stage: str, impl: str, metric: str, values: Sequence[float], n: int, note: str) -> None:
        records.append(_summary(stage, impl, metric, values, n, note))
        log.info("%s %s %s: %.4g", stage, impl, metric, statistics.median(values))

    def stage(output: str, *args: str) -> Run:
        return _stage(workdir, output, *args)

    # ingest: idx.gz -> zarr
    raw_mb = (
        sum(len(gzip.decompress((raw / f"{s.name}.gz").read_bytes())) for s in MNIST_FILES) / 2**20
    )
    runs = [stage("mnist.zarr", "ingest", "--raw-dir", str(raw), "--out", "mnist.zarr", "--force")
            for _ in range(reps)]  # fmt: skip
    add("ingest", "ours", "stage_s", [r.stage_s for r in runs], n_images, "idx.gz -> zarr v3")
    add("ingest", "ours", "mb_per_s", [raw_mb / r.stage_s for r in runs], n_images,
        f"uncompressed idx MB per second ({raw_mb:.1f} MB)")  # fmt: skip
    add("ingest", "ours", "cli_wall_s", [r.wall_s for r in runs], n_images, "whole CLI process")

    # features: ours (zarr -> parquet) vs per-image cv2 + skimage loop (features only)
    runs = [stage("features", "features", "--store", "mnist.zarr", "--out", "features", "--force")
            for _ in range(reps)]  # fmt: skip
    add("features", "ours", "images_per_s", [n_images / r.stage_s for r in runs], n_images,
        "default feature set, zarr -> parquet, 2 dask threads")  # fmt: skip
    add("features", "ours", "cli_wall_s", [r.wall_s for r in runs], n_images, "whole CLI process")
    add("features", "ours", "peak_rss_mb", [r.peak_rss_mb for r in runs], n_images, "")
    add("features", "ours", "peak_pss_mb", [r.peak_pss_mb for r in runs], n_images, "")
    add("features", "ours", "output_mb", [disk_usage(workdir / "features") / 2**20], n_images,
        "parquet on disk, uncompressed (the default)")  # fmt: skip
    # The size/speed trade-off of the codec option, in the same run.
    runs = [stage("features-lz4", "features", "--store", "mnist.zarr", "--out", "features-lz4",
                  "--force", "--compression", "lz4") for _ in range(reps)]  # fmt: skip
    add("features", "ours", "lz4_images_per_s", [n_images / r.stage_s for r in runs], n_images,
        "same with --compression lz4")  # fmt: skip
    add("features", "ours", "lz4_output_mb", [disk_usage(workdir / "features-lz4") / 2**20],
        n_images, "parquet on disk with --compression lz4")  # fmt: skip
    shutil.rmtree(workdir / "features-lz4")
    test_images = read_idx(raw / "t10k-images-idx3-ubyte.gz")
    peer_n = min(len(test_images), 2_000 if quick else 10_000)
    walls = [_timed(lambda: peer_features(test_images[:peer_n]))[0] for _ in range(reps)]
    add("features", "peer", "images_per_s", [peer_n / w for w in walls], peer_n,
        "loop: cv2.medianBlur + skimage hog 7x7/9 (in memory, nothing written)")  # fmt: skip

    # train: ours (selection + final fit + report), median of `reps` runs, vs GridSearchCV
    from pipeline.train import DEFAULT_C

    runs = [stage("model", "train", "--features", "features", "--out", "model", "--force",
                  *holdout) for _ in range(reps)]  # fmt: skip
    metrics = json.loads((workdir / "model" / "metrics.json").read_text())
    add("train", "ours", "stage_s", [r.stage_s for r in runs], n_images, _train_note(metrics))
    add("train", "ours", "accuracy", [metrics["accuracy"]], n_images, "test split")
    add("train", "ours", "holdout_accuracy", [metrics["validation_score"]], n_images,
        f"selected point on the hold-out ({metrics['selection']})")  # fmt: skip
    add("train", "ours", "lbfgs_iterations", [_iterations(metrics)], n_images,
        "all grid fits + final fit")  # fmt: skip
    add("train", "ours", "peak_rss_mb", [r.peak_rss_mb for r in runs], n_images, "")
    Xtr = read_idx(raw / "train-images-idx3-ubyte.gz")
    ytr = read_idx(raw / "train-labels-idx1-ubyte.gz")
    yte = read_idx(raw / "t10k-labels-idx1-ubyte.gz")
    wall, peer_acc = _timed(lambda: peer_train(Xtr, ytr, test_images, yte, Cs=DEFAULT_C))
    add(
        "train",
        "peer",
        "stage_s",
        [wall],
        n_images,
        "GridSearchCV(LogisticRegression(), cv=3, n_jobs=-1), raw pixels/255, C grid "
        f"{list(DEFAULT_C)}",
    )
    add("train", "peer", "accuracy", [peer_acc], n_images, "test split")

    # train on Fashion-MNIST (same files, same pipeline, defaults): time, accuracy, chosen C
    fashion = (
        fashion_source if fashion_source is not None else Path(source).parent / "fashion-mnist"
    )
    if fashion.is_dir():
        fraw = workdir / "raw-fashion"
        fcounts = make_source(fashion, fraw, train=n_train, test=n_test)
        n_fashion = fcounts["train-images-idx3-ubyte"] + fcounts["t10k-images-idx3-ubyte"]
        stage("fashion.zarr", "ingest", "--raw-dir", str(fraw), "--out", "fashion.zarr",
              "--dataset", "fashion-mnist", "--force")  # fmt: skip
        stage("fashion-features", "features", "--store", "fashion.zarr", "--out",
              "fashion-features", "--force")  # fmt: skip
        run = stage("fashion-model", "train", "--features", "fashion-features", "--out",
                    "fashion-model", "--force", *holdout)  # fmt: skip
        fm = json.loads((workdir / "fashion-model" / "metrics.json").read_text())
        add("train_fashion", "ours", "stage_s", [run.stage_s], n_fashion, _train_note(fm))
        add("train_fashion", "ours", "accuracy", [fm["accuracy"]], n_fashion, "test split")
    else:
        log.warning("no Fashion-MNIST at %s: its train records are left out", fashion)

    # end to end: ingest + features + train from scratch, as a user runs them
    e2e = [
        stage("e2e.zarr", "ingest", "--raw-dir", str(raw), "--out", "e2e.zarr", "--force"),
        stage("e2e-features", "features", "--store", "e2e.zarr", "--out", "e2e-features",
              "--force"),
        stage("e2e-model", "train", "--features", "e2e-features", "--out", "e2e-model", "--force",
              *holdout),
    ]  # fmt: skip
    add("end_to_end", "ours", "cli_wall_s", [sum(r.wall_s for r in e2e)], n_images,
        "ingest + features + train, three CLI processes")  # fmt: skip
    add("end_to_end", "ours", "peak_rss_mb", [max(r.peak_rss_mb for r in e2e)], n_images,
        "max over the three stages")  # fmt: skip

    # score: a folder of PNG files, ours vs a plain Pillow loop
    n_png = 2_000 if quick else 20_000
    pngs = workdir / "pngs"
    write_pngs(test_images, pngs, count=n_png)
    runs = [stage("pred.parquet", "score", "--model", "model", str(pngs), "--out", "pred.parquet",
                  "--force") for _ in range(reps)]  # fmt: skip
    add("score", "ours", "images_per_s", [n_png / r.stage_s for r in runs], n_png,
        "28x28 PNG folder -> predictions parquet, 2 worker processes")  # fmt: skip
    add("score", "ours", "cli_wall_s", [r.wall_s for r in runs], n_png, "whole CLI process")
    add(
        "score",
        "ours",
        "peak_rss_mb",
        [r.peak_rss_mb for r in runs],
        n_png,
        "RSS summed over job + worker processes (shared pages counted per process)",
    )
    add(
        "score",
        "ours",
        "peak_pss_mb",
        [r.peak_pss_mb for r in runs],
        n_png,
        "PSS summed over job + worker processes (shared pages counted once)",
    )
    peer_limit = min(n_png, 2_000)
    rates = [peer_score(pngs, workdir / "model", limit=peer_limit) for _ in range(reps)]
    add("score", "peer", "images_per_s", rates, peer_limit,
        "loop: Image.open -> numpy -> same features -> predict")  # fmt: skip

    # scale: time and memory against N for features and score
    for k in range(1, scale + 1):
        tiled = workdir / f"raw-x{k}"
        make_source(Path(source), tiled, train=n_train, test=n_test, scale=k)
        stage(f"x{k}.zarr", "ingest", "--raw-dir", str(tiled), "--out", f"x{k}.zarr", "--force")
        run = stage(f"x{k}-features", "features", "--store", f"x{k}.zarr", "--out",
                    f"x{k}-features", "--force")  # fmt: skip
        n = n_images * k
        add("scale_features", "ours", f"x{k}_stage_s", [run.stage_s], n, f"{n} images")
        add("scale_features", "ours", f"x{k}_peak_rss_mb", [run.peak_rss_mb], n, f"{n} images")
        shutil.rmtree(workdir / f"x{k}-features")
        shutil.rmtree(workdir / f"x{k}.zarr")
        folder = workdir / f"pngs-x{k}"
        write_pngs(test_images, folder, count=n_png * k)
        run = stage(f"x{k}.parquet", "score", "--model", "model", str(folder), "--out",
                    f"x{k}.parquet", "--force")  # fmt: skip
        add("scale_score", "ours", f"x{k}_stage_s", [run.stage_s], n_png * k, f"{n_png * k} files")
        add("scale_score", "ours", f"x{k}_peak_rss_mb", [run.peak_rss_mb], n_png * k,
            f"{n_png * k} files")  # fmt: skip
        add("scale_score", "ours", f"x{k}_peak_pss_mb", [run.peak_pss_mb], n_png * k,
            f"{n_png * k} files")  # fmt: skip
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
        "scale": scale,
        "versions": library_versions(),
        "records": [asdict(r) for r in records],
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results, doc)
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

        def num(v: float) -> str:
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"

        def fmt(r: Record | None) -> str:
            if r is None:
                return "-"
            spread = f" ({num(r.min)}-{num(r.max)})" if r.reps > 1 else ""
            return f"{num(r.value)}{spread}"

        ratio = f"{ours.value / peer.value:.2f}x" if ours and peer and peer.value else "-"
        first = ours or peer
        note, n = (first.note, first.n) if first else ("", 0)
        rows.append(f"| {stage} | {metric} | {fmt(ours)} | {fmt(peer)} | {ratio} | {n} | {note} |")
    return "\n".join(rows)
