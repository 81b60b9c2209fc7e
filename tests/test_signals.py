"""A folder ``score`` job and its worker processes under real signals: ``kill -9`` leaves no
process behind and no pipe open, SIGTERM is exit 143 with one line, Ctrl-C exit 130."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO_ROOT
from test_score import digits, make_model, write_pngs

N_IMAGES = 2400
# Tracker, forkserver and two workers: the job is scoring in worker processes.
DESCENDANTS = 4


@pytest.fixture(scope="module")
def folder_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder, folder of PNGs) large enough that scoring takes a few seconds."""
    root = tmp_path_factory.mktemp("signals")
    model = make_model(root / "model")
    write_pngs(root / "in", digits(N_IMAGES, seed=3), per_folder=200)
    return model, root / "in"


class Job:
    """A real ``python -m jobs score <folder>`` with 2 worker processes, its own process
    group (as under a shell or a batch scheduler), stdout and stderr on pipes."""

    def __init__(self, model: Path, source: Path, out: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))  # this checkout's code
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jobs", "score", str(source), "--model", str(model),
             "--out", str(out), "--batch-size", "8", "--workers", "2"],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        self.stdout = b""
        self.stderr = b""
        self.seen: list[psutil.Process] = []  # descendants, killed by kill() if still there
        self.eof = {"stdout": threading.Event(), "stderr": threading.Event()}
        for name in self.eof:
            threading.Thread(target=self._drain, args=(name,), daemon=True).start()

    def _drain(self, name: str) -> None:
        pipe = getattr(self.proc, name)
        while chunk := pipe.read1(65536):
            setattr(self, name, getattr(self, name) + chunk)
        self.eof[name].set()

    def descendants_when_scoring(self, timeout: float = 60) -> list[psutil.Process]:
        """The job's descendants once its worker processes run and it is scoring."""
        return self.descendants(DESCENDANTS, timeout=timeout)

    def descendants(self, at_least: int, *, timeout: float = 60) -> list[psutil.Process]:
        """The job's descendants once it has ``at_least`` of them and is building."""
        job = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"the job ended early: {self.stderr.decode()}"
            assert time.monotonic() < deadline, "the worker processes did not start"
            kids = job.children(recursive=True)
            if len(kids) >= at_least and b"building" in self.stderr:
                self.seen = kids
                return kids
            time.sleep(0.005)

    def wait_eof(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in self.eof.values())

    def kill(self) -> None:
        """Kill whatever is left (cleanup of a failed test)."""
        try:
            job = psutil.Process(self.proc.pid)
            procs = [job, *job.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs + self.seen:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self.proc.wait()


def alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def survivors(procs: list[psutil.Process], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in procs if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [" ".join(p.cmdline())[:120] for p in left if alive(p)]


def test_kill_9_leaves_no_process_and_closes_the_pipes(
    tmp_path: Path, folder_job: tuple[Path, Path]
) -> None:
    job = Job(*folder_job, tmp_path / "p.parquet")
    try:
        procs = job.descendants_when_scoring()
        os.kill(job.proc.pid, signal.SIGKILL)
        assert job.proc.wait(timeout=10) == -signal.SIGKILL
        # A wrapper reading the job's output (cron, SLURM, CI) sees the end of it.
        assert job.wait_eof(timeout=5), "stdout/stderr still held open after kill -9"
        assert survivors(procs, timeout=5) == []
        pgid = job.proc.pid  # start_new_session: the job led its own process group
        assert [p.pid for p in psutil.process_iter() if alive(p) and _pgid(p) == pgid] == []
    finally:
        job.kill()


def _pgid(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except OSError:
        return None


@pytest.mark.parametrize(
    ("target", "signum", "code", "message"),
    [
        ("group", signal.SIGTERM, 143, "terminated (SIGTERM)"),
        ("group", signal.SIGTERM, 143, "terminated (SIGTERM)"),
        ("group", signal.SIGTERM, 143, "terminated (SIGTERM)"),
        ("job", signal.SIGTERM, 143, "terminated (SIGTERM)"),
        ("group", signal.SIGINT, 130, "interrupted"),  # Ctrl-C in a terminal
    ],
    ids=["term-group-1", "term-group-2", "term-group-3", "term-job-only", "ctrl-c"],
)
def test_signal_is_one_line_and_its_exit_code(
    tmp_path: Path,
    folder_job: tuple[Path, Path],
    target: str,
    signum: signal.Signals,
    code: int,
    message: str,
) -> None:
    """SIGTERM (scancel, supervisors; to the whole group, as SLURM does, or to the job
    alone) and Ctrl-C: the job's one line, its exit code, no worker traceback, and no
    process left."""
    out = tmp_path / "p.parquet"
    job = Job(*folder_job, out)
    try:
        procs = job.descendants_when_scoring()
        time.sleep(0.3)  # tasks in flight in both workers
        if target == "group":
            os.killpg(job.proc.pid, signum)
        else:
            os.kill(job.proc.pid, signum)
        assert job.proc.wait(timeout=20) == code, job.stderr.decode()
        assert job.wait_eof(timeout=5)
        stderr = job.stderr.decode()
        assert "Traceback" not in stderr, stderr
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert errors == [
            f"error: {message}; finished batches are kept in {tmp_path / '.p.parquet.partial'}; "
            "run again with --resume to continue"
        ], stderr
        assert stderr.rstrip().endswith("--resume to continue"), stderr  # nothing after it
        assert job.stdout == b""
        assert not out.exists()
        assert survivors(procs, timeout=5) == []
    finally:
        job.kill()


def test_a_worker_killed_is_one_line_exit_1(tmp_path: Path, folder_job: tuple[Path, Path]) -> None:
    """A worker process killed on its own (the kernel's OOM killer, an operator): the job
    fails with one line, not a BrokenProcessPool traceback, and stops the other workers."""
    job = Job(*folder_job, tmp_path / "p.parquet")
    try:
        procs = job.descendants_when_scoring()
        workers = [p for p in procs if p.ppid() != job.proc.pid]  # the forkserver's children
        assert len(workers) == 2
        workers[0].kill()
        assert job.proc.wait(timeout=20) == 1, job.stderr.decode()
        assert job.wait_eof(timeout=5)
        stderr = job.stderr.decode()
        assert "Traceback" not in stderr, stderr
        assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
            "error: expected the local worker processes to finish their tasks, got one killed "
            "(out of memory? see the system log)"
        ], stderr
        assert survivors(procs, timeout=5) == []
    finally:
        job.kill()


def test_sigterm_outside_a_stage_is_143_with_one_line() -> None:
    """Any job (here between the start of its block and a stage): job() turns SIGTERM into
    exit 143 and one line, where the default action would end it without a word."""
    script = (
        "import os, signal, sys, time, typer\n"
        "from jobs.app import job\n"
        "try:\n"
        "    with job('human', 'INFO'):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(30)\n"
        "except typer.Exit as e:\n"
        "    sys.exit(e.exit_code)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 143, done.stderr
    assert done.stderr == "error: terminated (SIGTERM); no partial output was kept\n"


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_sigterm_while_the_workers_start(
    tmp_path: Path, folder_job: tuple[Path, Path], delay: float
) -> None:
    """SIGTERM to the job alone while its pool starts the workers (resource tracker and
    forkserver up, workers not yet): a half-started worker printed a traceback after the
    job's line (6 of 6 runs before the pool started its workers with signals held back)."""
    job = Job(*folder_job, tmp_path / "p.parquet")
    try:
        job.descendants(2)
        time.sleep(delay)
        os.kill(job.proc.pid, signal.SIGTERM)
        assert job.proc.wait(timeout=20) == 143, job.stderr.decode()
        assert job.wait_eof(timeout=5)
        stderr = job.stderr.decode()
        assert "Traceback" not in stderr, stderr
        assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
            "error: terminated (SIGTERM); finished batches are kept in "
            f"{tmp_path / '.p.parquet.partial'}; run again with --resume to continue"
        ], stderr
        assert survivors(job.seen, timeout=5) == []
    finally:
        job.kill()


def test_ctrl_c_is_exit_130_not_death_by_sigint(tmp_path: Path) -> None:
    """A KeyboardInterrupt that left code run by exec() of a string (some library's, at the
    moment Ctrl-C came) made ``python -m`` end by SIGINT after the job had handled it."""
    (tmp_path / "interrupted_job.py").write_text(
        "from jobs.app import job\n"
        "import typer\n"
        "try:\n"
        "    with job('human', 'INFO'):\n"
        "        exec('raise KeyboardInterrupt')\n"
        "except typer.Exit as e:\n"
        "    raise SystemExit(e.exit_code)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(tmp_path)]))
    done = subprocess.run(
        [sys.executable, "-m", "interrupted_job"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 130, done.stderr
    assert done.stderr == "error: interrupted; no partial output was kept\n"
