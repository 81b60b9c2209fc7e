"""Where tasks run (pipeline.parallel): failures of the scheduler and worker processes are one
line and bounded in time, on a real cluster whose scheduler and workers are separate
processes started in another working directory."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dask
import numpy as np
import psutil
import pytest
from conftest import REPO_ROOT
from test_score import digits, make_model, write_pngs
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.errors import ClusterError, InputError
from pipeline.logs import get_logger
from pipeline.parallel import check_scheduler_address, cluster_settings, executor

runner = CliRunner()
log = get_logger("test")


# ------------------------------------------------------------------- address checks


@pytest.mark.parametrize(
    "address",
    ["tcp://127.0.0.1:8786", "tls://scheduler.example.org:8786", "node12:8786", "[::1]:8786",
     "tcp://[::1]:8786", "inproc://10.0.0.1/1234/1", "ucx://10.0.0.1:13337"],
)  # fmt: skip
def test_scheduler_addresses_are_accepted(address: str) -> None:
    assert check_scheduler_address(address) == address


@pytest.mark.parametrize(
    "address",
    ["garbage", "http://host:8786", "tcp://host", "tcp://:8786", "host:0", "host:99999",
     "host:port", "tcp://host:8786/path", "tcp://", "tcp://ho st:8786", ""],
)  # fmt: skip
def test_other_scheduler_addresses_are_refused(address: str) -> None:
    with pytest.raises(InputError) as e:
        check_scheduler_address(address)
    assert str(e.value) == (
        f"--scheduler: expected a dask scheduler address like tcp://host:8786, got {address!r}"
    )


@pytest.fixture(scope="module")
def scoring_input(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder, folder of 2,400 PNGs)."""
    root = tmp_path_factory.mktemp("parallel")
    model = make_model(root / "model")
    write_pngs(root / "in", digits(2400, seed=5), per_folder=200)
    return model, root / "in"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("command", ["score", "features"])
def test_bad_scheduler_address_is_exit_2_at_once(
    tmp_path: Path, scoring_input: tuple[Path, Path], command: str
) -> None:
    model, source = scoring_input
    out = tmp_path / "out"
    args = (
        ["score", source, "--model", model]
        if command == "score"
        else ["features", "--store", tmp_path / "none.zarr"]
    )
    start = time.monotonic()
    result = runner.invoke(app, [str(a) for a in [*args, "--out", out, "--scheduler", "garbage"]])
    assert time.monotonic() - start < 5  # was 40 s of connection attempts
    assert result.exit_code == 2, result.output
    assert error_lines(result.stderr) == [
        "error: --scheduler: expected a dask scheduler address like tcp://host:8786, got 'garbage'"
    ]
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, not even a lock


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_worker_timeout_must_be_positive(
    tmp_path: Path, scoring_input: tuple[Path, Path], value: str
) -> None:
    model, source = scoring_input
    result = runner.invoke(
        app,
        ["score", str(source), "--model", str(model), "--out", str(tmp_path / "p"),
         "--scheduler", "tcp://127.0.0.1:8786", "--worker-timeout", value],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert error_lines(result.stderr) == [
        f"error: --worker-timeout: expected a positive number of seconds, got {float(value)}"
    ]
    with pytest.raises(InputError), cluster_settings(no_worker_timeout=float(value)):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_scheduler_is_one_line_exit_1_within_the_connect_timeout(
    tmp_path: Path, scoring_input: tuple[Path, Path]
) -> None:
    model, source = scoring_input
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    import distributed  # noqa: F401  (its config defaults first: set() would drop them after)

    start = time.monotonic()
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        result = runner.invoke(
            app,
            ["score", str(source), "--model", str(model), "--out", str(tmp_path / "p"),
             "--scheduler", address],
        )  # fmt: skip
    assert time.monotonic() - start < 15
    assert result.exit_code == 1, result.output
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: --scheduler: expected a reachable dask scheduler at {address}")
    assert "Traceback" not in result.output
    assert not (tmp_path / "p").exists()


# ------------------------------------------------------------ a real separate cluster


@dataclass
class Cluster:
    """``dask scheduler`` and ``dask worker`` processes started in their own directory."""

    directory: Path
    env: dict[str, str]
    address: str = ""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, n_workers: int, *worker_args: str) -> Cluster:
        scheduler_file = self.directory / "scheduler.json"
        self.processes.append(self._popen(
            "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
            "--scheduler-file", str(scheduler_file),
        ))  # fmt: skip
        deadline = time.monotonic() + 60
        while not scheduler_file.is_file() or not scheduler_file.read_text().strip():
            assert time.monotonic() < deadline, "the scheduler did not start"
            assert self.processes[0].poll() is None, "the scheduler exited"
            time.sleep(0.1)
        self.address = json.loads(scheduler_file.read_text())["address"]
        for _ in range(n_workers):
            worker = self._popen(
                "worker", self.address, "--nthreads", "1", "--no-dashboard",
                "--local-directory", str(self.directory), *worker_args,
            )  # fmt: skip
            self.processes.append(worker)
            self.workers.append(worker)
        from distributed import Client

        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(n_workers, timeout=60)
        return self

    def _popen(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "dask", *args], cwd=self.directory, env=self.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def kill_workers(self) -> None:
        """SIGKILL every worker process and its nanny (which would restart it)."""
        kill_trees(self.workers)

    def stop(self) -> None:
        kill_trees(self.processes)


