"""What exit 0 means, end to end through the CLI: no job destroys what it did not write, and
no job reports success on wrong data (the cases of the integrity issue, each reproduced)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT, separable_images, write_synthetic_dataset
from PIL import Image
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.classifier import Classifier
from pipeline.fingerprint import content_fingerprint
from pipeline.idx import write_idx
from pipeline.model import load_model, save_model
from pipeline.paths import manifest_path
from pipeline.stage import output_lock

runner = CliRunner()
SMALL_CONFIG = {"views": {}, "features": [{"family": "pixels", "factor": 4}]}


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("MNIST_PIPELINE") or name == "MNIST_SOURCE":
            monkeypatch.delenv(name)


def invoke(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(result: Any, code: int, *fragments: str) -> str:
    """Exit ``code`` with exactly one 'error:' line (the last) and no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0]
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its content hash."""
    return {
        p.relative_to(folder).as_posix(): content_fingerprint(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@dataclass(frozen=True)
class Project:
    """A small project folder laid out like the defaults: raw idx, store, features, model."""

    root: Path
    raw: Path
    store: Path
    features: Path
    model: Path
    images: Path  # a folder of PNG files to score


def _build_project(root: Path) -> Project:
    raw = root / "data/raw/mnist"
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("test", 60)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        labels[:10] = np.arange(10)
        prefix = "train" if split == "train" else "t10k"
        raw.mkdir(parents=True, exist_ok=True)
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", separable_images(labels, seed=n),
                  compress=True)  # fmt: skip
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels, compress=True)
    store, features, model = root / "data/mnist.zarr", root / "data/features", root / "data/m"
    config = root / "small.toml"
    config.write_text('[[features]]\nfamily = "pixels"\nfactor = 4\n')
    for args in (
        ["ingest", "--raw-dir", raw, "--out", store, "--chunk-size", "64"],
        ["features", "--store", store, "--out", features, "--feature-config", config],
        ["train", "--features", features, "--out", model, "--validation-size", "50"],
    ):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    images = root / "digits"
    images.mkdir()
    for i, img in enumerate(separable_images(np.arange(30) % 10, seed=3)):
        Image.fromarray(img).save(images / f"{i:03d}.png")
    (root / "data/notes.txt").write_text("my notes")
    return Project(root, raw, store, features, model, images)


@pytest.fixture(scope="module")
def built_project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return _build_project(tmp_path_factory.mktemp("project"))


@pytest.fixture
def project(built_project: Project, tmp_path: Path) -> Project:
    """A fresh copy of the module's project, so a test may damage it."""
    root = tmp_path / "p"
    shutil.copytree(built_project.root, root, symlinks=True)
    return Project(*(root / Path(p).relative_to(built_project.root) for p in (
        built_project.root, built_project.raw, built_project.store, built_project.features,
        built_project.model, built_project.images,
    )))  # fmt: skip


# --------------------------------------------------------------------------- data loss


def _data_loss_cases(p: Project) -> dict[str, list[Any]]:
    return {
        "score --out the input folder": ["score", p.images, "--model", p.model, "--out", p.images],
        "score --out the model folder": ["score", p.images, "--model", p.model, "--out", p.model],
        "features --out data": ["features", "--store", p.store, "--out", p.root / "data"],
        "ingest --raw-dir R --out R": ["ingest", "--raw-dir", p.raw, "--out", p.raw],
        "train --features F --out F": ["train", "--features", p.features, "--out", p.features],
        "score --out a file of the user's": [
            "score", p.images, "--model", p.model, "--out", p.root / "data/notes.txt",
        ],
        "ingest --out the features": ["ingest", "--raw-dir", p.raw, "--out", p.features],
        "features --out .": ["features", "--store", p.store, "--out", "."],
        "features --out /": ["features", "--store", p.store, "--out", "/"],
        "score --out ..": ["score", p.images, "--model", p.model, "--out", ".."],
    }  # fmt: skip


CASES = list(_data_loss_cases(Project(*(Path() for _ in range(6)))))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("force", [False, True])
def test_no_job_replaces_what_it_did_not_write(
    project: Project, case: str, force: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project.root / "data")  # `.` and `..` name the data and project folders
    before = snapshot(project.root)
    args = _data_loss_cases(project)[case] + (["--force"] if force else [])
    line = assert_refused(invoke(*args), 2, "refusing to")
    assert snapshot(project.root) == before, line


def test_a_job_still_replaces_its_own_output(project: Project) -> None:
    out = project.root / "pred.parquet"
    for force in ([], ["--force"]):
        result = invoke("score", project.images, "--model", project.model, "--out", out, *force)
        assert result.exit_code == 0, result.output
    assert len(pd.read_parquet(out)) == 30


