"""pipeline.cluster: settings from --cluster, --cluster-option and the [cluster] table; CPU
counts; and features/score on SLURM worker jobs (a real single-node SLURM, see conftest's
``slurm`` fixture) giving the same output as a local run."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import Slurm, separable_images
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.cluster import (
    ClusterSettings,
    SlurmOptions,
    cgroup_cpu_quota,
    cluster_settings,
    usable_cpus,
    worker_environment,
)
from pipeline.errors import InputError
from pipeline.idx import write_idx
from pipeline.parallel import default_workers

runner = CliRunner()
# Worker jobs of one core each: the test SLURM has 2 CPUs (one may run a driver job).
SLURM_OPTIONS = ["cores=1", "memory=1GB", "interface=lo", "wait_timeout=90"]


def invoke(*args: Any, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("MNIST_PIPELINE") and name != "MNIST_PIPELINE_TEST_SLURM_CONF":
            monkeypatch.delenv(name)


# --------------------------------------------------------------------------- settings


def test_default_is_local() -> None:
    assert cluster_settings(None) == ClusterSettings(kind="local")
    assert cluster_settings(None, table={"cores": 4}).kind == "local"  # table alone: local


def test_table_then_options_then_validation() -> None:
    table = {
        "kind": "slurm",
        "partition": "debug",
        "cores": 4,
        "memory": "8GB",
        "walltime": "02:00:00",
        "job_extra_directives": ["--exclusive"],
        "jobs": 2,
    }
    s = cluster_settings(None, table=table, options=["cores=2", "jobs=3", "wait_timeout=30"])
    assert s.kind == "slurm" and s.address is None
    assert s.slurm == SlurmOptions(
        queue="debug", cores=2, memory="8GB", walltime="02:00:00",
        job_extra_directives=("--exclusive",), jobs=3, wait_timeout=30.0,
    )  # fmt: skip
    # --cluster beats the table's kind; list keys given on the command line collect.
    s = cluster_settings(
        "slurm",
        table={"kind": "local"},
        options=["job_extra_directives=--exclusive", "job-extra-directives=--gres=gpu:1"],
    )
    assert s.kind == "slurm"
    assert s.slurm.job_extra_directives == ("--exclusive", "--gres=gpu:1")
    log_dir = cluster_settings("slurm", options=["log_directory=logs"]).slurm.log_directory
    assert log_dir == str(Path.cwd() / "logs")  # absolute: workers run elsewhere


def test_scheduler_address_and_the_scheduler_alias() -> None:
    assert cluster_settings("tcp://10.0.0.1:8786") == ClusterSettings(
        kind="scheduler", address="tcp://10.0.0.1:8786"
    )
    alias = cluster_settings(None, scheduler="tcp://h:8786")
    assert alias.kind == "scheduler" and alias.address == "tcp://h:8786"
    assert cluster_settings("tcp://h:8786", scheduler="tcp://h:8786").address == "tcp://h:8786"


@pytest.mark.parametrize(
    ("cluster", "table", "options", "scheduler", "fragments"),
    [
        ("slrum", {}, [], None, ["--cluster: expected local, slurm", "did you mean 'slurm'"]),
        ("slurm", {"corse": 2}, [], None, ["[cluster] table: unknown key 'corse'", "'cores'"]),
        ("slurm", {}, ["wall_time=1:00"], None, ["--cluster-option", "did you mean 'walltime'"]),
        ("slurm", {}, ["cores"], None, ["expected KEY=VALUE, got 'cores'"]),
        ("slurm", {}, ["cores=two"], None, ["--cluster-option cores: expected a whole number"]),
        ("slurm", {"cores": 0}, [], None, ["[cluster] table cores: expected a whole number"]),
        ("slurm", {"cores": True}, [], None, ["cores: expected"]),
        ("slurm", {}, ["jobs=-1"], None, ["jobs: expected a whole number"]),
        ("slurm", {}, ["memory=lots"], None, ["memory: expected a size such as 4GB"]),
        ("slurm", {}, ["walltime=1h"], None, ["walltime: expected a SLURM time"]),
        ("slurm", {}, ["wait_timeout=0"], None, ["wait_timeout: expected seconds > 0"]),
        ("slurm", {"job_extra_directives": "exclusive"}, [], None, ["job_extra_directives"]),
        ("slurm", {}, ["processes=2"], None, ["processes: expected a whole number >= 1 and <="]),
        ("slurm", {"queue": "a", "partition": "b"}, [], None, ["partition: expected the same"]),
        ("local", {}, ["cores=2"], None, ["--cluster-option: expected --cluster slurm"]),
        (None, {"kind": "pbs"}, [], None, ["[cluster] table kind: expected local, slurm"]),
        (None, {}, [], "slurm", ["--scheduler: expected tcp://host:port"]),
        ("slurm", {}, [], "tcp://h:1", ["--scheduler: expected the same as --cluster"]),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(
    cluster: str | None,
    table: dict[str, Any],
    options: list[str],
    scheduler: str | None,
    fragments: list[str],
) -> None:
    with pytest.raises(InputError) as info:
        cluster_settings(cluster, table=table, options=options, scheduler=scheduler)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_cli_reads_the_cluster_table_and_refuses_bad_options(tmp_path: Path) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text('[cluster]\nkind = "slurm"\ncores = "many"\n')
    result = invoke("features", "--store", tmp_path / "no.zarr")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "error: [cluster] table cores: expected a whole number >= 1 (CPUs per worker job), "
        "got 'many'"
    ]  # the table is checked whatever --cluster says
    config.write_text('[cluster]\nkind = "slurm"\ncores = 2\n')
    result = invoke("score", tmp_path, "--cluster", "local", "--cluster-option", "cores=2")
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --cluster-option: expected --cluster slurm, got --cluster local")
    )


def test_scheduler_option_and_cluster_address_reach_the_scheduler(tmp_path: Path) -> None:
    """--scheduler (the older spelling) and --cluster tcp:// both run on that scheduler."""
    from distributed import LocalCluster

    store = _ingest(tmp_path, n_train=64, n_test=64)
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        for option in ("--scheduler", "--cluster"):
            result = invoke(
                "features", "--store", store, "--out", tmp_path / f"f{option}", option,
                cluster.scheduler_address,
            )  # fmt: skip
            assert result.exit_code == 0, result.output
            assert f"running on dask cluster {cluster.scheduler_address}" in result.stderr


