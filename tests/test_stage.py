"""The stage runner: atomic outputs, manifests, up-to-date checks, failures and locking."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT

from pipeline import __version__
from pipeline.errors import InputError, LockError
from pipeline.fingerprint import sha256_file, stat_fingerprint
from pipeline.stage import (
    StageResult,
    manifest_path,
    output_lock,
    read_manifest,
    run_stage,
    signals_deferred,
    temp_path,
)


class Builder:
    """A build function that records its calls and writes ``content`` to the path it gets."""

    def __init__(self, content: str = "built", *, folder: bool = False) -> None:
        self.content = content
        self.folder = folder
        self.calls: list[Path] = []
        self.output: Path | None = None  # set by the test: the final output path
        self.seen_final_during_build: list[bool] = []

    def __call__(self, path: Path) -> Mapping[str, Any]:
        self.calls.append(path)
        if self.output is not None:
            self.seen_final_during_build.append(self.output.exists())
        if self.folder:
            path.mkdir()
            (path / "a.txt").write_text(self.content)
            (path / "sub").mkdir()
            (path / "sub" / "b.txt").write_text(self.content * 2)
        else:
            path.write_text(self.content)
        return {"n": len(self.calls), "where": path}


def fail_if_called(path: Path) -> None:
    raise AssertionError(f"build must not run, got called with {path}")


@pytest.fixture
def inp(tmp_path: Path) -> Path:
    path = tmp_path / "input.txt"
    path.write_text("input v1")
    return path


def run(out: Path, inp: Path, build: Callable[[Path], Any], **kw: Any) -> StageResult:
    params = kw.pop("params", {"k": 1, "path": Path("/x"), "tup": (1, 2)})
    return run_stage("demo", output=out, inputs={"source": inp}, params=params, build=build, **kw)


def hidden_leftovers(folder: Path) -> list[str]:
    """Temporary or old outputs and manifest temp files (the lock file is expected)."""
    return sorted(
        p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")
    )


# ----------------------------------------------------------------------------- atomic output


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_build_writes_to_temp_path_then_renames(tmp_path: Path, inp: Path, folder: bool) -> None:
    out = tmp_path / "out" / ("result" if folder else "result.txt")
    build = Builder(folder=folder)
    build.output = out
    result = run(out, inp, build)
    assert build.calls == [temp_path(out)]
    assert temp_path(out).name == f".{out.name}.partial"
    assert temp_path(out).parent == out.parent
    assert build.seen_final_during_build == [False]
    assert not result.skipped
    assert out.exists() and not temp_path(out).exists()
    if folder:
        assert (out / "a.txt").read_text() == "built"
        assert (out / "sub" / "b.txt").read_text() == "builtbuilt"
    else:
        assert out.read_text() == "built"
    assert hidden_leftovers(out.parent) == []


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_rebuild_replaces_existing_output(tmp_path: Path, inp: Path, folder: bool) -> None:
    out = tmp_path / "result"
    run(out, inp, Builder("one", folder=folder))
    build = Builder("two", folder=folder)
    build.output = out
    run(out, inp, build, force=True)
    assert build.seen_final_during_build == [True]  # the old one stays until the swap
    assert (out / "a.txt" if folder else out).read_text() == "two"
    assert hidden_leftovers(tmp_path) == []


def test_non_atomic_build_gets_the_output_itself(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "result.txt"
    build = Builder()
    result = run(out, inp, build, atomic=False)
    assert build.calls == [out]
    assert result.manifest["status"] == "complete"


# ----------------------------------------------------------------------------- manifest


def test_manifest_content(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "result.txt"
    t0 = time.time()
    result = run(out, inp, Builder())
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest_path(out) == tmp_path / "result.txt.manifest.json"
    assert manifest == result.manifest == read_manifest(out)
    assert manifest["stage"] == "demo"
    assert manifest["status"] == "complete"
    assert manifest["pipeline_version"] == __version__
    assert manifest["inputs"] == {
        "source": {"path": str(inp), "sha256": sha256_file(inp), "bytes": len("input v1")}
    }
    assert manifest["params"] == {"k": 1, "path": "/x", "tup": [1, 2]}
    assert manifest["output"] == {
        "path": str(out),
        "bytes": len("built"),
        "fingerprint": stat_fingerprint(out),
    }
    assert manifest["result"] == {"n": 1, "where": str(temp_path(out))}
    assert result.result == manifest["result"]
    versions = manifest["versions"]
    assert versions["mnist-pipeline"] == __version__
    assert versions["python"] == platform.python_version()
    import numpy
    import zarr

    assert versions["numpy"] == numpy.__version__
    assert versions["zarr"] == zarr.__version__
    run_info = manifest["run"]
    assert isinstance(run_info["wall_seconds"], float)
    assert 0 <= run_info["wall_seconds"] < time.time() - t0 + 1
    assert isinstance(run_info["peak_rss_mb"], float) and run_info["peak_rss_mb"] > 10
    assert run_info["host"] == socket.gethostname()
    assert run_info["pid"] == os.getpid()
    assert run_info["started"] <= run_info["finished"]
    assert "T" in run_info["started"]


def test_folder_input_is_fingerprinted_by_content(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x").write_text("x")
    out = tmp_path / "result.txt"
    run(out, folder, Builder())
    assert run(out, folder, fail_if_called).skipped
    (folder / "sub" / "x").write_text("y")
    assert not run(out, folder, Builder()).skipped


# ----------------------------------------------------------------------------- up to date


def test_up_to_date_output_is_not_built_again(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "result.txt"
    first = run(out, inp, Builder())
    mtime = out.stat().st_mtime_ns
    second = run(out, inp, fail_if_called)
    assert second.skipped
    assert second.manifest == first.manifest
    assert second.result == {"n": 1, "where": str(temp_path(out))}
    assert out.stat().st_mtime_ns == mtime


def test_rebuild_when_input_content_changes(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "result.txt"
    run(out, inp, Builder())
    st = inp.stat()
    inp.write_text("input v2")  # same size ...
    os.utime(inp, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... same mtime: only content differs
    build = Builder("rebuilt")
    result = run(out, inp, build)
    assert not result.skipped and len(build.calls) == 1
    assert out.read_text() == "rebuilt"
    assert result.manifest["inputs"]["source"]["sha256"] == sha256_file(inp)
    assert run(out, inp, fail_if_called).skipped


def test_rebuild_when_params_change(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "result.txt"
    run(out, inp, Builder(), params={"k": 1})
    assert run(out, inp, fail_if_called, params={"k": 1}).skipped
    build = Builder()
    assert not run(out, inp, build, params={"k": 2}).skipped
    assert len(build.calls) == 1
    assert not run(out, inp, Builder(), params={"k": 2, "extra": None}).skipped


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_rebuild_when_output_was_modified(tmp_path: Path, inp: Path, folder: bool) -> None:
    out = tmp_path / "result"
    run(out, inp, Builder(folder=folder))
    if folder:
        (out / "sub" / "extra.txt").write_text("tampered")
    else:
        out.write_text("tampered!")
    build = Builder("fresh", folder=folder)
    assert not run(out, inp, build).skipped
    assert len(build.calls) == 1
    assert (out / "a.txt" if folder else out).read_text() == "fresh"
    if folder:
        assert not (out / "sub" / "extra.txt").exists()


def test_rebuild_when_output_is_missing(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "result.txt"
    run(out, inp, Builder())
    out.unlink()
    assert not run(out, inp, Builder()).skipped
    assert out.read_text() == "built"


@pytest.mark.parametrize("manifest", [None, "{not json", '{"stage": "other"}'])
def test_an_output_without_its_manifest_is_never_replaced(
    tmp_path: Path, inp: Path, manifest: str | None
) -> None:
    # Without a manifest of the same stage beside it, nothing proves the pipeline wrote
    # the file: it may be the user's (force does not change that).
    out = tmp_path / "result.txt"
    run(out, inp, Builder())
    out.write_text("the user's own notes")
    if manifest is None:
        manifest_path(out).unlink()
    else:
        manifest_path(out).write_text(manifest)
    for force in (False, True):
        with pytest.raises(InputError, match="refusing to replace it"):
            run(out, inp, Builder(), force=force)
    assert out.read_text() == "the user's own notes"


def test_rebuild_when_manifest_is_from_another_pipeline_version(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "result.txt"
    run(out, inp, Builder())
    manifest = read_manifest(out)
    assert manifest is not None
    manifest["pipeline_version"] = "0.0.0-old"
    manifest_path(out).write_text(json.dumps(manifest))
    assert not run(out, inp, Builder()).skipped


def test_force_rebuilds(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "result.txt"
    run(out, inp, Builder())
    build = Builder("forced")
    assert not run(out, inp, build, force=True).skipped
    assert len(build.calls) == 1 and out.read_text() == "forced"
    assert run(out, inp, fail_if_called).skipped


# ----------------------------------------------------------------------------- failures


class BuildFailedError(RuntimeError):
    pass


def failing_build(partial_folder: bool) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        if partial_folder:
            path.mkdir()
            (path / "half.bin").write_bytes(b"\0" * 1000)
        else:
            path.write_text("half")
        raise BuildFailedError("build failed")

    return build


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_failed_build_leaves_nothing(tmp_path: Path, inp: Path, folder: bool) -> None:
    out = tmp_path / "result"
    with pytest.raises(BuildFailedError):
        run(out, inp, failing_build(folder))
    assert not out.exists()
    assert not temp_path(out).exists()
    assert not manifest_path(out).exists()
    assert hidden_leftovers(tmp_path) == []


def test_interrupted_build_leaves_nothing(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "result"

    def interrupted(path: Path) -> None:
        path.mkdir()
        (path / "x").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(out, inp, interrupted)
    assert not out.exists() and not temp_path(out).exists()
    assert not manifest_path(out).exists()


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_failed_rebuild_keeps_the_old_output(tmp_path: Path, inp: Path, folder: bool) -> None:
    out = tmp_path / "result"
    run(out, inp, Builder("old", folder=folder), params={"v": 1})
    old_manifest = manifest_path(out).read_text()
    old_fingerprint = stat_fingerprint(out)
    with pytest.raises(BuildFailedError):
        run(out, inp, failing_build(folder), params={"v": 2})
    assert (out / "a.txt" if folder else out).read_text() == "old"
    assert stat_fingerprint(out) == old_fingerprint
    assert manifest_path(out).read_text() == old_manifest
    assert not temp_path(out).exists()
    # the old output is still up to date for the old parameters
    assert run(out, inp, fail_if_called, params={"v": 1}).skipped


def test_stale_temp_from_a_killed_run_is_discarded(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "result"
    stale = temp_path(out)
    stale.mkdir()
    (stale / "junk").write_text("from a killed run")
    run(out, inp, Builder(folder=True))
    assert sorted(p.name for p in out.rglob("*")) == ["a.txt", "b.txt", "sub"]
    assert not stale.exists()


def test_resume_keeps_the_temp_output(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "result"
    with pytest.raises(BuildFailedError):
        run(out, inp, failing_build(True), resume=True)
    assert (temp_path(out) / "half.bin").exists()
    seen: list[bool] = []

    def continue_build(path: Path) -> None:
        seen.append((path / "half.bin").exists())
        (path / "rest.bin").write_bytes(b"1")

    run(out, inp, continue_build, resume=True)
    assert seen == [True]
    assert sorted(p.name for p in out.iterdir()) == ["half.bin", "rest.bin"]


def test_missing_input(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "result.txt"
    with pytest.raises(InputError, match=r"demo: expected source at .*nope, got no such file"):
        run(out, tmp_path / "nope", fail_if_called)
    assert not out.parent.exists()
    assert InputError.exit_code == 2


# ----------------------------------------------------------------------------- locking


def test_lock_held_fails_without_waiting(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "result.txt"
    with output_lock(out, timeout=0):
        t0 = time.monotonic()
        for _ in range(2):  # a failed attempt must not erase who holds the lock
            with pytest.raises(LockError, match=rf"held by pid {os.getpid()} on ") as info:
                run(out, inp, fail_if_called, lock_timeout=0)
            assert "expected to get the lock within 0 s" in str(info.value)
        assert time.monotonic() - t0 < 2
    assert not out.exists() and not manifest_path(out).exists()
    assert not run(out, inp, Builder(), lock_timeout=0).skipped


def test_lock_held_by_another_process(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "result.txt"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from pathlib import Path
                from pipeline.stage import output_lock
                with output_lock(Path({str(out)!r}), timeout=0):
                    print("locked", flush=True)
                    sys.stdin.readline()
                """
            ),
        ],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockError, match=rf"held by pid {holder.pid} "):
            run(out, inp, fail_if_called, lock_timeout=0.3)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(10) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert not run(out, inp, Builder(), lock_timeout=0).skipped


