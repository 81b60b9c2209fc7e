"""The Typer command line: help, exit codes, error messages, logging, settings precedence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from conftest import MNIST_NAMES, REPO_ROOT, SyntheticDataset
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.idx import read_idx
from pipeline.stage import manifest_path, output_lock, read_manifest, temp_path
from pipeline.store import open_store, split_arrays

runner = CliRunner()
WIDE = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty folder (no ./pipeline.toml, relative defaults land in tmp) and without
    settings inherited from the caller's environment."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("MNIST_PIPELINE") or name == "MNIST_SOURCE":
            monkeypatch.delenv(name)


def invoke(*args: Any, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, [str(a) for a in args], env=env)


def ingest_args(ds: SyntheticDataset, out: Path, *extra: Any) -> list[Any]:
    return ["ingest", "--raw-dir", ds.raw_dir, "--out", out, "--lock-timeout", "0", *extra]


def error_lines(result: Any) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_clean_error(result: Any, code: int, *fragments: str) -> str:
    """Exit ``code``, exactly one 'error: ...' line on stderr, which is the last one, and no
    traceback anywhere."""
    assert result.exit_code == code, (result.exit_code, result.output)
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def all_commands() -> list[tuple[list[str], Any]]:
    """(argv prefix, click command) of every leaf command of the application."""
    root = typer.main.get_command(app)
    ctx = root.make_context("mnist-pipeline", [], resilient_parsing=True)
    out: list[tuple[list[str], Any]] = []

    def walk(prefix: list[str], group: Any) -> None:
        for name in group.list_commands(ctx):
            cmd = group.get_command(ctx, name)
            if hasattr(cmd, "list_commands"):
                walk([*prefix, name], cmd)
            else:
                out.append(([*prefix, name], cmd))

    walk([], root)
    return out


# ----------------------------------------------------------------------------- help


def test_root_help() -> None:
    result = invoke("--help", env=WIDE)
    assert result.exit_code == 0
    for name in ("fetch", "ingest", "config", "--config"):
        assert name in result.output
    assert invoke("-h", env=WIDE).output == result.output
    no_args = invoke(env=WIDE)  # no_args_is_help
    assert "Usage" in no_args.output and "ingest" in no_args.output


def test_every_command_help_mentions_every_option() -> None:
    commands = all_commands()
    names = {" ".join(argv) for argv, _ in commands}
    assert {"fetch", "ingest", "config show"} <= names
    for argv, cmd in commands:
        result = invoke(*argv, "--help", env=WIDE)
        assert result.exit_code == 0, (argv, result.output)
        assert "Usage" in result.output
        options = [p for p in cmd.params if p.param_type_name == "option"]
        for param in options:
            for opt in [*param.opts, *param.secondary_opts]:
                assert opt in result.output, f"{' '.join(argv)} --help does not mention {opt}"


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        ("fetch", ["--dest", "--source", "--timeout"]),
        (
            "ingest",
            ["--raw-dir", "--out", "--train-images", "--train-labels", "--test-images",
             "--test-labels", "--chunk-size", "--dataset", "--num-classes"],
        ),
    ],
)  # fmt: skip
def test_job_help_lists_its_own_and_shared_options(job: str, expected: list[str]) -> None:
    result = invoke(job, "--help", env=WIDE)
    assert result.exit_code == 0
    shared = ["--force", "--lock-timeout", "--log-format", "--log-level", "--help"]
    for opt in [*expected, *shared]:
        assert opt in result.output, opt


def test_console_script_help_in_a_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "jobs", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout and "ingest" in proc.stdout and "fetch" in proc.stdout


# ----------------------------------------------------------------------------- errors


def test_fetch_from_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke("fetch", "--source", tmp_path / "no-such-folder", "--dest", tmp_path / "raw")
    assert_clean_error(result, 2, "--source: expected a folder", "no-such-folder")
    assert not (tmp_path / "raw").exists()


def test_fetch_unreachable_source_is_a_run_failure(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = invoke(
        "fetch", "--source", f"http://127.0.0.1:{port}/", "--dest", tmp_path / "raw",
        "--timeout", "5", env={"no_proxy": "*"},
    )  # fmt: skip
    assert_clean_error(result, 1, "train-images-idx3-ubyte", "expected it from 1 source(s)")
    assert list((tmp_path / "raw").glob("*.gz")) == []


def test_ingest_missing_inputs(tmp_path: Path) -> None:
    out = tmp_path / "mnist.zarr"
    result = invoke("ingest", "--raw-dir", tmp_path / "nothing", "--out", out)
    assert_clean_error(result, 2, "expected train_images at", "no such file")
    assert not out.exists() and not manifest_path(out).exists()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (b"\x01\x02\x08\x03" + b"\x00" * 100, "expected idx magic"),
        (b"\x00\x00\x08", "truncated"),
        (b"\x1f\x8b not gzip", "expected a valid gzip stream"),
    ],
    ids=["magic", "truncated", "gzip"],
)
def test_ingest_corrupt_idx(
    tmp_path: Path, dataset: SyntheticDataset, corrupt: bytes, message: str
) -> None:
    bad = dataset.paths[("test", "images")]
    bad.write_bytes(corrupt)
    out = tmp_path / "mnist.zarr"
    result = invoke(*ingest_args(dataset, out))
    line = assert_clean_error(result, 2, message, str(bad))
    assert "expected" in line
    assert not out.exists() and not temp_path(out).exists() and not manifest_path(out).exists()


def test_ingest_label_mismatch_is_exit_2(tmp_path: Path, dataset: SyntheticDataset) -> None:
    dataset.paths[("train", "labels")].write_bytes(dataset.paths[("test", "labels")].read_bytes())
    out = tmp_path / "mnist.zarr"
    result = invoke(*ingest_args(dataset, out))
    assert_clean_error(result, 2, "expected as many labels as images")
    assert not out.exists()


def test_ingest_while_locked_is_exit_1(tmp_path: Path, dataset: SyntheticDataset) -> None:
    out = tmp_path / "mnist.zarr"
    with output_lock(out, timeout=0):
        result = invoke(*ingest_args(dataset, out))
    assert_clean_error(result, 1, "expected to get the lock within 0 s", f"pid {os.getpid()}")
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["ingest", "--chunk-size", "0"],
        ["ingest", "--num-classes", "1"],
        ["ingest", "--lock-timeout", "-1"],
        ["ingest", "--log-format", "xml"],
        ["ingest", "--no-such-option"],
        ["fetch", "--timeout", "0"],
        ["no-such-job"],
    ],
)
def test_bad_usage_is_exit_2(tmp_path: Path, args: list[str]) -> None:
    result = invoke(*args, "--out" if args[0] == "ingest" else "--dest", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- success paths


def test_ingest_then_up_to_date_then_force(tmp_path: Path, dataset: SyntheticDataset) -> None:
    out = tmp_path / "mnist.zarr"
    first = invoke(*ingest_args(dataset, out))
    assert first.exit_code == 0, first.output
    assert first.stdout == f"ingest: {out} written (train 50, test 20)\n"
    root = open_store(out)
    np.testing.assert_array_equal(split_arrays(root, "train")[0][:], dataset.images("train"))
    inode = out.stat().st_ino
    started = read_manifest(out)

    second = invoke(*ingest_args(dataset, out))
    assert second.exit_code == 0, second.output
    assert "up to date" in second.stdout
    assert "up to date" in second.stderr  # the log line explains why nothing was done
    assert out.stat().st_ino == inode
    assert read_manifest(out) == started

    forced = invoke(*ingest_args(dataset, out, "--force"))
    assert forced.exit_code == 0, forced.output
    assert "written" in forced.stdout and "up to date" not in forced.stdout
    assert out.stat().st_ino != inode  # a new store was swapped into place
    np.testing.assert_array_equal(
        split_arrays(open_store(out), "test")[1][:], dataset.labels("test")
    )


def test_ingest_individual_file_options(tmp_path: Path, dataset_12x17: SyntheticDataset) -> None:
    ds = dataset_12x17
    out = tmp_path / "small.zarr"
    result = invoke(
        "ingest", "--raw-dir", tmp_path / "elsewhere", "--out", out, "--lock-timeout", "0",
        "--train-images", ds.paths[("train", "images")],
        "--train-labels", ds.paths[("train", "labels")],
        "--test-images", ds.paths[("test", "images")],
        "--test-labels", ds.paths[("test", "labels")],
        "--dataset", "tiny", "--num-classes", "10",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    root = open_store(out)
    assert root.attrs["dataset"] == "tiny" and root.attrs["image_shape"] == [12, 17]


def test_log_format_json(tmp_path: Path, dataset: SyntheticDataset) -> None:
    out = tmp_path / "mnist.zarr"
    result = invoke(*ingest_args(dataset, out, "--log-format", "json"))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) >= 3
    records = [json.loads(line) for line in lines]  # every stderr line is one JSON object
    for record in records:
        assert {"ts", "level", "stage", "msg"} <= set(record)
        assert record["level"] in {"debug", "info", "warning", "error"}
    assert any(r["stage"] == "ingest" and r["msg"].startswith("wrote ") for r in records)
    wrote = next(r for r in records if r["msg"].startswith("wrote "))
    assert wrote["output"] == str(out) and "wall_seconds" in wrote and "peak_rss_mb" in wrote
    assert result.stdout.startswith("ingest: ")  # the result line stays plain, on stdout


def test_log_format_json_for_errors(tmp_path: Path) -> None:
    result = invoke(
        "ingest", "--raw-dir", tmp_path, "--out", tmp_path / "o.zarr", "--log-format", "json"
    )
    assert result.exit_code == 2
    error = json.loads(result.stderr.splitlines()[-1])  # the error line is JSON too
    assert error["level"] == "error" and error["exit_code"] == 2 and "expected" in error["msg"]


def test_log_format_human_is_not_json(tmp_path: Path, dataset: SyntheticDataset) -> None:
    result = invoke(*ingest_args(dataset, tmp_path / "mnist.zarr"))
    assert result.exit_code == 0
    first = result.stderr.splitlines()[0]
    assert "[ingest]" in first and "INFO" in first
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)


def test_log_level_warning_silences_info(tmp_path: Path, dataset: SyntheticDataset) -> None:
    result = invoke(*ingest_args(dataset, tmp_path / "mnist.zarr", "--log-level", "warning"))
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


@pytest.mark.mnist
def test_fetch_real_mnist_via_cli(tmp_path: Path, real_mnist_dir: Path) -> None:
    dest = tmp_path / "raw"
    result = invoke("fetch", "--source", real_mnist_dir, "--dest", dest, "--lock-timeout", "0")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"fetch: {dest} ready (4 files verified)\n"
    assert read_idx(dest / f"{MNIST_NAMES[('test', 'labels')]}.gz").shape == (10000,)
    again = invoke("fetch", "--source", real_mnist_dir, "--dest", dest, "--lock-timeout", "0")
    assert again.exit_code == 0
    assert again.stdout == f"fetch: {dest} up to date (4 files verified)\n"
    # MNIST_SOURCE is the environment variable of --source
    env = invoke("fetch", "--dest", dest, env={"MNIST_SOURCE": str(real_mnist_dir)})
    assert env.exit_code == 0 and "up to date" in env.stdout


# ----------------------------------------------------------------------------- settings


def show(*args: Any, env: dict[str, str] | None = None) -> dict[str, dict[str, tuple[str, str]]]:
    """Parse ``config show``: {section: {option: (value repr, origin)}}."""
    result = invoke(*args, "config", "show", env=env)
    assert result.exit_code == 0, result.output
    sections: dict[str, dict[str, tuple[str, str]]] = {}
    current = None
    for line in result.stdout.splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif " = " in line and current is not None:
            key, _, rest = line.partition(" = ")
            value, _, origin = rest.rpartition("  # ")
            current[key] = (value, origin)
    sections["#"] = {"config": (result.stdout.splitlines()[0], "")}
    return sections


def test_config_show_prints_every_job_section() -> None:
    shown = show()
    assert {"fetch", "ingest"} <= set(shown)
    assert "config" not in shown  # the config group itself is not a job
    assert shown["#"]["config"][0] == "# config file: None"
    assert shown["ingest"]["chunk_size"] == ("4096", "default")
    assert shown["ingest"]["out"] == ("PosixPath('data/mnist.zarr')", "default")
    assert shown["fetch"]["dest"] == ("PosixPath('data/raw/mnist')", "default")
    for section in ("fetch", "ingest"):
        for key in ("force", "lock_timeout", "log_format", "log_level"):
            assert key in shown[section], (section, key)
        assert "help" not in shown[section]


def write_config(path: Path, chunk_size: int) -> Path:
    path.write_text(
        f'[ingest]\nchunk_size = {chunk_size}\ndataset = "from-config"\n\n'
        '[fetch]\nsource = "/from/config"\n'
    )
    return path


def test_settings_precedence_in_config_show(tmp_path: Path) -> None:
    config = write_config(tmp_path / "settings.toml", 11)
    env = {"MNIST_PIPELINE_INGEST_CHUNK_SIZE": "9"}

    shown = show("--config", config)
    assert shown["#"]["config"][0] == f"# config file: {config}"
    assert shown["ingest"]["chunk_size"] == ("11", "config")
    assert shown["ingest"]["dataset"] == ("'from-config'", "config")
    assert shown["fetch"]["source"] == ("'/from/config'", "config")

    shown = show("--config", config, env=env)  # env beats config
    assert shown["ingest"]["chunk_size"] == ("9", "env")
    assert shown["ingest"]["dataset"] == ("'from-config'", "config")

    shown = show(env=env)  # env beats default
    assert shown["ingest"]["chunk_size"] == ("9", "env")
    assert shown["ingest"]["dataset"] == ("'mnist'", "default")

    shown = show("--config", config, env={"MNIST_SOURCE": "/from/env"})
    assert shown["fetch"]["source"] == ("'/from/env'", "env")

    # the config file can also come from MNIST_PIPELINE_CONFIG or ./pipeline.toml
    shown = show(env={"MNIST_PIPELINE_CONFIG": str(config)})
    assert shown["ingest"]["chunk_size"] == ("11", "config")
    write_config(tmp_path / "pipeline.toml", 13)  # tmp_path is the working directory
    shown = show()
    assert shown["#"]["config"][0] == "# config file: pipeline.toml"
    assert shown["ingest"]["chunk_size"] == ("13", "config")


def test_config_keys_may_use_dashes(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[ingest]\nchunk-size = 17\n")
    assert show("--config", config)["ingest"]["chunk_size"] == ("17", "config")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("[ingest\nchunk_size = 3\n", "expected valid TOML"),
        ("chunk_size = 3\n", "expected [job] tables"),
    ],
    ids=["missing", "invalid", "top-level-key"],
)
def test_bad_config_file(tmp_path: Path, content: str | None, message: str) -> None:
    config = tmp_path / "bad.toml"
    if content is not None:
        config.write_text(content)
    result = invoke("--config", config, "config", "show", env=WIDE)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


@pytest.fixture
def chunk_of(dataset: SyntheticDataset, tmp_path: Path) -> Iterator[Any]:
    """``chunk_of(*root_args, extra=ingest_args, env=...)`` runs ingest; returns the chunk
    length of train/images in the resulting store."""
    counter = iter(range(100))

    def run(*root_args: Any, extra: tuple[Any, ...] = (), env: dict[str, str] | None = None) -> int:
        out = tmp_path / f"store{next(counter)}.zarr"
        result = invoke(*root_args, *ingest_args(dataset, out, *extra), env=env)
        assert result.exit_code == 0, result.output
        images, labels = split_arrays(open_store(out), "train")
        assert labels.chunks[0] == images.chunks[0]
        return int(images.chunks[0])

    yield run


def test_settings_precedence_in_the_resulting_store(tmp_path: Path, chunk_of: Any) -> None:
    config = write_config(tmp_path / "settings.toml", 11)
    env = {"MNIST_PIPELINE_INGEST_CHUNK_SIZE": "9"}
    assert chunk_of() == 50  # default 4096, capped at the 50 train images
    assert chunk_of("--config", config) == 11  # config > default
    assert chunk_of("--config", config, env=env) == 9  # env > config
    assert chunk_of("--config", config, extra=("--chunk-size", "5"), env=env) == 5  # cli > env


def test_cli_option_beats_env_and_config(tmp_path: Path, dataset: SyntheticDataset) -> None:
    config = write_config(tmp_path / "settings.toml", 11)
    out = tmp_path / "cli.zarr"
    result = invoke(
        "--config", config, *ingest_args(dataset, out, "--chunk-size", "6"),
        env={"MNIST_PIPELINE_INGEST_CHUNK_SIZE": "9"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    images, _ = split_arrays(open_store(out), "train")
    assert images.chunks[0] == 6
    assert open_store(out).attrs["dataset"] == "from-config"
    manifest = read_manifest(out)
    assert manifest is not None and manifest["params"]["chunk_size"] == 6


@pytest.mark.parametrize("preset", [None, "3"])
def test_one_blas_thread_sets_defaults_only(
    monkeypatch: pytest.MonkeyPatch, preset: str | None
) -> None:
    from jobs.app import one_blas_thread

    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if preset is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, preset)
    one_blas_thread()
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        assert os.environ[var] == (preset or "1")  # a user's own setting wins


# ----------------------------------------------------------------------------- issue 10


@pytest.mark.parametrize(
    ("error", "message", "code"),
    [
        (PermissionError(13, "Permission denied", "/data/x"), "/data/x: Permission denied", 1),
        (OSError(28, "No space left on device", "/out/p"), "/out/p: No space left on device", 1),
        (OSError(28, "No space left on device"), "No space left on device", 1),
        (NotADirectoryError(20, "Not a directory", "/a/f/x"), "/a/f/x: Not a directory", 2),
        (
            OSError(18, "Invalid cross-device link", "a", None, "b"),
            "a -> b: Invalid cross-device link",
            1,
        ),
        (OSError("pyarrow says\nthis"), "pyarrow says this", 1),
        (OSError(13, "Permission denied", os.fsdecode(b"n\xff")), "n\\xff: Permission denied", 1),
    ],
)
def test_os_error_message(error: OSError, message: str, code: int) -> None:
    from jobs.app import os_error_message

    assert os_error_message(error) == (message, code)


def test_existing_file_as_output_parent_is_bad_input(tmp_path: Path) -> None:
    from jobs.app import os_error_message

    (tmp_path / "f").write_text("")
    error = FileExistsError(17, "File exists", str(tmp_path / "f"))
    assert os_error_message(error) == (f"{tmp_path / 'f'}: expected a folder, got a file", 2)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[ingset]\n", "unknown section [ingset] in"),
        ("[ingset]\n", "did you mean [ingest]?"),
        ("[nothing_like_it]\n", "expected one of [bench], [features], [fetch]"),
        ("[ingest]\nchunk-sise = 3\n", "unknown key chunk-sise in [ingest] of"),
        ("[ingest]\nchunk-sise = 3\n", "did you mean chunk_size?"),
        ("[ingest]\nchunk_size = 2.0\n", "[ingest] chunk_size: expected an integer, got 2.0"),
        ("[ingest]\nchunk_size = 0\n", "expected an integer >= 1, got 0"),
        ("[ingest]\nforce = 1\n", "[ingest] force: expected true or false, got 1"),
        ("[ingest]\nlock_timeout = nan\n", "expected a number, not nan, got nan"),
        ("[ingest]\nlock_timeout = true\n", "expected a number, got true"),
        ('[ingest]\nlog_format = "xml"\n', "expected one of 'human', 'json', got \"xml\""),
        ("[ingest]\nout = 3\n", "[ingest] out: expected a string, got 3"),
    ],
)
def test_config_is_checked_against_the_registered_options(
    tmp_path: Path, content: str, fragment: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(content)
    result = invoke("--config", config, "config", "show")
    assert_clean_error(result, 2, fragment)


def test_config_accepts_what_the_options_accept(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[ingest]\nchunk-size = 5\nlock_timeout = 2\nforce = true\nlog_level = "debug"\n'
        'out = "x.zarr"\n'
    )
    shown = show("--config", config)["ingest"]
    assert shown["chunk_size"] == ("5", "config")
    assert shown["lock_timeout"] == ("2.0", "config")
    assert shown["force"] == ("True", "config")


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("MNIST_PIPELINE_INGEST_FORCE", "maybe", "expected true or false"),
        ("MNIST_PIPELINE_INGEST_FORCE", "t", "expected true or false"),
        ("MNIST_PIPELINE_INGEST_CHUNK_SIZE", "1e3", "expected an integer, got '1e3'"),
        ("MNIST_PIPELINE_INGEST_CHUNK_SIZE", "0", "expected an integer >= 1, got '0'"),
        ("MNIST_PIPELINE_INGEST_LOCK_TIMEOUT", "soon", "expected a number, got 'soon'"),
        (
            "MNIST_PIPELINE_LOG_FORMAT",
            "xml",
            "expected one of 'human', 'json'",
        ),  # one variable for every job
    ],
)
def test_environment_values_are_checked_in_one_line(name: str, value: str, fragment: str) -> None:
    result = invoke("config", "show", env={name: value})
    assert_clean_error(result, 2, f"{name}: {fragment}")


@pytest.mark.parametrize("value", ["1", "0", "true", "FALSE", "yes", "no", "on", "off", ""])
def test_environment_booleans_that_are_accepted(value: str) -> None:
    shown = show(env={"MNIST_PIPELINE_INGEST_FORCE": value})
    expected = "False" if value.lower() in ("0", "false", "no", "off", "") else "True"
    assert shown["ingest"]["force"][0] == expected
