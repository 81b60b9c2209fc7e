"""Issue 10, "one-line errors everywhere": every case a user or the machine can cause,
fed through the command line.

Each case of :data:`CASES` prepares its inputs, runs one job and expects: the exit code
(2 bad input, 1 environment), exactly one ``error: ...`` line on stderr (the last line)
with the expected words, no traceback, nothing on stdout, and nothing half-written in the
output's folder (no output, manifest, ``.partial``, ``.tmp-`` or ``.old-``; the ``.lock``
file may stay). Cases that need a real process (another user, a mounted tmpfs) run the
command line in a subprocess; the others use typer's CliRunner in-process.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import MNIST_NAMES, REPO_ROOT, write_synthetic_dataset
from test_fingerprint import make_deep_tree, remove_deep_tree
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.idx import write_idx
from pipeline.paths import manifest_path
from pipeline.stage import read_manifest

runner = CliRunner()
PIXELS = '[[features]]\nname = "px"\nfamily = "pixels"\nfactor = 4\n'


@dataclass(frozen=True)
class World:
    """Inputs every case may copy: idx files, a store, its features and a model."""

    raw: Path
    store: Path
    features: Path
    model: Path
    config: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from pipeline.catalogue import load_config
    from pipeline.features import features
    from pipeline.ingest import default_sources, ingest
    from pipeline.train import train

    root = tmp_path_factory.mktemp("world")
    ds = write_synthetic_dataset(root / "raw", n_train=60, n_test=20)
    store = root / "mnist.zarr"
    ingest(out=store, sources=default_sources(ds.raw_dir), chunk_size=16)
    config = root / "pixels.toml"
    config.write_text(PIXELS)
    feats = root / "features"
    features(store=store, out=feats, config=load_config(config), workers=1)
    model = root / "model"
    train(features=feats, out=model, validation_size=20)
    return World(ds.raw_dir, store, feats, model, config)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty working folder and no settings from the caller's environment."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("MNIST_PIPELINE") or name == "MNIST_SOURCE":
            monkeypatch.delenv(name)


@dataclass
class Run:
    """What a case's ``prepare`` returns: the arguments, environment and output path."""

    args: list[Any]
    out: Path
    env: dict[str, str] = field(default_factory=dict)
    subprocess: bool = False
    as_user: int | None = None  # run as this uid (root only)
    memory_limit: int | None = None  # bytes of address space of the subprocess


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(run: Run) -> Outcome:
    args = [str(a) for a in run.args]
    if not run.subprocess:
        result = runner.invoke(app, args, env=run.env)
        return Outcome(result.exit_code, result.stdout, result.stderr)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_PIPELINE")}
    env.update(run.env, PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, "-m", "jobs", *args]
    if run.as_user is not None:
        # setpriv, not os.setuid in a preexec_fn: here exec'ing the venv's python (under
        # /root) after setuid in Python fails with EACCES, through setpriv it works.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot run the job as another user")
        user = f"{run.as_user}"
        command = [setpriv, f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    limit = run.memory_limit

    def set_limit() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd="/tmp",  # the test's working folder may be private to root
        preexec_fn=set_limit,
    )
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def leftovers(out: Path) -> list[str]:
    """What a failed run left in the output's folder besides its lock file."""
    folder = out.parent
    if not folder.is_dir():
        return []
    left = []
    for p in folder.iterdir():
        name = p.name
        if name == out.name or name == f"{out.name}.manifest.json":
            left.append(name)
        elif name.startswith(f".{out.name}") and not name.endswith(".lock"):
            left.append(name)  # .partial, .old-<pid>, .tmp-<pid>
        elif ".tmp-" in name or name.endswith(".partial"):
            left.append(name)
    return sorted(left)