def test_worker_environment_is_this_checkout_and_this_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PYTHONPATH", "relative/dir")
    lines = worker_environment()
    repo = Path(__file__).resolve().parents[1]
    assert lines[0] == f"export PYTHONPATH={repo}:{tmp_path / 'relative/dir'}"
    assert lines[1] == f"cd {tmp_path}"


# ------------------------------------------------------------------------------- CPUs


def test_usable_cpus_honours_slurm_cpus_per_task(monkeypatch: pytest.MonkeyPatch) -> None:
    mask = len(os.sched_getaffinity(0))
    monkeypatch.setattr("pipeline.cluster.cgroup_cpu_quota", lambda: None)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert usable_cpus() == mask == default_workers()
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert usable_cpus() == 1 == default_workers()
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(mask + 10))  # never more than the mask
    assert usable_cpus() == mask
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "garbage")
    assert usable_cpus() == mask


def test_usable_cpus_honours_the_cgroup_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr("pipeline.cluster.cgroup_cpu_quota", lambda: 0.5)
    assert usable_cpus() == 1 == default_workers()


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({}, None),
    ],
)
def test_cgroup_cpu_quota(tmp_path: Path, files: dict[str, str], expected: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == expected


def test_cgroup_cpu_quota_of_a_nested_cgroup(tmp_path: Path) -> None:
    """The tightest of the process's cgroup and its ancestors counts."""
    leaf = tmp_path / "system.slice/ci.scope"
    leaf.mkdir(parents=True)
    (leaf / "cpu.max").write_text("max 100000\n")
    (leaf.parent / "cpu.max").write_text("200000 100000\n")
    (tmp_path / "cpu.max").write_text("400000 100000\n")
    assert cgroup_cpu_quota(tmp_path, cgroup="/system.slice/ci.scope") == 2.0
    assert cgroup_cpu_quota(tmp_path, cgroup="/") == 4.0
    own = cgroup_cpu_quota()  # this machine's, whatever it is: None or a positive number
    assert own is None or own > 0


# ------------------------------------------------------------------- on a real SLURM


def _ingest(root: Path, *, n_train: int = 300, n_test: int = 100) -> Path:
    raw = root / "raw"
    raw.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        labels[:10] = np.arange(10)
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", separable_images(labels, seed=n),
                  compress=True)  # fmt: skip
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels, compress=True)
    store = root / "mnist.zarr"
    result = invoke("ingest", "--raw-dir", raw, "--out", store, "--chunk-size", "64")
    assert result.exit_code == 0, result.output
    return store


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A store, features (with a HOG family: the numba kernels run on the workers too)
    and a model, all built locally."""
    root = tmp_path_factory.mktemp("cluster-project")
    store = _ingest(root)
    config = root / "features.toml"
    config.write_text(
        '[[features]]\nfamily = "pixels"\nfactor = 2\n\n[[features]]\nfamily = "hog"\n'
    )
    features, model = root / "features", root / "model"
    for args in (
        ["features", "--store", store, "--out", features, "--feature-config", config],
        ["train", "--features", features, "--out", model, "--validation-size", "60"],
    ):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    return {"root": root, "store": store, "config": config, "features": features, "model": model}


@pytest.fixture
def on_slurm(slurm: Slurm, monkeypatch: pytest.MonkeyPatch) -> Iterator[Slurm]:
    """SLURM commands (dask-jobqueue's too) find the test SLURM; no job outlives a test."""
    for name, value in slurm.env().items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)
    yield slurm
    assert_no_jobs(slurm)


