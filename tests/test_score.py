"""The score job: folders of images, zarr stores and idx files -> parquet predictions."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT
from PIL import Image
from test_images import mnist_like, paper_digit, png_header_only
from typer.testing import CliRunner

import pipeline.score as score_mod
from jobs.cli import app
from pipeline.catalogue import load_config
from pipeline.errors import ArtifactError, ConfigMismatchError, InputError
from pipeline.extract import extract_features, feature_widths
from pipeline.idx import write_idx
from pipeline.images import to_mnist
from pipeline.ingest import SplitFiles, ingest
from pipeline.model import LinearModel, save_model
from pipeline.score import STATE_FILE, load_scoring_model, score, walk_images
from pipeline.stage import read_manifest, temp_path
from pipeline.store import open_store, split_arrays

runner = CliRunner()
SMALL_CONFIG = {"views": {}, "features": [{"family": "pixels", "factor": 4}]}


# ----------------------------------------------------------------------------- helpers


def make_model(
    folder: Path, *, binary: bool = False, seed: int = 0, config: dict[str, Any] = SMALL_CONFIG
) -> Path:
    """A random (but fixed) linear model on ``config``'s features of 28x28 images."""
    cfg = load_config(config)
    K = sum(feature_widths(cfg, (28, 28)).values())
    rng = np.random.default_rng(seed)
    n_out = 1 if binary else 10
    model = LinearModel(
        mean=np.full(K, 0.1, np.float32),
        scale=np.full(K, 0.2, np.float32),
        coef=rng.normal(size=(n_out, K)),
        intercept=rng.normal(size=n_out),
        classes=np.arange(2 if binary else 10),
        mode="binary" if binary else "multiclass",
        positive_class=3 if binary else None,
        meta={"feature_config": cfg.to_dict(), "feature_config_hash": cfg.hash},
    )
    save_model(model, folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "default")


def digits(n: int, seed: int = 0) -> np.ndarray:
    """n MNIST-format stroke images, (n, 28, 28) uint8."""
    return np.stack([mnist_like(seed * 100_000 + i) for i in range(n)])


def write_pngs(folder: Path, images: np.ndarray, *, per_folder: int = 40) -> list[str]:
    """Write images as nested PNGs; returns their relative paths in the walk's order."""
    rels = []
    for i, img in enumerate(images):
        rel = f"d{i // per_folder:02d}/img{i:05d}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / rel)
        rels.append(rel)
    return rels