def assert_one_line_error(outcome: Outcome, code: int, *fragments: str) -> str:
    assert outcome.exit_code == code, (outcome.exit_code, outcome.stderr)
    assert "Traceback" not in outcome.stderr + outcome.stdout, outcome.stderr
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, outcome.stderr
    assert outcome.stderr.rstrip("\n").splitlines()[-1] == errors[0], outcome.stderr
    assert outcome.stdout == ""
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ----------------------------------------------------------------------------- preparing cases


def copy_raw(world: World, tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    shutil.copytree(world.raw, raw)
    raw.chmod(0o755)  # pytest's folders are 0700: another user could not list the copy
    return raw


def ingest_run(raw: Path, out: Path, *extra: Any) -> Run:
    return Run(["ingest", "--raw-dir", raw, "--out", out, "--lock-timeout", "0", *extra], out)


def features_run(world: World, tmp_path: Path, config_text: str, store: Path | None = None) -> Run:
    config = tmp_path / "features.toml"
    config.write_text(config_text)
    out = tmp_path / "features"
    store = store or world.store
    args = ["features", "--store", store, "--out", out, "--feature-config", config]
    return Run([*args, "--workers", "1", "--lock-timeout", "0"], out)


def replace_train_images(raw: Path, images: np.ndarray, labels: int | None = None) -> None:
    write_idx(raw / f"{MNIST_NAMES[('train', 'images')]}.gz", images, compress=True)
    n = len(images) if labels is None else labels
    write_idx(raw / f"{MNIST_NAMES[('train', 'labels')]}.gz", np.zeros(n, np.uint8), compress=True)


def case_corrupt_gzip(world: World, tmp_path: Path) -> Run:
    raw = copy_raw(world, tmp_path)
    path = raw / f"{MNIST_NAMES[('train', 'images')]}.gz"
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) - 16):  # the header reads fine, the stream breaks
        data[i] ^= 0x55
    path.write_bytes(bytes(data))
    return ingest_run(raw, tmp_path / "mnist.zarr")


def case_config_not_utf8(world: World, tmp_path: Path) -> Run:
    (tmp_path / "pipeline.toml").write_bytes(b'[ingest]\ndataset = "caf\xe9"\n')
    return ingest_run(world.raw, tmp_path / "mnist.zarr")


def case_input_not_readable(world: World, tmp_path: Path) -> Run:
    raw = copy_raw(world, tmp_path)
    (raw / f"{MNIST_NAMES[('train', 'labels')]}.gz").chmod(0)
    run = ingest_run(raw, tmp_path / "out" / "mnist.zarr")
    run.subprocess, run.as_user = True, (65534 if os.geteuid() == 0 else None)
    return run


def case_output_folder_read_only(world: World, tmp_path: Path) -> Run:
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    run = ingest_run(copy_raw(world, tmp_path), tmp_path / "ro" / "mnist.zarr")
    run.subprocess, run.as_user = True, (65534 if os.geteuid() == 0 else None)
    return run


def case_output_parent_is_a_file(world: World, tmp_path: Path) -> Run:
    (tmp_path / "notes.txt").write_text("mine")
    return ingest_run(world.raw, tmp_path / "notes.txt" / "mnist.zarr")


def case_disk_full_ingest(world: World, tmp_path: Path) -> Run:
    run = ingest_run(world.raw, tmp_path / "tiny" / "mnist.zarr")
    run.subprocess = True  # the process, and every thread writing, is gone before umount
    return run


def case_disk_full_features(world: World, tmp_path: Path) -> Run:
    # 784 raw pixels of 80 images: 250 KB of features for 64 KiB
    run = features_run(world, tmp_path, '[[features]]\nfamily = "pixels"\nfactor = 1\n')
    run.out = tmp_path / "tiny" / "features"
    run.args[run.args.index("--out") + 1] = run.out
    run.subprocess = True  # dask threads may still hold a part open after the error
    return run


