"""The jobs as SLURM batch jobs on a real single-node SLURM (conftest's ``slurm`` fixture):
stages chained with ``--dependency=afterok`` (exit codes propagate, logs are plain text or
JSON lines), ``scancel`` of a job mid-run (no partial output, no stray jobs), and the batch
log switches (MNIST_PIPELINE_LOG_FORMAT, the JSON error line, plain train summaries)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Slurm, separable_images
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.idx import write_idx
from pipeline.paths import manifest_path, temp_path
from pipeline.stage import output_lock

runner = CliRunner()
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}
BOX_DRAWING = set("─│┏┓┗┛━┃┡┩╇┠┨")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("MNIST_PIPELINE") and name != "MNIST_PIPELINE_TEST_SLURM_CONF":
            monkeypatch.delenv(name)


def write_raw(root: Path) -> Path:
    """Learnable idx files under the MNIST names (200 train, 60 test images)."""
    raw = root / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 200), ("t10k", 60)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        labels[:10] = np.arange(10)
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", separable_images(labels, seed=n),
                  compress=True)  # fmt: skip
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels, compress=True)
    return raw


def small_config(root: Path) -> Path:
    config = root / "small.toml"
    config.write_text('[[features]]\nfamily = "pixels"\nfactor = 4\n')
    return config


# ------------------------------------------------------------------------ SLURM helpers


def sbatch(
    slurm: Slurm,
    job: list[Any],
    *,
    name: str,
    cwd: Path,
    after: str | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Submit ``python -m jobs JOB...`` as a 1-CPU batch job; returns its id. Its log is
    ``cwd/<name>.log``."""
    command = shlex.join([sys.executable, "-m", "jobs", *map(str, job)])
    args = [
        "sbatch", "--parsable", f"--job-name=mnist-test-{name}", f"--output={cwd / name}.log",
        f"--chdir={cwd}", "--cpus-per-task=1", "--mem=1G", f"--wrap=exec {command}",
    ]  # fmt: skip
    if after:
        args.insert(1, f"--dependency=afterok:{after}")
    result = subprocess.run(
        args, env={**slurm.env(), **(env or {})}, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_info(slurm: Slurm, job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=slurm.env(), capture_output=True,
        text=True, check=True,
    ).stdout  # fmt: skip
    return dict(token.split("=", 1) for token in out.split() if "=" in token)


def wait_job(slurm: Slurm, job_id: str, *, timeout: float = 180.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while (info := job_info(slurm, job_id))["JobState"] not in FINISHED:
        assert time.monotonic() < deadline, f"job {job_id} still {info['JobState']}"
        time.sleep(0.3)
    return info


def wait_for(predicate: Any, what: str, *, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"expected {what} within {timeout} s"
        time.sleep(0.1)


def squeue(slurm: Slurm, *args: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i", *args], env=slurm.env(), capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    return out.split()


def assert_no_jobs(slurm: Slurm, *, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while (jobs := squeue(slurm)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if jobs:
        subprocess.run(["scancel", *jobs], env=slurm.env(), check=False)
    assert not jobs, f"stray SLURM jobs: {jobs}"


def assert_plain(log: Path) -> str:
    text = log.read_text(encoding="utf-8")
    assert text.isascii(), [c for c in text if not c.isascii()][:5]
    assert "\x1b" not in text  # no terminal colours or progress bars
    assert not BOX_DRAWING & set(text)
    return text


# ------------------------------------------------------------------------------- tests


def test_stages_chained_with_afterok(slurm: Slurm, tmp_path: Path) -> None:
    raw, config = write_raw(tmp_path), small_config(tmp_path)
    store, features = tmp_path / "mnist.zarr", tmp_path / "features"
    model, pred = tmp_path / "model", tmp_path / "pred.parquet"
    stages = [
        ("ingest", ["ingest", "--raw-dir", raw, "--out", store, "--chunk-size", "64"]),
        ("features", ["features", "--store", store, "--out", features, "--feature-config", config]),
        ("train", ["train", "--features", features, "--out", model, "--validation-size", "50"]),
        ("score", ["score", store, "--model", model, "--out", pred]),
    ]
    ids: dict[str, str] = {}
    previous = None
    for name, job in stages:
        previous = ids[name] = sbatch(slurm, job, name=name, cwd=tmp_path, after=previous)
    for name, job_id in ids.items():
        info = wait_job(slurm, job_id)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (name, info)
    for output in (store, features, model, pred):
        assert json.loads(manifest_path(output).read_text())["status"] == "complete"
    logs = {name: assert_plain(tmp_path / f"{name}.log") for name in ids}
    assert f"[features] wrote {features}" in logs["features"]
    assert logs["score"].rstrip().splitlines()[-1].startswith("score: 60 ok, 0 failed")
    summary = logs["train"][logs["train"].index(f"train: {model} (written)") :].splitlines()
    assert summary[1].startswith("test accuracy: ") and summary[1].endswith("%")
    assert any(line.startswith("time: ") and line.endswith(" s") for line in summary)
    assert_no_jobs(slurm)


def test_a_failing_stage_cancels_its_dependents_and_logs_json(slurm: Slurm, tmp_path: Path) -> None:
    features, model = tmp_path / "features", tmp_path / "model"
    json_logs = {"MNIST_PIPELINE_LOG_FORMAT": "json"}
    first = sbatch(
        slurm,
        ["features", "--store", tmp_path / "mnist.zarr", "--out", features,
         "--feature-config", tmp_path / "missing.toml"],
        name="features", cwd=tmp_path, env=json_logs,
    )  # fmt: skip
    second = sbatch(
        slurm, ["train", "--features", features, "--out", model],
        name="train", cwd=tmp_path, after=first, env=json_logs,
    )  # fmt: skip
    third = sbatch(
        slurm, ["score", tmp_path, "--model", model, "--out", tmp_path / "p.parquet"],
        name="score", cwd=tmp_path, after=second, env=json_logs,
    )  # fmt: skip
    info = wait_job(slurm, first)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), info
    for job_id in (second, third):
        info = wait_job(slurm, job_id, timeout=30)
        assert info["JobState"] == "CANCELLED", info
        assert info["Reason"] == "DependencyNeverSatisfied", info
    assert not (tmp_path / "train.log").exists() and not (tmp_path / "score.log").exists()
    assert not features.exists() and not model.exists()
    lines = assert_plain(tmp_path / "features.log").splitlines()
    records = [json.loads(line) for line in lines]  # every line one JSON object
    assert records[-1]["level"] == "error" and records[-1]["exit_code"] == 2
    assert "missing.toml" in records[-1]["msg"]
    assert_no_jobs(slurm)


def test_scancel_mid_run_leaves_no_output_and_no_jobs(slurm: Slurm, tmp_path: Path) -> None:
    """A features job on SLURM workers, cancelled while its tasks are on a worker: the
    worker job is suspended first (``scontrol suspend``), so the run is surely mid-way."""
    raw = write_raw(tmp_path)
    store, out = tmp_path / "mnist.zarr", tmp_path / "features"
    result = runner.invoke(app, ["ingest", "--raw-dir", str(raw), "--out", str(store)])
    assert result.exit_code == 0, result.output
    log = tmp_path / "driver.log"
    job = ["features", "--store", store, "--out", out, "--feature-config", small_config(tmp_path),
           "--cluster", "slurm", "--lock-timeout", "120"]  # fmt: skip
    for option in ("cores=1", "memory=1GB", "interface=lo", "wait_timeout=90"):
        job += ["--cluster-option", option]
    # Hold the output's lock: the job gets its worker, then waits for the lock.
    with output_lock(out, timeout=5):
        driver = sbatch(slurm, job, name="driver", cwd=tmp_path)
        wait_for(lambda: log.exists() and "waiting for" in log.read_text(), "the lock wait")
        (worker,) = squeue(slurm, "--name=mnist-pipeline-worker")
        suspend = subprocess.run(
            ["scontrol", "suspend", worker], env=slurm.env(), capture_output=True, text=True,
            check=False,
        )  # fmt: skip
        assert suspend.returncode == 0, suspend.stderr
    wait_for(lambda: temp_path(out).exists(), "the build to start", timeout=30)
    time.sleep(1.0)  # tasks handed to the (suspended) worker
    assert job_info(slurm, driver)["JobState"] == "RUNNING"
    subprocess.run(["scancel", driver], env=slurm.env(), check=True)
    info = wait_job(slurm, driver, timeout=60)
    assert info["JobState"] == "CANCELLED", info
    assert_no_jobs(slurm)
    assert not out.exists() and not temp_path(out).exists()
    assert not manifest_path(out).exists()
    text = assert_plain(log)
    assert f"cancelled SLURM worker jobs {worker}" in text, text
    assert "error: terminated (SIGTERM); no partial output was kept" in text, text


# --------------------------------------------------------------- batch logs, no SLURM


def test_one_env_var_switches_every_job_to_json(tmp_path: Path) -> None:
    raw = write_raw(tmp_path)
    env = {"MNIST_PIPELINE_LOG_FORMAT": "json"}
    result = runner.invoke(
        app, ["ingest", "--raw-dir", str(raw), "--out", str(tmp_path / "s.zarr")], env=env
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert any(r["msg"].startswith("wrote ") for r in records)
    result = runner.invoke(app, ["train", "--features", str(tmp_path / "nothing")], env=env)
    assert result.exit_code == 2
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert records[-1]["level"] == "error" and records[-1]["exit_code"] == 2
    # The command line still wins over the environment.
    result = runner.invoke(
        app, ["train", "--features", str(tmp_path / "nothing"), "--log-format", "human"], env=env
    )
    assert result.stderr.splitlines()[-1].startswith("error: ")
    bad = runner.invoke(app, ["train"], env={"MNIST_PIPELINE_LOG_FORMAT": "xml"})
    assert bad.exit_code == 2 and "xml" in bad.output


def test_make_log_format_json_reaches_every_job(tmp_path: Path) -> None:
    """`LOG_FORMAT=json make ...` exports MNIST_PIPELINE_LOG_FORMAT to every recipe."""
    repo = Path(__file__).resolve().parents[1]
    probe = tmp_path / "probe.mk"
    probe.write_text("probe:\n\t@echo format=$$MNIST_PIPELINE_LOG_FORMAT\n")
    make = ["make", "-s", "-C", str(repo), "-f", "Makefile", "-f", str(probe), "probe"]
    for env, expected in (({"LOG_FORMAT": "json"}, "format=json"), ({}, "format=")):
        clean = {k: v for k, v in os.environ.items() if "LOG_FORMAT" not in k}
        out = subprocess.run(
            make, env={**clean, **env}, capture_output=True, text=True, check=True
        ).stdout
        assert out.strip() == expected


def test_train_summary_is_plain_off_a_terminal(tmp_path: Path) -> None:
    raw, config = write_raw(tmp_path), small_config(tmp_path)
    store, features, model = tmp_path / "s.zarr", tmp_path / "f", tmp_path / "m"
    for args in (
        ["ingest", "--raw-dir", raw, "--out", store],
        ["features", "--store", store, "--out", features, "--feature-config", config],
    ):
        assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    result = runner.invoke(
        app, ["train", "--features", str(features), "--out", str(model), "--validation-size", "50"]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"train: {model} (written)"
    keys = [line.split(": ", 1)[0] for line in lines[1:]]
    assert keys[:2] == ["test accuracy", "best parameters"] and "features" in keys
    assert keys[-1] == "report" and lines[-1] == f"report: {model / 'report.html'}"
    assert result.stdout.isascii() and not BOX_DRAWING & set(result.stdout)


def test_scancel_while_waiting_for_workers_cancels_them(slurm: Slurm, tmp_path: Path) -> None:
    """SIGTERM before the stage runner's own handler is installed (the job still waits for
    workers that cannot all start): the worker jobs are cancelled too."""
    log = tmp_path / "driver.log"
    job = ["features", "--store", tmp_path / "none.zarr", "--out", tmp_path / "f",
           "--cluster", "slurm"]  # fmt: skip
    # Workers as big as the node: none can start beside the driver (it holds one CPU).
    cpus = subprocess.run(
        ["sinfo", "-h", "-o", "%c"], env=slurm.env(), capture_output=True, text=True, check=True
    ).stdout.split()[0]
    for option in (f"cores={cpus}", "jobs=2", "memory=1GB", "interface=lo", "wait_timeout=120"):
        job += ["--cluster-option", option]
    driver = sbatch(slurm, job, name="driver", cwd=tmp_path)
    wait_for(lambda: len(squeue(slurm, "--name=mnist-pipeline-worker")) == 2, "2 worker jobs")
    subprocess.run(["scancel", driver], env=slurm.env(), check=True)
    info = wait_job(slurm, driver, timeout=60)
    assert info["JobState"] == "CANCELLED", info
    assert_no_jobs(slurm)
    text = assert_plain(log)
    assert "cancelled SLURM worker jobs" in text and "error: terminated (SIGTERM)" in text, text