def expected(model_dir: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and probabilities of the model computed directly on ``images``."""
    scoring = load_scoring_model(model_dir)
    X = extract_features(images, scoring.config)
    return scoring.model.predict(X), scoring.model.predict_proba(X).astype(np.float32)


def read(out: Path) -> pd.DataFrame:
    return pq.read_table(out).to_pandas()


def prob_matrix(df: pd.DataFrame, classes: int = 10) -> np.ndarray:
    return df[[f"prob_{c}" for c in range(classes)]].to_numpy(np.float32)


def invoke(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def run(model_dir: Path, source: Path, out: Path, **kw: Any) -> Any:
    kw.setdefault("lock_timeout", 0)
    return score(model=model_dir, source=source, out=out, **kw)


# ------------------------------------------------------------------- folder predictions


def test_folder_predictions_equal_the_model_on_the_pixels(tmp_path: Path, model_dir: Path) -> None:
    images = digits(250)
    rels = write_pngs(tmp_path / "in", images)
    out = tmp_path / "pred.parquet"
    result = run(model_dir, tmp_path / "in", out, batch_size=64, workers=2)
    assert result.result["ok"] == 250 and result.result["failed"] == 0
    assert sorted(p.name for p in out.iterdir()) == [f"part-{i:05d}.parquet" for i in range(4)]
    df = read(out)
    assert df["path"].tolist() == rels  # deterministic sorted walk, batch by batch
    pred, proba = expected(model_dir, images)
    np.testing.assert_array_equal(df["prediction"].to_numpy(), pred)
    np.testing.assert_array_equal(prob_matrix(df), proba)
    np.testing.assert_array_equal(df["probability"].to_numpy(), proba.max(axis=1))
    assert (df["status"] == "ok").all()
    assert len(set(df["prediction"])) > 3  # a model that actually discriminates


def test_zarr_idx_and_png_exports_give_identical_rows(tmp_path: Path, model_dir: Path) -> None:
    test_images = digits(300, seed=1)
    raw = tmp_path / "raw"
    raw.mkdir()
    files = {}
    for split, imgs in (("train", digits(20, seed=2)), ("test", test_images)):
        files[split] = SplitFiles(raw / f"{split}-images.gz", raw / f"{split}-labels")
        write_idx(files[split].images, imgs, compress=True)
        write_idx(files[split].labels, np.arange(len(imgs), dtype=np.uint8) % 10)
    store = tmp_path / "mnist.zarr"
    ingest(out=store, sources=files, chunk_size=128, lock_timeout=0)
    write_pngs(tmp_path / "pngs", test_images, per_folder=1000)

    z = read(run(model_dir, store, tmp_path / "z.parquet", batch_size=100).output)
    i = read(run(model_dir, files["test"].images, tmp_path / "i.parquet", batch_size=77).output)
    p = read(run(model_dir, tmp_path / "pngs", tmp_path / "p.parquet").output)
    assert z["image_index"].tolist() == list(range(300)) == i["image_index"].tolist()
    assert z["image_index"].dtype == np.int64
    pred, proba = expected(model_dir, test_images)
    for df in (z, i, p):
        np.testing.assert_array_equal(df["prediction"].to_numpy(), pred)
        np.testing.assert_array_equal(prob_matrix(df), proba)
        assert (df["status"] == "ok").all()

    train = read(run(model_dir, store, tmp_path / "train.parquet", split="train").output)
    assert len(train) == 20


def test_binary_model_columns(tmp_path: Path) -> None:
    model = make_model(tmp_path / "binary", binary=True, seed=3)
    images = digits(60)
    write_pngs(tmp_path / "in", images)
    out = run(model, tmp_path / "in", tmp_path / "pred.parquet").output
    df = read(out)
    probs = [c for c in df.columns if c.startswith("prob_")]
    assert probs == ["prob_0", "prob_1"]
    pred, proba = expected(model, images)
    np.testing.assert_array_equal(df["prediction"].to_numpy(), pred)
    chosen = np.where(pred == 1, proba[:, 1], proba[:, 0])
    np.testing.assert_array_equal(df["probability"].to_numpy(), chosen)
    meta = json.loads(pq.read_schema(out / "part-00000.parquet").metadata[b"mnist_pipeline"])
    assert meta["model_mode"] == "binary" and meta["positive_class"] == 3


def test_normalize_modes(tmp_path: Path, model_dir: Path) -> None:
    light = 255 - digits(5)  # 28x28 but a light background: not MNIST format
    write_pngs(tmp_path / "in", light)
    never = read(
        run(model_dir, tmp_path / "in", tmp_path / "never.parquet", normalize="never").output
    )
    auto = read(run(model_dir, tmp_path / "in", tmp_path / "auto.parquet").output)
    np.testing.assert_array_equal(never["prediction"].to_numpy(), expected(model_dir, light)[0])
    normalized = np.stack([to_mnist(img) for img in light])
    np.testing.assert_array_equal(auto["prediction"].to_numpy(), expected(model_dir, normalized)[0])
    big = tmp_path / "big"
    big.mkdir()
    paper_digit().save(big / "photo.jpg", quality=90)
    assert read(run(model_dir, big, tmp_path / "big.parquet").output)["status"].tolist() == ["ok"]
    df = read(run(model_dir, big, tmp_path / "big-never.parquet", normalize="never").output)
    assert "expected a 28x28 image" in df["status"][0]


def test_globs_select_files(tmp_path: Path, model_dir: Path) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    img = Image.fromarray(mnist_like())
    for rel in ("a.png", "B.PNG", "c.jpg", "sub/d.png", "sub/e.gif"):
        img.save(src / rel)
    (src / "notes.txt").write_text("not an image")

    def paths(*globs: str) -> list[str]:
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}.parquet"
        kw = {"globs": globs} if globs else {}
        return read(run(model_dir, src, out, **kw).output)["path"].tolist()

    assert paths() == ["B.PNG", "a.png", "c.jpg", "sub/d.png", "sub/e.gif"]
    assert paths("*.png") == ["B.PNG", "a.png", "sub/d.png"]  # case-insensitive
    assert paths("sub/*") == ["sub/d.png", "sub/e.gif"]
    assert paths("*.txt") == ["notes.txt"]


def test_output_inside_the_input_folder_is_not_scored(tmp_path: Path, model_dir: Path) -> None:
    src = tmp_path / "in"
    write_pngs(src, digits(4))
    out = src / "pred.parquet"
    first = run(model_dir, src, out, globs=["*"])
    assert first.result["rows"] == 4
    again = run(model_dir, src, out, globs=["*"])
    assert again.skipped  # its own output, lock and manifest are not inputs
    assert sorted(read(out)["path"]) == [f"d00/img{i:05d}.png" for i in range(4)]


def test_distributed_scheduler(tmp_path: Path, model_dir: Path) -> None:
    from distributed import LocalCluster

    images = digits(40)
    write_pngs(tmp_path / "in", images)
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cluster:
        address = cluster.scheduler_address
        result = run(
            model_dir, tmp_path / "in", tmp_path / "p.parquet", scheduler=address, batch_size=16
        )
    assert result.result["ok"] == 40 and result.result["parts"] == 3
    np.testing.assert_array_equal(
        read(result.output)["prediction"].to_numpy(), expected(model_dir, images)[0]
    )


def test_empty_folder_is_an_error_unless_allowed(tmp_path: Path, model_dir: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match=r"expected images to score in .*got none"):
        run(model_dir, tmp_path / "in", tmp_path / "pred.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pred.parquet.lock", "in"]


def test_empty_folder_gives_an_empty_readable_dataset(tmp_path: Path, model_dir: Path) -> None:
    (tmp_path / "in").mkdir()
    result = run(model_dir, tmp_path / "in", tmp_path / "pred.parquet", allow_empty=True)
    assert result.result["rows"] == 0
    df = pd.read_parquet(result.output)
    assert len(df) == 0 and "prediction" in df.columns


def test_image_files_and_folders_given_together(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'What digit is this?': files named on the command line (a JPEG given alone is not
    read as idx), folders beside them, rows named as the paths were given."""
    monkeypatch.chdir(tmp_path)
    images = digits(7)
    Path("more").mkdir()
    for i in range(4):
        Image.fromarray(images[i]).save(f"more/{i}.png")
    Image.fromarray(images[4]).save("one.png")
    Image.fromarray(images[5]).convert("RGB").save("two.jpg", quality=100)
    absolute = tmp_path / "three.bmp"
    Image.fromarray(images[6]).save(absolute)
    alone = run(model_dir, Path("two.jpg"), tmp_path / "alone.parquet")
    assert alone.result["input_kind"] == "files"
    assert read(alone.output)["path"].tolist() == ["two.jpg"]

    result = run(model_dir, [Path("one.png"), Path("more"), absolute], tmp_path / "p.parquet")
    df = read(result.output)
    assert df["path"].tolist() == ["one.png", *(f"more/{i}.png" for i in range(4)), str(absolute)]
    assert (df["status"] == "ok").all()
    order = [4, 0, 1, 2, 3, 6]
    np.testing.assert_array_equal(
        df["prediction"].to_numpy()[[0, 1, 2, 3, 4, 5]], expected(model_dir, images[order])[0]
    )
    again = run(model_dir, [Path("one.png"), Path("more"), absolute], tmp_path / "p.parquet")
    assert again.skipped
    Image.fromarray(images[0]).save("more/new.png")
    assert not run(
        model_dir, [Path("one.png"), Path("more"), absolute], tmp_path / "p.parquet"
    ).skipped


def test_a_store_or_idx_file_must_be_the_only_input(tmp_path: Path, model_dir: Path) -> None:
    idx = tmp_path / "images.idx"
    write_idx(idx, digits(3))
    Image.fromarray(digits(1)[0]).save(tmp_path / "a.png")
    with pytest.raises(InputError, match="or one zarr store or idx file alone"):
        run(model_dir, [tmp_path / "a.png", idx], tmp_path / "p.parquet")


# ------------------------------------------------------------------------------ bad files


def make_bad_folder(root: Path) -> dict[str, str]:
    """Good and bad files under ``root``; returns rel path -> expected status fragment."""
    root.mkdir()
    good = Image.fromarray(mnist_like())
    cases: dict[str, str] = {}
    for rel in ("good1.png", "sub/good2.png", "sub/good3.bmp"):
        (root / rel).parent.mkdir(exist_ok=True)
        good.save(root / rel)
        cases[rel] = "ok"
    png = (root / "good1.png").read_bytes()
    files = {
        "empty.png": (b"", "empty file"),
        "truncated.png": (png[: len(png) // 2], "corrupt or truncated"),
        "text.jpg": (b"just some text\n" * 20, "unrecognized content"),
        "ppm-inside.png": (b"P5\n28 28\n255\n" + bytes(784), "unrecognized content"),
        "bomb.png": (png_header_only(10_000, 10_000), "decompression bomb"),
        "bigger-bomb.png": (png_header_only(30_000, 30_000), "decompression bomb"),
    }
    for rel, (data, fragment) in files.items():
        (root / rel).write_bytes(data)
        cases[rel] = fragment
    outside = root.parent / "outside.png"
    good.save(outside)
    (root / "outside-link.png").symlink_to(outside)
    cases["outside-link.png"] = "symlink to"
    (root / "loop.png").symlink_to("loop.png")
    cases["loop.png"] = "symlink loop"
    (root / "ping.png").symlink_to("pong.png")
    (root / "pong.png").symlink_to("ping.png")
    cases["ping.png"] = cases["pong.png"] = "symlink loop"
    (root / "broken.png").symlink_to("missing.png")
    cases["broken.png"] = "broken symlink"
    (root / "inside-link.png").symlink_to("sub/good2.png")
    cases["inside-link.png"] = "ok"
    (root / "sub" / "up").symlink_to("..")  # a folder loop: not followed, not a file
    os.mkfifo(root / "fifo.png")
    cases["fifo.png"] = "special file"
    if os.geteuid() != 0:  # root reads mode-000 files and lists mode-000 folders anyway
        (root / "locked.png").write_bytes(png)
        (root / "locked.png").chmod(0)
        cases["locked.png"] = "permission denied"
        (root / "closed").mkdir()
        good.save(root / "closed" / "hidden.png")
        (root / "closed").chmod(0)
        cases["closed"] = "permission denied"
    return cases


def test_bad_files_become_error_rows(tmp_path: Path, model_dir: Path) -> None:
    cases = make_bad_folder(tmp_path / "in")
    out = tmp_path / "pred.parquet"
    result = invoke(
        "score", tmp_path / "in", "--model", model_dir, "--out", out, "--lock-timeout", 0
    )
    assert result.exit_code == 0, result.output
    n_ok = sum(v == "ok" for v in cases.values())
    n_bad = len(cases) - n_ok
    assert result.stdout == f"score: {n_ok} ok, {n_bad} failed -> {out}\n"
    df = read(out)
    assert sorted(df["path"]) == sorted(cases)  # one row per file, nothing followed twice
    for row in df.itertuples():
        fragment = cases[row.path]
        if fragment == "ok":
            assert row.status == "ok"
            assert 0 <= row.prediction <= 9 and 0 < row.probability <= 1
        else:
            assert fragment in row.status, (row.path, row.status)
            assert pd.isna(row.prediction) and pd.isna(row.probability) and pd.isna(row.prob_0)
    assert "failed:" in result.stderr  # a few reasons are logged
    manifest = read_manifest(out)
    assert manifest is not None and manifest["result"]["failed"] == n_bad


def test_unreadable_file_and_folder_become_rows(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "in"
    write_pngs(src, digits(3), per_folder=2)  # d00/img00000, d00/img00001, d01/img00002
    locked, closed = src / "d00" / "img00001.png", src / "d01"
    if os.geteuid() != 0:
        locked.chmod(0)
        closed.chmod(0)
    else:  # root reads anything: make the OS calls fail the way they do for other users
        real_open, real_scandir = open, os.scandir

        def deny_open(path: Any, *args: Any, **kw: Any) -> Any:
            if str(path) == str(locked.resolve()):
                raise PermissionError(13, "Permission denied")
            return real_open(path, *args, **kw)

        def deny_scandir(path: Any = ".") -> Any:
            if str(path) == str(closed):
                raise PermissionError(13, "Permission denied")
            return real_scandir(path)

        monkeypatch.setattr("builtins.open", deny_open)
        monkeypatch.setattr(os, "scandir", deny_scandir)
    try:
        # One worker: the local thread path, so the patched OS calls (root case) apply;
        # worker processes would not see them.
        df = read(run(model_dir, src, tmp_path / "pred.parquet", workers=1).output)
    finally:
        closed.chmod(0o755)
    assert df["path"].tolist() == ["d00/img00000.png", "d00/img00001.png", "d01"]
    assert df["status"].tolist() == [
        "ok",
        "expected a readable file, got permission denied",
        "expected a readable folder, got permission denied",
    ]


def test_max_failures(tmp_path: Path, model_dir: Path) -> None:
    cases = make_bad_folder(tmp_path / "in")
    n_bad = sum(v != "ok" for v in cases.values())
    out = tmp_path / "pred.parquet"
    args = ["score", tmp_path / "in", "--model", model_dir, "--out", out, "--lock-timeout", 0]
    result = invoke(*args, "--max-failures", 0)
    assert result.exit_code == 1
    assert result.stdout.startswith("score: ") and f"{n_bad} failed" in result.stdout
    assert (
        f"error: score: expected at most 0 failed inputs (--max-failures), got {n_bad}"
        in result.stderr
    )
    assert out.is_dir()  # the predictions are written either way
    # Up to date now; the limit still applies to the recorded result.
    assert invoke(*args, "--max-failures", 0).exit_code == 1
    assert invoke(*args, "--max-failures", n_bad).exit_code == 0
    assert invoke(*args).exit_code == 0


# -------------------------------------------------------------------------------- resume


class Killer:
    """Replaces score_file_batch: runs it, but raises on the batch ``kill_at``."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.real = score_mod.score_file_batch
        self.kill_at = kill_at
        self.calls: list[int] = []

    def __call__(self, index: int, *args: Any, **kw: Any) -> Any:
        self.calls.append(index)
        if index == self.kill_at:
            raise RuntimeError("killed")
        return self.real(index, *args, **kw)


def part_stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("part-*.parquet")}


def killed_run(tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, n: int) -> Path:
    images = digits(n)
    write_pngs(tmp_path / "in", images)
    out = tmp_path / "pred.parquet"
    killer = Killer(kill_at=4)
    monkeypatch.setattr(score_mod, "score_file_batch", killer)
    with pytest.raises(RuntimeError, match="killed"):
        run(model_dir, tmp_path / "in", out, batch_size=10, workers=1)
    monkeypatch.undo()
    assert not out.exists()
    assert (temp_path(out) / STATE_FILE).is_file()
    return out


def test_resume_continues_without_duplicates_or_losses(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = killed_run(tmp_path, model_dir, monkeypatch, 95)  # 10 batches
    before = part_stats(temp_path(out))
    assert 0 < len(before) < 10 and "part-00004.parquet" not in before
    killer = Killer()
    monkeypatch.setattr(score_mod, "score_file_batch", killer)
    result = run(model_dir, tmp_path / "in", out, batch_size=10, workers=1, resume=True)
    finished = {int(name[5:10]) for name in before}
    assert sorted(killer.calls) == sorted(set(range(10)) - finished)  # nothing recomputed
    after = part_stats(out)
    assert {k: after[k] for k in before} == before  # kept parts untouched (inode, mtime)
    assert len(after) == 10 and not (out / STATE_FILE).exists()
    df = read(out)
    assert df["path"].tolist() == [p for p, _ in walk_images(tmp_path / "in")]
    assert df["path"].is_unique and len(df) == 95
    assert result.result["resumed_parts"] == len(before) and result.result["ok"] == 95
    np.testing.assert_array_equal(df["prediction"], expected(model_dir, digits(95))[0])


def test_resume_rescores_a_part_damaged_after_it_was_written(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = killed_run(tmp_path, model_dir, monkeypatch, 95)
    damaged = sorted(temp_path(out).glob("part-*.parquet"))[0]
    damaged.write_bytes(damaged.read_bytes()[:50])
    killer = Killer()
    monkeypatch.setattr(score_mod, "score_file_batch", killer)
    run(model_dir, tmp_path / "in", out, batch_size=10, workers=1, resume=True)
    assert int(damaged.name[5:10]) in killer.calls
    df = read(out)
    assert len(df) == 95 and df["path"].is_unique


def test_without_resume_a_partial_is_discarded(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = killed_run(tmp_path, model_dir, monkeypatch, 45)
    killer = Killer()
    monkeypatch.setattr(score_mod, "score_file_batch", killer)
    run(model_dir, tmp_path / "in", out, batch_size=10, workers=1)
    assert sorted(killer.calls) == list(range(5))
    assert len(read(out)) == 45


def test_resume_with_changed_input_starts_afresh(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = killed_run(tmp_path, model_dir, monkeypatch, 45)
    Image.fromarray(mnist_like(7)).save(tmp_path / "in" / "a-new-first-file.png")
    killer = Killer()
    monkeypatch.setattr(score_mod, "score_file_batch", killer)
    run(model_dir, tmp_path / "in", out, batch_size=10, workers=1, resume=True)
    assert sorted(killer.calls) == list(range(5))  # batches would have shifted: all redone
    df = read(out)
    assert len(df) == 46 and df["path"].is_unique


def test_resume_after_sigkill(tmp_path: Path, model_dir: Path) -> None:
    """A real kill -9 in the middle of a run, then --resume from the command line."""
    images = digits(300)
    write_pngs(tmp_path / "in", images)
    out = tmp_path / "pred.parquet"
    script = textwrap.dedent(
        f"""
        import time
        import pipeline.score as s
        real = s.score_file_batch
        def slow(*a, **k):
            time.sleep(0.05)
            return real(*a, **k)
        s.score_file_batch = slow
        s.score(model={str(model_dir)!r}, source={str(tmp_path / "in")!r}, out={str(out)!r},
                batch_size=5, workers=1)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT)
    partial = temp_path(out)
    try:
        deadline = time.monotonic() + 60
        while len(list(partial.glob("part-*.parquet"))) < 8:
            assert proc.poll() is None and time.monotonic() < deadline, "run ended too early"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = part_stats(partial)
    assert 8 <= len(before) < 60
    result = invoke(
        "score",
        tmp_path / "in",
        "--model",
        model_dir,
        "--out",
        out,
        "--batch-size",
        5,
        "--resume",
        "--lock-timeout",
        5,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f"score: 300 ok, 0 failed -> {out}\n"
    assert "resuming" in result.stderr
    after = part_stats(out)
    assert {k: after[k] for k in before} == before
    df = read(out)
    assert len(df) == 300 and df["path"].is_unique
    np.testing.assert_array_equal(df["prediction"], expected(model_dir, images)[0])


def test_interrupt_message_points_to_resume(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(**kw: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.score.score", interrupted)  # imported lazily by the job
    result = invoke("score", tmp_path, "--model", model_dir, "--out", tmp_path / "p.parquet")
    assert result.exit_code == 130
    assert "--resume" in result.stderr and ".p.parquet.partial" in result.stderr


# ------------------------------------------------------------------------- up to date


def test_up_to_date_uses_a_stat_fingerprint(tmp_path: Path, model_dir: Path) -> None:
    write_pngs(tmp_path / "in", digits(20))
    out = tmp_path / "pred.parquet"
    assert not run(model_dir, tmp_path / "in", out).skipped
    assert run(model_dir, tmp_path / "in", out).skipped
    first = tmp_path / "in" / "d00" / "img00000.png"
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    assert not run(model_dir, tmp_path / "in", out).skipped  # touched: rebuilt
    assert run(model_dir, tmp_path / "in", out).skipped
    assert not run(model_dir, tmp_path / "in", out, normalize="always").skipped
    assert not run(model_dir, tmp_path / "in", out, normalize="always", force=True).skipped


# ------------------------------------------------------------------------------ readers


def test_output_reads_with_pandas_polars_and_duckdb(tmp_path: Path, model_dir: Path) -> None:
    images = digits(30)
    write_pngs(tmp_path / "in", images)
    (tmp_path / "in" / "zz-bad.png").write_bytes(b"nope")
    out = run(model_dir, tmp_path / "in", tmp_path / "pred.parquet", batch_size=8).output
    schema = pq.read_schema(out / "part-00000.parquet")
    assert str(schema.field("path").type) == "string"
    assert str(schema.field("prediction").type) == "int16"
    assert str(schema.field("probability").type) == "float"
    assert str(schema.field("prob_9").type) == "float"
    assert str(schema.field("status").type) == "string"

    pdf = pd.read_parquet(out)
    pldf = pl.read_parquet(f"{out}/*.parquet")
    ddf = duckdb.sql(f"SELECT * FROM read_parquet('{out}/*.parquet') ORDER BY path").df()
    for df in (pdf, pldf.to_pandas(), ddf):
        assert len(df) == 31
        assert df["status"].tolist().count("ok") == 30
    assert pldf["prediction"].dtype == pl.Int16 and pldf["prediction"].null_count() == 1
    bad = pldf.filter(pl.col("path") == "zz-bad.png")
    assert bad["prediction"][0] is None and bad["status"][0].startswith("expected a PNG")
    counts = duckdb.sql(
        f"SELECT status = 'ok' AS ok, count(*) AS n FROM '{out}/*.parquet' GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert counts == [(False, 1), (True, 30)]


# ------------------------------------------------------------------------ CLI and errors


def test_cli_scores_a_folder(tmp_path: Path, model_dir: Path) -> None:
    write_pngs(tmp_path / "in", digits(12))
    out = tmp_path / "pred.parquet"
    args = ["score", tmp_path / "in", "--model", model_dir, "--out", out, "--lock-timeout", 0]
    result = invoke(*args, "--workers", 2, "--batch-size", 5, "--glob", "*.png")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"score: 12 ok, 0 failed -> {out}\n"
    again = invoke(*args, "--batch-size", 5, "--glob", "*.png")
    assert again.stdout == f"score: 12 ok, 0 failed -> {out} (up to date)\n"
    assert len(list(out.glob("part-*.parquet"))) == 3


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        ("no-model", "expected a model folder"),
        ("no-input", "expected a folder of images, a zarr store, an idx file or an image file"),
        ("not-idx", "expected idx type code"),
        ("bad-config", "expected a loadable feature_config"),
        ("no-config", "expected a feature_config object"),
        ("edited-config", "feature_config_hash"),
        ("other-size", "expected images giving"),
        ("bad-split", "expected split in"),
        ("bad-normalize", "--normalize"),
    ],
)
def test_bad_usage_is_exit_2(tmp_path: Path, model_dir: Path, setup: str, fragment: str) -> None:
    src, model, extra = tmp_path / "in", model_dir, []
    src.mkdir()
    if setup == "no-model":
        model = tmp_path / "nope"
    elif setup == "no-input":
        src = tmp_path / "missing"
    elif setup == "not-idx":  # starts like idx (an image file given alone is scored)
        src = tmp_path / "broken.idx"
        src.write_bytes(b"\0\0\x42\x03garbage")
    elif setup in ("bad-config", "no-config", "edited-config"):
        model = make_model(tmp_path / "m")
        doc = json.loads((model / "model.json").read_text())
        if setup == "bad-config":
            doc["feature_config"] = {"features": [{"family": "no-such-family"}]}
        elif setup == "no-config":
            del doc["feature_config"]
        else:
            doc["feature_config"]["features"][0]["factor"] = 2
        (model / "model.json").write_text(json.dumps(doc))
    elif setup == "other-size":
        store_src = tmp_path / "raw"
        store_src.mkdir()
        files = {}
        for split in ("train", "test"):
            files[split] = SplitFiles(store_src / f"{split}-i", store_src / f"{split}-l")
            write_idx(files[split].images, np.zeros((4, 32, 32), np.uint8))
            write_idx(files[split].labels, np.zeros(4, np.uint8))
        ingest(out=tmp_path / "s.zarr", sources=files, lock_timeout=0)
        src = tmp_path / "s.zarr"
    elif setup == "bad-split":
        extra = ["--split", "validation"]
        write_idx(tmp_path / "i", digits(3))
        write_idx(tmp_path / "l", np.zeros(3, np.uint8))
        files = {s: SplitFiles(tmp_path / "i", tmp_path / "l") for s in ("train", "test")}
        ingest(out=tmp_path / "s.zarr", sources=files, lock_timeout=0)
        src = tmp_path / "s.zarr"
    else:
        extra = ["--normalize", "sometimes"]
    result = invoke("score", src, "--model", model, "--out", tmp_path / "p.parquet", *extra)
    assert result.exit_code == 2, result.output
    assert fragment in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "p.parquet").exists()


@pytest.mark.parametrize(
    ("kind", "option", "expected"),
    [
        ("folder", ["--split", "train"], "--split: applies to zarr inputs only"),
        ("zarr", ["--glob", "*.png"], "--glob: applies to folder or image file inputs only"),
        (
            "idx",
            ["--normalize", "always"],
            "--normalize: applies to folder or image file inputs only",
        ),
        ("idx", ["--split", "test"], "--split: applies to zarr inputs only"),
    ],
)
def test_options_for_another_input_kind_are_exit_2(
    tmp_path: Path, model_dir: Path, kind: str, option: list[str], expected: str
) -> None:
    images = digits(3)
    if kind == "folder":
        write_pngs(tmp_path / "in", images)
        src = tmp_path / "in"
    else:
        write_idx(tmp_path / "i", images)
        write_idx(tmp_path / "l", np.zeros(3, np.uint8))
        src = tmp_path / "i"
        if kind == "zarr":
            files = {s: SplitFiles(tmp_path / "i", tmp_path / "l") for s in ("train", "test")}
            ingest(out=tmp_path / "s.zarr", sources=files, lock_timeout=0)
            src = tmp_path / "s.zarr"
    result = invoke("score", src, "--model", model_dir, "--out", tmp_path / "p.parquet", *option)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.output
    assert str(src) in errors[0]
    assert not (tmp_path / "p.parquet").exists()


def test_standing_settings_for_another_input_kind_are_ignored(
    tmp_path: Path, model_dir: Path
) -> None:
    """A config file's score.split (for zarr scoring) must not break scoring a folder."""
    write_pngs(tmp_path / "in", digits(4))
    config = tmp_path / "pipeline.toml"
    config.write_text('[score]\nsplit = "train"\n')
    out = tmp_path / "p.parquet"
    result = invoke(
        "--config", config, "score", tmp_path / "in", "--model", model_dir, "--out", out
    )
    assert result.exit_code == 0, result.output
    assert len(read(out)) == 4


def test_library_errors_are_named(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ArtifactError):
        load_scoring_model(tmp_path)
    with pytest.raises(InputError):
        run(model_dir, tmp_path / "missing", tmp_path / "p.parquet")
    with pytest.raises(InputError, match="--batch-size"):
        run(model_dir, tmp_path, tmp_path / "p.parquet", batch_size=0)
    other = make_model(
        tmp_path / "m2", config={"views": {}, "features": [{"family": "pixels", "factor": 2}]}
    )
    write_idx(tmp_path / "imgs", np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(ConfigMismatchError):
        run(other, tmp_path / "imgs", tmp_path / "p.parquet")


# --------------------------------------------------------------- the real MNIST pipeline


def _cli_ok(*args: Any) -> str:
    result = invoke(*args, "--lock-timeout", 0)
    assert result.exit_code == 0, result.output
    return str(result.stdout)


@pytest.mark.slow
@pytest.mark.mnist
def test_png_exports_of_mnist_test_set_score_exactly_like_the_store(
    real_pipeline: dict[str, Path], tmp_path: Path
) -> None:
    # The session fixture (conftest) runs fetch -> ingest -> features -> train once for
    # the real-data tests of train and score.
    store, model = real_pipeline["store"], real_pipeline["model"]
    images, labels = (a[:] for a in split_arrays(open_store(store), "test"))
    pngs = tmp_path / "pngs"
    for start in range(0, len(images), 1000):
        folder = pngs / f"{start // 1000:02d}"
        folder.mkdir(parents=True)
        for i in range(start, min(start + 1000, len(images))):
            Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
    from_store = tmp_path / "store.parquet"
    from_pngs = tmp_path / "pngs.parquet"
    assert _cli_ok("score", store, "--model", model, "--out", from_store) == (
        f"score: 10000 ok, 0 failed -> {from_store}\n"
    )
    assert _cli_ok("score", pngs, "--model", model, "--out", from_pngs) == (
        f"score: 10000 ok, 0 failed -> {from_pngs}\n"
    )
    z, p = read(from_store), read(from_pngs)
    assert p["path"].tolist() == [f"{i // 1000:02d}/{i:05d}.png" for i in range(10000)]
    np.testing.assert_array_equal(p["prediction"].to_numpy(), z["prediction"].to_numpy())
    np.testing.assert_array_equal(prob_matrix(p), prob_matrix(z))
    accuracy = float(np.mean(z["prediction"].to_numpy() == labels))
    metrics = json.loads((model / "metrics.json").read_text())
    assert accuracy == pytest.approx(metrics["accuracy"], abs=1e-12)
    # Re-normalizing MNIST's own digits (crop, scale, re-centre) must keep them readable.
    renorm = tmp_path / "always.parquet"
    _cli_ok("score", pngs, "--model", model, "--out", renorm, "--normalize", "always")
    acc_always = float(np.mean(read(renorm)["prediction"].to_numpy() == labels))
    print(
        f"MNIST test accuracy: train report {metrics['accuracy']:.4f}, scored {accuracy:.4f}, "
        f"re-normalized PNGs {acc_always:.4f}"
    )
    assert acc_always > accuracy - 0.02, (acc_always, accuracy)


def test_cli_default_batch_size_matches_the_library() -> None:
    import jobs.score
    import pipeline.score

    assert jobs.score.DEFAULT_BATCH_SIZE == pipeline.score.DEFAULT_BATCH_SIZE


def test_walk_reports_names_that_are_not_utf8_as_rows(tmp_path: Path) -> None:
    """One such name stopped a whole score run (UnicodeEncodeError in the fingerprint)."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for name in (b"a.png", b"bad\xff\xfe.png", b"sub/caf\xc3\xa9.png", b"sub/x\xe9.png"):
        (root / os.fsdecode(name)).write_bytes(b"")
    (root / os.fsdecode(b"dir\xff")).mkdir()
    (root / os.fsdecode(b"dir\xff/in.png")).write_bytes(b"")
    got = list(walk_images(root))
    bad = "expected a file name that is valid UTF-8, got other bytes (shown as \\x escapes)"
    assert got == [
        ("a.png", None),
        ("bad\\xff\\xfe.png", bad),
        ("dir\\xff/in.png", bad),
        ("sub/café.png", None),  # valid UTF-8, not ASCII: scored as usual
        ("sub/x\\xe9.png", bad),
    ]
    for rel, _ in got:
        rel.encode()  # every path is valid UTF-8 now


@pytest.mark.parametrize("fmt", ["table", "csv", "jsonl"])
def test_format_prints_the_predictions(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    monkeypatch.chdir(tmp_path)
    images = digits(2)
    Image.fromarray(images[0]).save("a.png")
    Image.fromarray(images[1]).convert("RGB").save("b.jpg", quality=100)
    Path("c.png").write_bytes(b"not an image")
    result = invoke(
        "score", "a.png", "b.jpg", "c.png", "--model", model_dir, "--out", "p", "--format", fmt
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[-1] == "score: 2 ok, 1 failed -> p"
    df = read(Path("p"))
    if fmt == "jsonl":
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        assert [r["path"] for r in rows] == ["a.png", "b.jpg", "c.png"]
        assert [r["prediction"] for r in rows[:2]] == df["prediction"][:2].tolist()
        assert rows[2]["prediction"] is None and rows[2]["status"] != "ok"
    elif fmt == "csv":
        parsed = pd.read_csv(io.StringIO(result.stdout))
        assert parsed["path"].tolist() == ["a.png", "b.jpg", "c.png"]
        assert list(parsed.columns) == list(df.columns)
    else:
        lines = result.stdout.splitlines()
        assert lines[0].split() == ["path", "prediction", "probability", "status"]
        assert lines[1].split()[:2] == ["a.png", str(int(df["prediction"][0]))]
        assert len(lines) == 4


def test_allow_empty_from_the_command_line(tmp_path: Path, model_dir: Path) -> None:
    (tmp_path / "in").mkdir()
    refused = invoke("score", tmp_path / "in", "--model", model_dir, "--out", tmp_path / "p")
    assert refused.exit_code == 2 and "got none" in refused.stderr
    assert not (tmp_path / "p").exists()
    allowed = invoke(
        "score", tmp_path / "in", "--model", model_dir, "--out", tmp_path / "p", "--allow-empty"
    )
    assert allowed.exit_code == 0 and "0 ok, 0 failed" in allowed.stdout


def test_a_job_whose_pool_runs_no_task_still_exits(tmp_path: Path, model_dir: Path) -> None:
    """An empty input with --allow-empty starts the worker pool and gives it nothing to do;
    the workers must still be told to exit, or the interpreter waits for them at exit."""
    (tmp_path / "in").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs",
            "score",
            str(tmp_path / "in"),
            "--model",
            str(model_dir),
            "--out",
            str(tmp_path / "p"),
            "--allow-empty",
            "--workers",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "0 ok, 0 failed" in proc.stdout