def test_lock_waits_for_the_holder_to_release(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "result.txt"
    locked = threading.Event()

    def hold() -> None:
        with output_lock(out, timeout=0):
            locked.set()
            time.sleep(0.6)

    thread = threading.Thread(target=hold)
    thread.start()
    assert locked.wait(5)
    t0 = time.monotonic()
    build = Builder()
    result = run(out, inp, build, lock_timeout=10)
    waited = time.monotonic() - t0
    thread.join()
    assert not result.skipped and len(build.calls) == 1
    assert 0.3 < waited < 5


def test_lock_timeout_expires(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "result.txt"
    with output_lock(out, timeout=0):
        t0 = time.monotonic()
        with pytest.raises(LockError, match=r"within 0\.5 s"):
            run(out, inp, fail_if_called, lock_timeout=0.5)
        assert 0.4 < time.monotonic() - t0 < 3


def test_different_outputs_do_not_share_a_lock(tmp_path: Path, inp: Path) -> None:
    with output_lock(tmp_path / "a.txt", timeout=0):
        assert not run(tmp_path / "b.txt", inp, Builder(), lock_timeout=0).skipped


def test_stale_old_output_from_a_crashed_swap_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stale = tmp_path / ".out.old-12345"
    stale.mkdir()
    (stale / "x").write_text("left by a crash between the two renames")
    run_stage("t", output=out, inputs={}, params={}, build=lambda p: p.mkdir() or None)
    assert out.is_dir() and not stale.exists()


def test_signals_deferred_hold_ctrl_c_until_the_write_is_done() -> None:
    import signal

    steps = []
    with pytest.raises(KeyboardInterrupt), signals_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler has run by now: it only recorded the signal
        steps.append("write finished")
    assert steps == ["write finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