@pytest.mark.parametrize(
    "args",
    [
        ["ingest", "--out", "s3://bucket/x"],
        ["features", "--out", "s3://bucket/x"],
        ["score", "digits", "--out", "s3://bucket/x"],
        ["train", "--out", "gs://bucket/m"],
        ["features", "--store", "s3://bucket/mnist.zarr", "--out", "f"],
    ],
)
def test_object_store_urls_are_refused_until_supported(project: Project, args: list[str]) -> None:
    os.chdir(project.root)
    extra = {
        "ingest": ["--raw-dir", project.raw],
        "features": ["--store", project.store],
        "score": ["--model", project.model],
        "train": ["--features", project.features],
    }[args[0]]
    if "--store" in args:
        extra = []
    assert_refused(invoke(*args, *extra), 2, "expected a local path, got the URL")
    assert not list(project.root.glob("s3:*")) and not list(project.root.glob("gs:*"))


# ---------------------------------------------------------------------- silent wrong data


def _delete_one_chunk(store: Path) -> Path:
    chunk = sorted((store / "train/images/c").rglob("*"))
    chunk_file = next(p for p in chunk if p.is_file())
    chunk_file.unlink()
    return chunk_file


def test_a_missing_zarr_chunk_is_an_error_not_zeros(project: Project) -> None:
    _delete_one_chunk(project.store)
    out = project.root / "f2"
    assert_refused(invoke("features", "--store", project.store, "--out", out), 2,
                   str(project.store), "chunks")  # fmt: skip
    assert not out.exists()
    result = invoke("score", project.store, "--split", "train", "--model", project.model,
                    "--out", project.root / "p.parquet")  # fmt: skip
    assert_refused(result, 2, str(project.store))


def test_a_chunk_missing_inside_a_task_is_an_error(project: Project) -> None:
    # The store is checked when opened; a chunk that disappears (or is not visible on a
    # worker) afterwards must still fail the task, not read as zeros.
    from pipeline.errors import StoreError
    from pipeline.store import strict_arrays

    images, _ = strict_arrays(project.store, "train")
    np.testing.assert_array_equal(images[0:64].shape, (64, 28, 28))
    _delete_one_chunk(project.store)
    with pytest.raises(StoreError, match=r"expected chunk .* got no such chunk"):
        for start in range(0, images.shape[0], 64):
            images[start : start + 64]


def test_chunks_of_only_zeros_are_written(tmp_path: Path) -> None:
    # zarr skips chunks equal to the fill value by default: the strict check would then
    # take an all-black chunk for a missing one.
    ds = write_synthetic_dataset(tmp_path / "raw", n_train=20, n_test=8)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        zeros = np.zeros_like(ds.images(split))
        write_idx(tmp_path / "raw" / f"{prefix}-images-idx3-ubyte.gz", zeros, compress=True)
        write_idx(tmp_path / "raw" / f"{prefix}-labels-idx1-ubyte.gz",
                  np.zeros(len(zeros), np.uint8), compress=True)  # fmt: skip
    store = tmp_path / "zeros.zarr"
    assert invoke("ingest", "--raw-dir", tmp_path / "raw", "--out", store).exit_code == 0
    out = tmp_path / "f"
    result = invoke("features", "--store", store, "--out", out)
    assert result.exit_code == 0, result.output


def _parts(features: Path, split: str) -> list[Path]:
    return sorted(features.glob(f"{split}-*.parquet"))


@pytest.mark.parametrize("damage", ["deleted", "duplicated", "other-config", "edited"])
def test_train_refuses_features_that_are_not_what_their_manifest_lists(
    project: Project, tmp_path: Path, damage: str
) -> None:
    parts = _parts(project.features, "train")
    assert len(parts) >= 3
    if damage == "deleted":
        parts[1].unlink()
        fragment = "missing"
    elif damage == "duplicated":
        shutil.copy(parts[0], project.features / "train-00099.parquet")
        fragment = "unlisted"
    elif damage == "other-config":
        # Same layout, another parameter: a part from another features run swapped in.
        other_cfg = tmp_path / "other.toml"
        other_cfg.write_text(
            '[views]\nd = [{op = "deskew"}]\n'
            '[[features]]\nfamily = "pixels"\nfactor = 4\nview = "d"\n'
        )
        other = tmp_path / "other-features"
        result = invoke("features", "--store", project.store, "--out", other,
                        "--feature-config", other_cfg)  # fmt: skip
        assert result.exit_code == 0, result.output
        shutil.copy(_parts(other, "train")[1], parts[1])
        fragment = "crc32c"
    else:
        table = pq.read_table(parts[1])
        pq.write_table(table.slice(0, table.num_rows - 3), parts[1])
        fragment = "crc32c"
    result = invoke("train", "--features", project.features, "--out", project.root / "m2",
                    "--validation-size", "50")  # fmt: skip
    assert_refused(result, 2, str(project.features), fragment)
    assert not (project.root / "m2").exists()