def case_median_blur_999(world: World, tmp_path: Path) -> Run:
    run = features_run(
        world,
        tmp_path,
        '[views]\nblur = [{op = "median_blur", size = 999}]\n'
        '[[features]]\nfamily = "pixels"\nview = "blur"\n',
    )
    # Before the fix this allocated 36 GiB: in a subprocess with a cap, so a regression
    # fails the test with a MemoryError instead of taking the machine's memory.
    run.subprocess, run.memory_limit = True, 6 << 30
    return run


def case_feature_named_label(world: World, tmp_path: Path) -> Run:
    return features_run(world, tmp_path, '[[features]]\nname = "label"\nfamily = "pixels"\n')


def case_hog_eps_nan(world: World, tmp_path: Path) -> Run:
    return features_run(world, tmp_path, '[[features]]\nfamily = "hog"\neps = nan\n')


def case_nan_images(world: World, tmp_path: Path) -> Run:
    raw = copy_raw(world, tmp_path)
    replace_train_images(raw, np.full((60, 28, 28), np.nan, ">f4"))
    return ingest_run(raw, tmp_path / "mnist.zarr")


def case_one_inf_pixel(world: World, tmp_path: Path) -> Run:
    raw = copy_raw(world, tmp_path)
    images = np.zeros((60, 28, 28), ">f8")
    images[45, 27, 27] = np.inf
    replace_train_images(raw, images)
    return ingest_run(raw, tmp_path / "mnist.zarr", "--chunk-size", "16")


def case_empty_split(world: World, tmp_path: Path) -> Run:
    raw = copy_raw(world, tmp_path)
    replace_train_images(raw, np.zeros((0, 28, 28), np.uint8))
    return ingest_run(raw, tmp_path / "mnist.zarr")


def case_zero_size_images(world: World, tmp_path: Path) -> Run:
    raw = copy_raw(world, tmp_path)
    replace_train_images(raw, np.zeros((60, 28, 0), np.uint8))
    return ingest_run(raw, tmp_path / "mnist.zarr")


def case_truncated_zarr_chunk(world: World, tmp_path: Path) -> Run:
    store = tmp_path / "copy.zarr"
    shutil.copytree(world.store, store)
    chunk = store / "train" / "images" / "c" / "2" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    return features_run(world, tmp_path, PIXELS, store=store)


def case_truncated_parquet_part(world: World, tmp_path: Path) -> Run:
    feats = tmp_path / "features"
    shutil.copytree(world.features, feats)
    shutil.copy(manifest_path(world.features), manifest_path(feats))
    part = feats / "train-00001.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    out = tmp_path / "model"
    return Run(["train", "--features", feats, "--out", out, "--validation-size", "20"], out)


def case_section_typo(world: World, tmp_path: Path) -> Run:
    (tmp_path / "pipeline.toml").write_text("[trian]\ncv = 3\n")
    return ingest_run(world.raw, tmp_path / "mnist.zarr")


def case_key_typo(world: World, tmp_path: Path) -> Run:
    (tmp_path / "pipeline.toml").write_text("[ingest]\nchunksize = 3\n")
    return ingest_run(world.raw, tmp_path / "mnist.zarr")


def case_bool_for_int(world: World, tmp_path: Path) -> Run:
    (tmp_path / "pipeline.toml").write_text("[ingest]\nchunk_size = true\n")
    return ingest_run(world.raw, tmp_path / "mnist.zarr")


def case_string_for_int(world: World, tmp_path: Path) -> Run:
    (tmp_path / "pipeline.toml").write_text('[ingest]\nchunk_size = "7"\n')
    return ingest_run(world.raw, tmp_path / "mnist.zarr")


def case_env_bool_maybe(world: World, tmp_path: Path) -> Run:
    run = ingest_run(world.raw, tmp_path / "mnist.zarr")
    run.env = {"MNIST_PIPELINE_INGEST_FORCE": "maybe"}
    return run


