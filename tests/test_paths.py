"""Paths the user gives: local and absolute; outputs that may (not) be replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.paths import check_output, local_path, manifest_path, temp_path
from pipeline.stage import run_stage


@pytest.mark.parametrize("url", ["s3://bucket/x", "gs://b/y", "file:///tmp/x", "memory://m"])
def test_urls_are_refused_until_remote_storage_is_supported(url: str) -> None:
    with pytest.raises(InputError, match=r"expected a local path, got the URL .*not supported"):
        local_path(url, what="output")


def test_a_path_object_of_a_url_is_still_recognized() -> None:
    # Path() collapses "s3://b/x" to "s3:/b/x": still a URL, not a folder named "s3:".
    with pytest.raises(InputError, match="s3://"):
        local_path(Path("s3://b/x"), what="output")


def test_local_paths_become_absolute_without_following_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    assert local_path("a/b", what="x") == tmp_path / "a/b"
    assert local_path("link", what="x") == tmp_path / "link"
    with pytest.raises(InputError, match="expected a path, got an empty string"):
        local_path("", what="x")


def test_naming_beside_the_output() -> None:
    assert manifest_path(Path("/d/out")) == Path("/d/out.manifest.json")
    assert temp_path(Path("/d/out")) == Path("/d/.out.partial")


@pytest.mark.parametrize("where", ["/", ".", ".."])
def test_root_current_folder_and_parents_are_never_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(InputError, match="refusing to write there"):
        check_output("demo", local_path(where, what="output"), inputs={})


def test_an_output_that_is_or_contains_an_input_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "raw").mkdir(parents=True)
    with pytest.raises(InputError, match=r"it is the source input"):
        check_output("demo", data / "raw", inputs={"source": data / "raw"})
    with pytest.raises(InputError, match=r"it contains the source input"):
        check_output("demo", data, inputs={"source": data / "raw"})
    # Inside an input is allowed (score writes beside the images it skips).
    check_output("demo", data / "raw" / "out", inputs={"source": data / "raw"})


def test_an_input_reached_through_a_link_is_recognized(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(InputError, match="it is the source input"):
        check_output("demo", tmp_path / "real", inputs={"source": tmp_path / "link"})


def test_only_outputs_of_the_same_stage_are_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="did not write"):
        check_output("demo", out, inputs={})
    manifest_path(out).write_text(json.dumps({"stage": "train"}))
    with pytest.raises(InputError, match=r"the output of another stage \(train\)"):
        check_output("demo", out, inputs={})
    manifest_path(out).write_text(json.dumps({"stage": "demo"}))
    check_output("demo", out, inputs={})
    # A stage that only adds its own files to a folder (fetch) may use any folder.
    manifest_path(out).unlink()
    check_output("demo", out, inputs={}, replaces=False)


def _build(text: str):  # type: ignore[no-untyped-def]
    def build(path: Path) -> dict[str, str]:
        path.write_text(text)
        return {"text": text}

    return build


def test_runner_refuses_before_creating_anything(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    inp = tmp_path / "in.txt"
    inp.write_text("x")
    before = sorted(tmp_path.iterdir())
    for force in (False, True):
        with pytest.raises(InputError, match="refusing to replace it"):
            run_stage("demo", output=notes, inputs={"in": inp}, params={}, build=_build("y"),
                      force=force)  # fmt: skip
    assert notes.read_text() == "mine"
    assert sorted(tmp_path.iterdir()) == before  # no lock file, no manifest


def test_a_crash_during_the_swap_leaves_an_output_the_stage_may_replace(tmp_path: Path) -> None:
    # The runner marks the manifest "replacing" before renaming; the next run neither
    # trusts the output (rebuilds it) nor refuses it as someone else's.
    inp = tmp_path / "in.txt"
    inp.write_text("x")
    out = tmp_path / "out.txt"
    run_stage("demo", output=out, inputs={"in": inp}, params={}, build=_build("one"))
    manifest_path(out).write_text(json.dumps({"stage": "demo", "status": "replacing"}))
    result = run_stage("demo", output=out, inputs={"in": inp}, params={}, build=_build("two"))
    assert not result.skipped
    assert out.read_text() == "two"


def test_leftovers_of_killed_runs_go_even_when_up_to_date(tmp_path: Path) -> None:
    inp = tmp_path / "in.txt"
    inp.write_text("x")
    out = tmp_path / "out"
    run_stage("demo", output=out, inputs={"in": inp}, params={}, build=_build("one"))
    partial = temp_path(out)
    partial.mkdir()
    (partial / "part-0.parquet").write_bytes(b"\0" * 1000)
    stray = tmp_path / f".{manifest_path(out).name}.tmp-12345"
    stray.write_text("{")
    result = run_stage("demo", output=out, inputs={"in": inp}, params={}, build=_build("one"))
    assert result.skipped
    assert not partial.exists()
    assert not stray.exists()