def test_train_refuses_features_without_their_manifest(project: Project) -> None:
    manifest_path(project.features).unlink()
    result = invoke("train", "--features", project.features, "--out", project.root / "m2",
                    "--validation-size", "50")  # fmt: skip
    assert_refused(result, 2, "expected a complete features manifest")


@pytest.mark.parametrize(
    "edit",
    [
        ("coef", lambda a: a.__setitem__((0, 0), np.nan)),
        ("scale", lambda a: a.__setitem__(0, 0.0)),
        ("intercept", lambda a: a.__setitem__(0, np.inf)),
        ("classes", lambda a: a.__setitem__(1, a[0])),
    ],
    ids=["nan-coef", "zero-scale", "inf-intercept", "duplicate-class"],
)
def test_a_consistently_edited_model_with_bad_content_is_refused(
    project: Project, edit: tuple[str, Any]
) -> None:
    # The edit keeps the checksum right, as a careful tamperer (or a broken tool) would.
    model = load_model(project.model)
    name, change = edit
    array = getattr(model, name).copy()
    change(array)
    from dataclasses import replace

    save_model(replace(model, **{name: array}), project.model)
    if name == "classes":
        doc = json.loads((project.model / "model.json").read_text())
        doc["classes"] = [int(c) for c in array]
        (project.model / "model.json").write_text(json.dumps(doc))
    result = invoke("score", project.images, "--model", project.model,
                    "--out", project.root / "p.parquet")  # fmt: skip
    assert_refused(result, 2, "model.npz")
    assert not (project.root / "p.parquet").exists()


def test_score_uses_the_model_as_it_is_once_it_holds_the_lock(project: Project) -> None:
    """A model retrained while score waits for its output's lock is the one scored, and
    the one its manifest records."""
    out = project.root / "pred.parquet"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    other = project.root / "other-model"
    assert invoke("train", "--features", project.features, "--out", other,
                  "--validation-size", "50", "--grid", "C=0.0001").exit_code == 0  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out, timeout=0):
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs", "score", str(project.images), "--model",
             str(project.model), "--out", str(out), "--workers", "1"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(3)  # it has loaded and checked the model, and now waits for the lock
        for name in ("model.npz", "model.json"):  # "retrain": the other model replaces it
            shutil.copy(other / name, project.model / name)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    used = pd.read_parquet(out)
    clf = Classifier.load(project.model)
    paths = [project.images / p for p in used["path"]]
    np.testing.assert_array_equal(used["prediction"].to_numpy(), clf.predict(paths))
    digest = hashlib.sha256(
        (project.model / "model.json").read_bytes()
        + b"\0"
        + (project.model / "model.npz").read_bytes()
    ).hexdigest()
    assert json.loads(manifest_path(out).read_text())["inputs"]["model"]["sha256"] == digest


# ----------------------------------------------------------- relative paths on a cluster


@pytest.fixture
def cluster_elsewhere(tmp_path: Path) -> Iterator[str]:
    """A real dask scheduler and two worker processes whose working directory is another
    folder than the job's (as with SLURM --chdir)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    bin_dir = Path(sys.executable).parent
    scheduler_file = tmp_path / "scheduler.json"
    procs = [
        subprocess.Popen(
            [
                str(bin_dir / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(scheduler_file),
            ],
            cwd=elsewhere,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        str(bin_dir / "dask"),
                        "worker",
                        address,
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                        "--local-directory",
                        str(elsewhere),
                    ],
                    cwd=elsewhere,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.distributed
def test_relative_paths_on_workers_in_another_directory(
    project: Project, cluster_elsewhere: str
) -> None:
    os.chdir(project.root)
    local = invoke("score", "data/mnist.zarr", "--model", "data/m", "--out", "local.parquet")
    assert local.exit_code == 0, local.output
    remote = invoke("score", "data/mnist.zarr", "--model", "data/m", "--out", "remote.parquet",
                    "--scheduler", cluster_elsewhere)  # fmt: skip
    assert remote.exit_code == 0, remote.output
    a, b = pd.read_parquet("local.parquet"), pd.read_parquet("remote.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert a["prediction"].nunique() > 1  # not one digit for every all-zero image

    cfg = project.root / "small.toml"
    for name, extra in (("f-local", []), ("f-remote", ["--scheduler", cluster_elsewhere])):
        result = invoke("features", "--store", "data/mnist.zarr", "--out", name,
                        "--feature-config", cfg, *extra)  # fmt: skip
        assert result.exit_code == 0, result.output
    for part in sorted(Path("f-local").glob("*.parquet")):
        remote_part = Path("f-remote") / part.name
        assert pq.read_table(part).equals(pq.read_table(remote_part))
        # The list items keep their `not null` across the cluster (pickled schemas lose it).
        assert pq.read_schema(remote_part) == pq.read_schema(part)
        for field in pq.read_schema(remote_part):
            if hasattr(field.type, "value_field"):
                assert not field.type.value_field.nullable