def kill_trees(popens: list[subprocess.Popen[bytes]]) -> None:
    procs: list[psutil.Process] = []
    for p in popens:
        with contextlib.suppress(psutil.NoSuchProcess):
            top = psutil.Process(p.pid)
            procs += [top, *top.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    for p in popens:
        p.wait()
    psutil.wait_procs(procs, timeout=10)


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Factory: ``make_cluster(n_workers, *worker_args, env={...})`` starts a cluster whose
    processes run in tmp_path/elsewhere (not the job's directory) with this checkout's code."""
    clusters: list[Cluster] = []

    def make(n_workers: int, *worker_args: str, env: dict[str, str] | None = None) -> Cluster:
        directory = tmp_path / f"elsewhere{len(clusters)}"
        directory.mkdir()
        full_env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env or {}))
        cluster = Cluster(directory, full_env)
        clusters.append(cluster)
        return cluster.start(n_workers, *worker_args)

    yield make
    for cluster in clusters:
        cluster.stop()


@pytest.mark.distributed
def test_all_workers_gone_fails_within_the_worker_timeout(
    tmp_path: Path, scoring_input: tuple[Path, Path], make_cluster: Callable[..., Cluster]
) -> None:
    """Today the job waited forever with no log line once every worker was gone."""
    model, source = scoring_input
    cluster = make_cluster(2)
    out = tmp_path / "p.parquet"
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs", "score", str(source), "--model", str(model),
         "--out", str(out), "--batch-size", "4", "--scheduler", cluster.address,
         "--worker-timeout", "2"],
        cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        partial = tmp_path / ".p.parquet.partial"
        deadline = time.monotonic() + 60
        while not list(partial.glob("part-*.parquet")):  # the workers are scoring
            assert job.poll() is None, job.communicate()
            assert time.monotonic() < deadline, "no part written"
            time.sleep(0.02)
        cluster.kill_workers()
        assert job.poll() is None, "the job finished before its workers were killed"
        killed = time.monotonic()
        stdout, stderr = job.communicate(timeout=30)
        elapsed = time.monotonic() - killed
    finally:
        with contextlib.suppress(ProcessLookupError):
            job.kill()
        job.wait()
    text = stderr.decode()
    assert job.returncode == 1, text
    assert elapsed < 2 + 10, elapsed  # the timeout, the scheduler noticing, a poll
    assert error_lines(text) == [
        f"error: expected workers on the dask cluster {cluster.address}, got none for 2 s "
        "(raise --worker-timeout to wait longer)"
    ], text
    assert "has no workers; failing in 2 s" in text  # said while waiting
    assert "Traceback" not in text
    assert stdout == b""
    assert not out.exists()


@pytest.mark.distributed
def test_worker_killed_for_memory_is_one_line(make_cluster: Callable[..., Cluster]) -> None:
    """The nanny kills a worker whose task passes its memory limit; the scheduler gives up
    on the task (allowed-failures 0 here, 3 by default): one line, not 60 of traceback."""
    cluster = make_cluster(
        1, "--memory-limit", "300MB", env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    )
    with (
        pytest.raises(ClusterError) as e,
        executor(logger=log, scheduler=cluster.address) as (run, _),
    ):
        run([dask.delayed(np.ones, pure=False)(2**28)], [1], lambda n: None)  # 2 GiB
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("dask task ")
    assert ": expected a worker to finish it, got 1 worker killed while running it" in message
    assert message.endswith("(out of memory? see the worker logs)")


@pytest.mark.distributed
def test_scheduler_gone_mid_run_is_one_line(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(1)
    tasks = [dask.delayed(time.sleep, pure=False)(5) for _ in range(2)]
    killer = threading.Timer(1.0, kill_trees, args=(cluster.processes[:1],))  # the scheduler
    start = time.monotonic()
    with (
        pytest.raises(ClusterError) as e,
        executor(logger=log, scheduler=cluster.address, no_worker_timeout=30) as (run, _),
    ):
        killer.start()
        run(tasks, [1, 1], lambda n: None)
    killer.join()
    assert time.monotonic() - start < 4
    assert str(e.value).startswith(
        f"expected the dask scheduler at {cluster.address} to stay reachable, got "
    )
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_a_task_out_of_memory_is_one_line(processes: bool) -> None:
    """numpy refusing an allocation the machine cannot give (1 PiB) inside a task."""
    with (
        pytest.raises(ClusterError) as e,
        executor(logger=log, workers=2, processes=processes) as (run, _),
    ):
        run([dask.delayed(np.empty, pure=False)(2**50, np.uint8)], [1], lambda n: None)
    message = str(e.value)
    assert message.startswith("expected the tasks to fit in memory, got MemoryError: Unable")
    assert "\n" not in message