def squeue(slurm: Slurm) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i %j %T"], env=slurm.env(), capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    return out.split("\n")[:-1]


def assert_no_jobs(slurm: Slurm, *, within: float = 30.0) -> None:
    """squeue empty (cancelled jobs leave the queue after their processes ended)."""
    deadline = time.monotonic() + within
    while (jobs := squeue(slurm)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if jobs:
        subprocess.run(["scancel", *(j.split()[0] for j in jobs)], env=slurm.env(), check=False)
    assert not jobs, f"stray SLURM jobs: {jobs}"


def parquet_tables(folder: Path) -> dict[str, Any]:
    return {p.name: pq.read_table(p) for p in sorted(folder.glob("*.parquet"))}


def test_features_and_score_on_slurm_match_a_local_run(
    on_slurm: Slurm, project: dict[str, Path], tmp_path: Path
) -> None:
    slurm_args = ["--cluster", "slurm"]
    for option in [*SLURM_OPTIONS, "jobs=2"]:
        slurm_args += ["--cluster-option", option]
    out = tmp_path / "features"
    result = invoke(
        "features", "--store", project["store"], "--out", out,
        "--feature-config", project["config"], *slurm_args,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 dask workers connected" in result.stderr
    assert "running on dask cluster tcp://127.0.0.1:" in result.stderr  # really remote
    assert "cancelled SLURM worker jobs" in result.stderr
    local, remote = parquet_tables(project["features"]), parquet_tables(out)
    assert list(local) == list(remote) and len(local) == 7  # 300 + 100 images, chunks of 64
    for name, table in local.items():
        assert remote[name].equals(table), name
    assert_no_jobs(on_slurm)

    predictions = {}
    one_job = [*slurm_args[:-2], "--cluster-option", "jobs=1"]
    for kind, extra in (("local", []), ("slurm", one_job)):
        pred = tmp_path / f"pred-{kind}.parquet"
        result = invoke(
            "score", project["store"], "--model", project["model"], "--out", pred,
            "--batch-size", "32", *extra,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("score: 100 ok, 0 failed")
        predictions[kind] = pq.read_table(pred).sort_by("image_index")
    assert "1 dask workers connected" in result.stderr
    assert predictions["slurm"].equals(predictions["local"])
    labels = predictions["local"]["prediction"].to_numpy()
    assert len(labels) == 100 and len(set(labels.tolist())) > 1  # not a constant answer


def test_workers_that_never_come_fail_with_one_line_and_no_jobs_left(
    on_slurm: Slurm, project: dict[str, Path], tmp_path: Path
) -> None:
    """3 jobs of 2 cores on a 2-CPU node: one runs, two wait; the job gives up in time."""
    cpus = int(subprocess.run(
        ["sinfo", "-h", "-o", "%c"], env=on_slurm.env(), capture_output=True, text=True,
        check=True,
    ).stdout.split()[0])  # fmt: skip
    out = tmp_path / "features"
    start = time.monotonic()
    result = invoke(
        "features", "--store", project["store"], "--out", out, "--cluster", "slurm",
        "--cluster-option", f"cores={cpus}", "--cluster-option", "jobs=3",
        "--cluster-option", "memory=1GB", "--cluster-option", "wait_timeout=12",
        "--cluster-option", "interface=lo",
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert result.exit_code == 1, result.output
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: --cluster slurm: expected 3 workers within 12 s, got ")
    got = int(error.split(" got ")[1].split(":")[0])
    assert got <= 1
    assert ": check squeue (jobs " in error
    assert "Traceback" not in result.output
    assert elapsed < 60
    assert not out.exists()
    assert_no_jobs(on_slurm)


def test_sbatch_refusing_the_worker_job_is_one_line(on_slurm: Slurm, tmp_path: Path) -> None:
    result = invoke(
        "features", "--store", tmp_path / "s.zarr", "--cluster", "slurm",
        "--cluster-option", "partition=nosuchpartition",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: --cluster slurm: expected sbatch to accept the worker job")
    assert "invalid partition" in lines[0].lower()
    assert_no_jobs(on_slurm)


def test_unknown_interface_is_one_line(on_slurm: Slurm, tmp_path: Path) -> None:
    result = invoke(
        "features", "--store", tmp_path / "s.zarr", "--cluster", "slurm",
        "--cluster-option", "interface=nosuchnic0",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "error: cluster interface: expected a network interface of this machine "
        f"({', '.join(sorted(__import__('psutil').net_if_addrs()))}), got 'nosuchnic0'"
    ]


def test_no_slurm_commands_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch there
    result = invoke("features", "--store", tmp_path / "s.zarr", "--cluster", "slurm")
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [
        "error: --cluster slurm: expected sbatch on PATH, got none"
    ]


def test_the_cluster_table_passes_the_config_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pipeline.toml's [cluster] table is not a job's: its keys are checked against the
    cluster settings (with a did-you-mean), its values where the cluster is opened."""
    from typer.testing import CliRunner

    from jobs.cli import app

    monkeypatch.chdir(tmp_path)
    Path("pipeline.toml").write_text('[cluster]\nkind = "local"\ncores = 2\n')
    assert CliRunner().invoke(app, ["config", "show"]).exit_code == 0
    Path("pipeline.toml").write_text('[cluster]\nkind = "local"\ncorse = 2\n')
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 2
    assert "unknown key corse in [cluster]" in result.stderr and "cores" in result.stderr


def test_importing_dask_jobqueue_leaves_ctrl_c_alone() -> None:
    """dask_jobqueue's import sets SIGINT to sys.exit() (exit code 0 on Ctrl-C)."""
    import signal

    from pipeline.cluster import _import_slurm_cluster

    before = signal.getsignal(signal.SIGINT)
    _import_slurm_cluster()
    assert signal.getsignal(signal.SIGINT) is before
