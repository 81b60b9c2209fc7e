"""Paths a user hands the pipeline: local, absolute, and safe to write to.

Two rules every stage applies before it touches anything:

* **local and absolute.** A path is made absolute before any task is built, so dask
  workers whose working directory differs (SLURM ``--chdir``, workers started elsewhere)
  read and write the same files as the job. Object-store URLs (``s3://...``) are refused
  until remote storage is supported: ``Path("s3://b/x")`` would otherwise quietly become
  the local folder ``./s3:/b/x``.
* **never replace what the pipeline did not write.** A stage replaces an existing output
  only when the manifest beside it says the same stage wrote it, and never when the output
  is, or contains, one of the run's inputs; the filesystem root, the current folder and its
  parents are never outputs. ``--force`` does not lift these rules: it only rebuilds
  outputs the stage may replace anyway.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

#: ``scheme://`` or ``scheme:/`` (what ``Path`` makes of ``scheme://``) at the start.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def local_path(path: str | os.PathLike[str], *, what: str) -> Path:
    """``path`` as an absolute local path; refuses URLs.

    Parameters
    ----------
    path : str or path-like
        What the user gave.
    what : str
        What the path is for (``"output"``, ``"model"``, ...), named in the error.

    Raises
    ------
    InputError
        For ``scheme://`` URLs and empty paths.
    """
    text = os.fspath(path)
    if _URL.match(text):
        scheme = text.split(":", 1)[0]
        raise InputError(
            f"{what}: expected a local path, got the URL {text!r} "
            f"({scheme}:// storage is not supported yet)"
        )
    if not text.strip():
        raise InputError(f"{what}: expected a path, got an empty string")
    # abspath, not resolve: a symlinked output stays a link that is replaced, not followed.
    return Path(os.path.abspath(text))  # noqa: PTH100 (resolve() would follow links)


def manifest_path(output: Path) -> Path:
    """Where the run manifest of ``output`` lives: ``<output>.manifest.json`` beside it."""
    return output.with_name(output.name + ".manifest.json")


def temp_path(output: Path) -> Path:
    """The hidden path an output is built at before it is renamed into place."""
    return output.with_name(f".{output.name}.partial")


def read_manifest(output: Path) -> dict[str, Any] | None:
    """The manifest of ``output``, or None when there is none or it is unreadable."""
    try:
        data = json.loads(manifest_path(output).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_output(
    stage: str,
    output: Path,
    *,
    inputs: Mapping[str, Path],
    replaces: bool = True,
) -> None:
    """Refuse an output path the stage must not write (see the module docstring).

    Parameters
    ----------
    stage : str
        The stage that would write ``output``.
    output : Path
        Absolute output path.
    inputs : mapping of name to Path
        The run's inputs (absolute).
    replaces : bool
        Whether the stage replaces an existing output as a whole (False for stages that
        only add files of their own to a folder, such as ``fetch``).

    Raises
    ------
    InputError
        Naming the path and why it is refused.
    """
    real = output.resolve()
    if real.parent == real:
        raise InputError(
            f"{output}: refusing to write there: expected a file or folder to create, got the "
            "root of the filesystem"
        )
    cwd = Path.cwd().resolve()
    if _contains(real, cwd):
        where = "the current folder" if real == cwd else "a parent of the current folder"
        raise InputError(f"{output}: refusing to write there: it is {where}")
    for name, path in inputs.items():
        if _contains(real, Path(path).resolve()):
            relation = "is" if real == Path(path).resolve() else "contains"
            raise InputError(
                f"{output}: refusing to write there: it {relation} the {name} input {path}"
            )
    if not replaces or not (output.exists() or output.is_symlink()):
        return
    owner = (read_manifest(output) or {}).get("stage")
    if owner != stage:
        kind = "folder" if output.is_dir() else "file"
        got = (
            f"an existing {kind} that this pipeline did not write (no manifest beside it)"
            if owner is None
            else f"the output of another stage ({owner})"
        )
        raise InputError(
            f"{output}: refusing to replace it: expected a new path or an earlier {stage} "
            f"output, got {got}; choose another output path or remove it yourself"
        )