def case_env_float_for_int(world: World, tmp_path: Path) -> Run:
    run = ingest_run(world.raw, tmp_path / "mnist.zarr")
    run.env = {"MNIST_PIPELINE_INGEST_CHUNK_SIZE": "7.0"}
    return run


@contextlib.contextmanager
def tmpfs(folder: Path) -> Iterator[Path]:
    """A real 64 KiB file system mounted at ``folder`` (needs root; else the test skips)."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 64 KiB tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


#: id -> (prepare, exit code, fragments of the error line)
CASES: dict[str, tuple[Callable[[World, Path], Run], int, tuple[str, ...]]] = {
    "corrupt-gzip": (case_corrupt_gzip, 2, ("train-images", "expected a valid gzip stream")),
    "config-not-utf8": (case_config_not_utf8, 2, ("pipeline.toml", "expected a UTF-8 TOML")),
    "input-not-readable": (case_input_not_readable, 1, ("train-labels", "Permission denied")),
    "output-folder-read-only": (case_output_folder_read_only, 1, ("ro/", "Permission denied")),
    "output-parent-is-a-file": (
        case_output_parent_is_a_file,
        2,
        ("notes.txt", "expected a folder, got a file"),
    ),
    # the output lands on a 64 KiB tmpfs (see TMPFS_CASES)
    "disk-full-ingest": (case_disk_full_ingest, 1, ("No space left on device",)),
    "disk-full-features": (case_disk_full_features, 1, ("No space left on device",)),
    "median-blur-999": (
        case_median_blur_999,
        2,
        ("median_blur", "expected size <= image side 28, got 999"),
    ),
    "feature-named-label": (case_feature_named_label, 2, ("expected a name other than", "label")),
    "hog-eps-nan": (case_hog_eps_nan, 2, ("expected a finite number for eps, got nan",)),
    "nan-images": (case_nan_images, 2, ("expected finite pixel values, got NaN in train image 0",)),
    "one-inf-pixel": (case_one_inf_pixel, 2, ("got infinite values in train image 45",)),
    "empty-split": (case_empty_split, 2, ("expected at least one train image, got 0",)),
    "zero-size-images": (case_zero_size_images, 2, ("at least 1x1 pixels, got shape (60, 28, 0)",)),
    "truncated-zarr-chunk": (
        case_truncated_zarr_chunk,
        2,
        ("copy.zarr", "expected readable chunks in train/images"),
    ),
    "truncated-parquet-part": (
        case_truncated_parquet_part,
        2,
        # The manifest's checksum catches it before parquet would fail to decode it.
        ("train-00001.parquet", "expected crc32c"),
    ),
    "config-section-typo": (
        case_section_typo,
        2,
        ("unknown section [trian] in pipeline.toml; did you mean [train]?",),
    ),
    "config-key-typo": (case_key_typo, 2, ("unknown key chunksize", "did you mean chunk_size?")),
    "config-bool-for-int": (
        case_bool_for_int,
        2,
        ("[ingest] chunk_size: expected an integer, got true",),
    ),
    "config-string-for-int": (
        case_string_for_int,
        2,
        ('[ingest] chunk_size: expected an integer, got "7"',),
    ),
    "env-bool-maybe": (
        case_env_bool_maybe,
        2,
        ("MNIST_PIPELINE_INGEST_FORCE: expected true or false", "got 'maybe'"),
    ),
    "env-float-for-int": (
        case_env_float_for_int,
        2,
        ("MNIST_PIPELINE_INGEST_CHUNK_SIZE: expected an integer, got '7.0'",),
    ),
}


#: Cases run as another user (when the tests run as root): their files must be reachable
#: by that user, and pytest's base folder is private to root.
OTHER_USER_CASES = ("input-not-readable", "output-folder-read-only")
TMPFS_CASES = ("disk-full-ingest", "disk-full-features")


@contextlib.contextmanager
def shared_folder() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="test-errors-", dir="/tmp"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        for p in [folder, *folder.rglob("*")]:
            with contextlib.suppress(OSError):
                p.chmod(0o755 if p.is_dir() else 0o644)
        shutil.rmtree(folder)


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_error(case: str, world: World, tmp_path: Path) -> None:
    prepare, code, fragments = CASES[case]
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(shared_folder()) if case in OTHER_USER_CASES else tmp_path
        if case in TMPFS_CASES:
            stack.enter_context(tmpfs(base / "tiny"))
        run = prepare(world, base)
        outcome = run_cli(run)
        assert_one_line_error(outcome, code, *fragments)
        assert leftovers(run.out) == []


# ----------------------------------------------------------------------------- not errors


def test_disk_full_while_writing_the_manifest_leaves_no_temporary_file(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.stage as stage

    real_dump = stage.json.dump

    def dump(obj: Any, f: Any, **kw: Any) -> None:
        if isinstance(obj, dict) and obj.get("stage") == "ingest":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_dump(obj, f, **kw)

    out = tmp_path / "mnist.zarr"
    with monkeypatch.context() as patch:
        patch.setattr(stage.json, "dump", dump)
        outcome = run_cli(ingest_run(world.raw, out))
    assert_one_line_error(outcome, 1, "No space left on device")
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    assert read_manifest(out) is None  # the next run rebuilds rather than trusts it
    again = run_cli(ingest_run(world.raw, out))
    assert again.exit_code == 0 and "written" in again.stdout, again.stderr


def test_a_file_name_that_is_not_utf8_becomes_a_row(world: World, tmp_path: Path) -> None:
    """One such name stopped the whole score run (UnicodeEncodeError, traceback)."""
    from PIL import Image

    folder = tmp_path / "scans"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in (b"a.png", b"b\xff\xfe.png", b"c.png"):
        image = Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8))
        image.save(folder / os.fsdecode(name))
    out = tmp_path / "predictions"
    args = ["score", folder, "--model", world.model, "--out", out, "--workers", "1"]
    outcome = run_cli(Run(args, out))
    assert outcome.exit_code == 0, outcome.stderr
    assert "Traceback" not in outcome.stderr
    rows = pd.read_parquet(out).sort_values("path")
    assert rows["path"].tolist() == ["a.png", "b\\xff\\xfe.png", "c.png"]
    status = rows["status"].tolist()
    assert status[0] == status[2] == "ok"
    assert "expected a file name that is valid UTF-8" in status[1]
    assert read_manifest(out) is not None


def test_a_tree_deeper_than_the_recursion_limit_gets_its_manifest(
    world: World, tmp_path: Path
) -> None:
    """The output was written but the manifest was not (RecursionError in disk_usage), so
    every re-run repeated the work and failed again."""
    folder = tmp_path / "deep"
    depth = sys.getrecursionlimit() + 200
    png = tmp_path / "digit.png"
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    make_deep_tree(folder, depth, leaf="deep.png", data=png.read_bytes())
    shutil.copy(png, folder / "top.png")
    out = tmp_path / "predictions"
    args = ["score", folder, "--model", world.model, "--out", out, "--workers", "1"]
    try:
        first = run_cli(Run(args, out))
        assert first.exit_code == 0, first.stderr[-2000:]
        manifest = read_manifest(out)
        assert manifest is not None and manifest["status"] == "complete"
        assert len(pd.read_parquet(out)) == 2
        second = run_cli(Run(args, out))
        assert second.exit_code == 0, second.stderr[-2000:]
        assert "up to date" in second.stderr + second.stdout
    finally:
        remove_deep_tree(folder)


def test_gzip_fixture_is_really_gzip(world: World) -> None:
    # The corrupt-gzip case flips bytes of a real gzip stream, not of raw idx.
    path = world.raw / f"{MNIST_NAMES[('train', 'images')]}.gz"
    assert gzip.decompress(path.read_bytes())[:4] == b"\x00\x00\x08\x03"
