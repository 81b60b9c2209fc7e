"""The ``score`` stage: predict digits of image files, a zarr store or an idx file -> parquet.

Inputs
------
* a **folder** of image files, walked lazily and recursively in sorted order
  (``os.scandir``; only the names of the folders on the current path are held). Files are
  selected by name patterns (default :data:`~pipeline.images.DEFAULT_GLOBS`), decoded with
  the allow-listed Pillow decoders and normalized to MNIST format (:mod:`pipeline.images`).
  Symbolic links are followed only to files inside the folder (such a file is then scored
  under both names); links to folders are never followed. The job's own output is skipped
  when it lies inside the folder;
* a **zarr store** written by ``ingest`` (one split) or an **idx** images file (raw or gzip):
  images are used as stored.

Features are computed by :func:`pipeline.extract.extract_features` with the model's own
feature configuration, the code path ``features`` uses for training, one batch at a time.

Output
------
A parquet dataset folder, one part ``part-<batch:05d>.parquet`` per batch of
``batch_size`` inputs, with columns::

    path | image_index   string (relative to the input folder) | int64 (row in the input)
    prediction          int16, null when the file could not be scored
    probability         float32, probability of the predicted class, null on error
    prob_<class>        float32, one per model class (binary models: prob_0, prob_1)
    status              string, "ok" or why the file could not be scored

A bad file never stops the run: it becomes a row whose ``status`` says what is wrong.

Batches and resuming
--------------------
Batch ``i`` always holds inputs ``i * batch_size`` to ``(i + 1) * batch_size - 1`` of the
deterministic walk, and each part is written atomically (temporary file, fsync, rename).
The stage always keeps the hidden ``.<out>.partial`` folder of a run that died, with a
state file recording the inputs' fingerprints and the parameters. ``resume=True`` continues
such a partial when its state matches (batches whose part exists are skipped, so no row is
duplicated or lost); otherwise, and always without ``resume``, the partial is discarded.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import dask
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dask.delayed import Delayed

from pipeline import __version__
from pipeline.catalogue import FeatureConfig, FeatureConfigError, load_config
from pipeline.errors import ArtifactError, ConfigMismatchError, InputError, PipelineError
from pipeline.extract import extract_features, feature_widths
from pipeline.fingerprint import content_fingerprint
from pipeline.idx import iter_idx, read_header
from pipeline.images import (
    DEFAULT_GLOBS,
    MNIST_SHAPE,
    BadImageError,
    Normalize,
    read_gray,
    refuse_decompression_bombs,
    to_mnist,
)
from pipeline.logs import get_logger, progress
from pipeline.model import LinearModel, load_model_with_digest
from pipeline.parallel import executor
from pipeline.parquet import META_KEY
from pipeline.paths import local_path
from pipeline.stage import StageResult, manifest_path, run_stage, temp_path
from pipeline.store import StrictArray, open_store, strict_arrays

#: ``files``: image files and folders of them given together (or one image file).
InputKind = Literal["folder", "files", "zarr", "idx"]
FORMAT = "mnist-pipeline/predictions/1"
DEFAULT_BATCH_SIZE = 2048
PART_NAME = "part-{:05d}.parquet"
#: Resume state inside the partial output; the "_" prefix hides it from parquet readers.
STATE_FILE = "_score_state.json"
#: Batches computed per dask call, per worker thread: enough to keep every thread busy
#: while a window drains, few enough that a window's file names stay small.
WINDOW_PER_WORKER = 4
#: Failure messages shown in the log (the rest are only in the ``status`` column).
LOGGED_FAILURES = 5

log = get_logger("score")

#: One walked input file: its path relative to the input folder, and why it cannot be
#: opened (None when it can).
WalkItem = tuple[str, str | None]


class TooManyFailuresError(PipelineError):
    """More input files failed than ``--max-failures`` allows."""


# ------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ScoringModel:
    """A verified model artifact with its loaded feature configuration."""

    model: LinearModel
    config: FeatureConfig
    folder: Path

    @property
    def classes(self) -> list[int]:
        return [int(c) for c in self.model.classes]


def load_scoring_model(folder: Path) -> ScoringModel:
    """Load a model artifact and the feature configuration it was trained with.

    Raises :class:`~pipeline.errors.ArtifactError` when the artifact is missing or broken,
    its feature configuration cannot be loaded or does not match its recorded hash, or its
    classes do not fit the int16 ``prediction`` column.
    """
    return load_scoring_model_with_digest(folder)[0]


def load_scoring_model_with_digest(folder: Path) -> tuple[ScoringModel, str]:
    """:func:`load_scoring_model`, and the sha256 of the bytes the model was read from."""
    folder = Path(folder)
    model, digest = load_model_with_digest(folder)
    where = folder / "model.json"
    raw = model.meta.get("feature_config")
    if not isinstance(raw, dict):
        raise ArtifactError(
            f"{where}: expected a feature_config object, got {type(raw).__name__} "
            "(retrain the model with this pipeline version)"
        )
    try:
        config = load_config(raw)
    except FeatureConfigError as e:
        raise ArtifactError(f"{where}: expected a loadable feature_config, got: {e}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise ArtifactError(
            f"{where}: expected a loadable feature_config, got a malformed one ({e})"
        ) from None
    expected_hash = model.meta.get("feature_config_hash")
    if expected_hash is not None and expected_hash != config.hash:
        raise ArtifactError(
            f"{where}: expected feature_config_hash {config.hash[:12]} for its feature_config, "
            f"got {str(expected_hash)[:12]} (the artifact was edited)"
        )
    info = np.iinfo(np.int16)
    if model.classes.size and (model.classes.min() < info.min or model.classes.max() > info.max):
        raise ArtifactError(f"{where}: expected int16 class labels, got {model.classes.tolist()}")
    return ScoringModel(model=model, config=config, folder=folder), digest


class _ModelUnderLock:
    """The model as the stage runner fingerprints it, under the output's lock.

    The runner calls :meth:`fingerprint` once the lock is held; the model is loaded from
    the same bytes that are hashed, so the predictions and the manifest always name the
    same model, even when the model was retrained while this run waited for the lock.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._loaded: ScoringModel | None = None

    def fingerprint(self) -> str:
        self._loaded, digest = load_scoring_model_with_digest(self.folder)
        return digest

    @property
    def loaded(self) -> ScoringModel:
        if self._loaded is None:
            raise AssertionError("the model is loaded when the runner fingerprints it")
        return self._loaded


def check_image_shape(scoring: ScoringModel, image_shape: tuple[int, int]) -> None:
    """Refuse inputs whose image size gives another number of features than the model's."""
    k = sum(feature_widths(scoring.config, image_shape).values())
    if k != scoring.model.n_features:
        raise ConfigMismatchError(
            f"{scoring.folder}: expected images giving {scoring.model.n_features} features, "
            f"got {image_shape[0]}x{image_shape[1]} images giving {k} "
            "(the model was trained on images of another size)"
        )


# ------------------------------------------------------------------------------ inputs


def detect_input(path: Path) -> InputKind:
    """What kind of input ``path`` is: a zarr store, a folder of images, an idx file (by
    its first bytes: idx starts with two zero bytes, or is gzip) or an image file."""
    path = Path(path)
    if path.is_dir():
        return "zarr" if (path / "zarr.json").is_file() else "folder"
    if path.is_file():
        with path.open("rb") as f:
            head = f.read(2)
        return "idx" if head in (b"\0\0", b"\x1f\x8b") else "files"
    raise InputError(
        f"INPUT: expected a folder of images, a zarr store, an idx file or an image file at "
        f"{path}, got no such file or folder"
    )


def detect_inputs(paths: Sequence[Path]) -> InputKind:
    """The kind of several inputs together: one zarr store or idx file alone, or any
    number of image files and folders (``files``; one folder alone is ``folder``)."""
    if not paths:
        raise InputError("INPUT: expected at least one input, got none")
    kinds = [detect_input(p) for p in paths]
    if len(paths) == 1:
        return kinds[0]
    single = [f"{p} ({k})" for p, k in zip(paths, kinds, strict=True) if k in ("zarr", "idx")]
    if single:
        raise InputError(
            f"INPUT: expected image files and folders, or one zarr store or idx file alone, "
            f"got {len(paths)} inputs including {', '.join(single)}"
        )
    return "files"


def glob_matcher(globs: Sequence[str]) -> Callable[[str, str], bool]:
    """``match(name, rel_path)`` for fnmatch-style ``globs``, case-insensitive.

    A pattern with ``/`` is matched against the path relative to the input folder (``*``
    also matches ``/``), any other pattern against the file name.
    """
    if not globs:
        raise InputError("--glob: expected at least one pattern, got none")

    def compile_any(patterns: list[str]) -> re.Pattern[str] | None:
        if not patterns:
            return None
        return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns), re.I)

    by_name = compile_any([g for g in globs if "/" not in g])
    by_path = compile_any([g for g in globs if "/" in g])

    def match(name: str, rel: str) -> bool:
        return bool(
            (by_name is not None and by_name.match(name))
            or (by_path is not None and by_path.match(rel))
        )

    return match


_FILE, _DIR, _LINK, _OTHER = 0, 1, 2, 3
_SPECIAL = "expected a regular file, got a special file (FIFO, socket or device)"


def _list_dir(
    folder: str, prefix: str, match: Callable[[str, str], bool], exclude: frozenset[str]
) -> list[tuple[str, int]]:
    """Sorted ``(name, kind)`` of a folder's sub-folders and matching files.

    Only names and a small kind code are kept (no ``DirEntry``), so a folder with millions
    of files costs tens of bytes per file; the kinds come from ``d_type`` (no ``stat``).
    """
    out = []
    with os.scandir(folder) as it:
        for e in it:
            if exclude and prefix + e.name in exclude:
                continue
            if e.is_symlink():
                kind = _LINK
            elif e.is_dir(follow_symlinks=False):
                out.append((e.name, _DIR))
                continue
            else:
                kind = _FILE if e.is_file(follow_symlinks=False) else _OTHER
            if match(e.name, prefix + e.name):
                out.append((e.name, kind))
    out.sort()
    return out


def _check_link(root: str, root_real: str, rel: str) -> str | None:
    """Why the symlink ``rel`` is not followed, or None when it is a file inside ``root``."""
    try:
        target = os.path.realpath(f"{root}/{rel}", strict=True)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "expected a file, got a symlink loop (not followed)"
        return f"expected a file, got a broken symlink ({(e.strerror or str(e)).lower()})"
    if os.path.commonpath((root_real, target)) != root_real:
        return f"expected a file inside the input folder, got a symlink to {target} (not followed)"
    if not Path(target).is_file():
        return "expected a file, got a symlink to a folder or special file (not followed)"
    return None


_NOT_UTF8 = "expected a file name that is valid UTF-8, got other bytes (shown as \\x escapes)"


def _not_utf8(rel: str) -> bool:
    """Whether ``rel`` holds bytes that are not UTF-8 (as surrogate escapes, see
    :func:`os.fsdecode`): such a name cannot go into the parquet ``path`` column."""
    try:
        rel.encode()
    except UnicodeEncodeError:
        return True
    return False


def _shown(rel: str) -> str:
    """``rel`` with its non-UTF-8 bytes as ``\\xNN`` escapes (valid UTF-8, one per name)."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def walk_images(
    root: Path, *, globs: Sequence[str] = DEFAULT_GLOBS, exclude: frozenset[str] = frozenset()
) -> Iterator[WalkItem]:
    """Matching files under ``root`` in deterministic order, lazily.

    Folders are visited depth-first with entries sorted by name. Yields ``(rel, problem)``:
    ``rel`` uses ``/``; ``problem`` is None for a file that can be opened, else why not (a
    symlink leaving ``root``, a symlink loop, a special file, a folder that cannot be
    listed). Symlinks to folders are never followed. Entries whose relative path is in
    ``exclude`` (the job's own output inside ``root``) are skipped.
    """
    match = glob_matcher(globs)
    root_s = os.fspath(root)
    root_real = os.path.realpath(root_s)
    try:
        top = _list_dir(root_s, "", match, exclude)
    except OSError as e:
        raise InputError(
            f"INPUT: expected a readable folder at {root}, got {(e.strerror or str(e)).lower()}"
        ) from None
    stack: list[tuple[str, Iterator[tuple[str, int]]]] = [("", iter(top))]
    while stack:
        prefix, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        name, kind = entry
        rel = prefix + name
        if kind != _DIR and not rel.isascii() and _not_utf8(rel):
            yield _shown(rel), _NOT_UTF8
            continue
        if kind == _FILE:
            yield rel, None
        elif kind == _DIR:
            try:
                listing = _list_dir(f"{root_s}/{rel}", rel + "/", match, exclude)
            except OSError as e:
                reason = f"expected a readable folder, got {(e.strerror or str(e)).lower()}"
                yield (_shown(rel) if _not_utf8(rel) else rel), reason
                continue
            stack.append((rel + "/", iter(listing)))
        elif kind == _LINK:
            yield rel, _check_link(root_s, root_real, rel)
        else:
            yield rel, _SPECIAL


def walk_inputs(
    paths: Sequence[str], *, globs: Sequence[str], out: Path | None = None
) -> Iterator[WalkItem]:
    """The files of several inputs in the order given, each folder walked like
    :func:`walk_images`. Paths are yielded as given (a folder's files joined to it), so
    they read relative to the current folder or as absolute paths; files named
    explicitly are scored whatever ``globs`` say."""
    for given in paths:
        if Path(given).is_dir():
            exclude = _own_files(Path(given), out) if out is not None else frozenset()
            for rel, problem in walk_images(Path(given), globs=globs, exclude=exclude):
                yield os.path.join(given, rel), problem  # noqa: PTH118 (str paths: hot loop)
        else:
            yield given, None


def _stat_digest(root: str, items: Iterable[WalkItem]) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    for rel, problem in items:
        try:
            # str paths and os.stat: no Path object per file on a walk of millions
            st = os.stat(os.path.join(root, rel), follow_symlinks=problem is None)  # noqa: PTH116, PTH118
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size = mtime = -1
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
        n += 1
    return h.hexdigest(), n


def folder_fingerprint(
    root: Path, *, globs: Sequence[str] = DEFAULT_GLOBS, exclude: frozenset[str] = frozenset()
) -> tuple[str, int]:
    """sha256 over the walked files' relative paths, sizes and mtimes, and their count.

    The stat-based fingerprint of :func:`pipeline.fingerprint.stat_fingerprint`, but over
    exactly the files ``score`` reads and streamed, so memory does not grow with the folder.
    """
    return _stat_digest(os.fspath(root), walk_images(root, globs=globs, exclude=exclude))


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


# ------------------------------------------------------------------------------ output


def prediction_schema(
    scoring: ScoringModel, *, id_column: Literal["path", "image_index"], meta: dict[str, Any]
) -> pa.Schema:
    """Arrow schema of the predictions (see the module docstring), ``meta`` as JSON metadata."""
    id_type = pa.string() if id_column == "path" else pa.int64()
    fields = [
        pa.field(id_column, id_type, nullable=False),
        pa.field("prediction", pa.int16()),
        pa.field("probability", pa.float32()),
        *(pa.field(f"prob_{c}", pa.float32()) for c in scoring.classes),
        pa.field("status", pa.string(), nullable=False),
    ]
    return pa.schema(fields, metadata={META_KEY: json.dumps(meta, sort_keys=True).encode()})


def predict_table(
    images: np.ndarray,
    ok: np.ndarray,
    *,
    ids: pa.Array,
    status: list[str],
    scoring: ScoringModel,
    schema: pa.Schema,
) -> pa.Table:
    """Predictions of one batch as an arrow table.

    Parameters
    ----------
    images : ndarray, shape (n, H, W), uint8
        Images in the model's format; rows where ``ok`` is False are ignored.
    ok : ndarray, shape (n,), bool
        Which rows hold a decoded image.
    ids : pyarrow.Array, length n
        The ``path`` or ``image_index`` column.
    status : list of str, length n
        ``"ok"`` or the error of each row.
    """
    n = len(status)
    rows = np.flatnonzero(ok)
    n_classes = len(scoring.classes)
    pred = np.zeros(n, np.int16)
    proba = np.zeros((n, n_classes), np.float32)
    if rows.size:
        X = extract_features(images[rows], scoring.config)
        p = scoring.model.predict_proba(X)
        y = scoring.model.predict(X)
        pred[rows] = y
        proba[rows] = p
    top = np.zeros(n, np.float32)
    if rows.size:
        # Column of each predicted label (binary models: label 0/1 is the column).
        col = np.searchsorted(scoring.model.classes, pred[rows])
        top[rows] = proba[rows, col]
    null = ~ok
    arrays = [
        ids,
        pa.array(pred, pa.int16(), mask=null),
        pa.array(top, pa.float32(), mask=null),
        *(pa.array(proba[:, j], pa.float32(), mask=null) for j in range(n_classes)),
        pa.array(status, pa.string()),
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def write_part(path: Path, table: pa.Table) -> None:
    """Write one parquet part atomically: hidden temporary file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with tmp.open("wb") as f:
            pq.write_table(
                table,
                f,
                compression="zstd",
                compression_level=1,
                row_group_size=max(1, table.num_rows),
            )
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class BatchResult:
    """What one batch task did: rows scored ok, rows failed, a few failure messages."""

    ok: int
    failed: int
    examples: tuple[str, ...] = ()


def _finish_batch(
    index: int,
    images: np.ndarray,
    ok: np.ndarray,
    ids: pa.Array,
    status: list[str],
    *,
    out_dir: str,
    scoring: ScoringModel,
    schema: pa.Schema,
    names: Sequence[Any] | np.ndarray,
) -> BatchResult:
    table = predict_table(images, ok, ids=ids, status=status, scoring=scoring, schema=schema)
    write_part(Path(out_dir) / PART_NAME.format(index), table)
    n_ok = int(np.count_nonzero(ok))
    failed = np.flatnonzero(~ok)[:LOGGED_FAILURES]
    examples = tuple(f"{names[j]}: {status[j]}" for j in failed)
    return BatchResult(n_ok, len(status) - n_ok, examples)


def score_file_batch(
    index: int,
    items: Sequence[WalkItem],
    *,
    root: str,
    normalize: Normalize,
    out_dir: str,
    scoring: ScoringModel,
    schema: pa.Schema,
) -> BatchResult:
    """Decode, normalize and score one batch of files; write part ``index``.

    Decoding is the one per-file loop (Pillow releases the GIL while it decodes); features
    and predictions are computed for the whole batch at once.
    """
    refuse_decompression_bombs()  # the task may run in a dask.distributed worker process
    n = len(items)
    images = np.zeros((n, *MNIST_SHAPE), np.uint8)
    ok = np.zeros(n, bool)
    status = ["ok"] * n
    for j, (rel, problem) in enumerate(items):
        if problem is not None:
            status[j] = problem
            continue
        try:
            # join: absolute paths of a list of files stay as they are
            images[j] = to_mnist(read_gray(os.path.join(root, rel)), normalize=normalize)  # noqa: PTH118
        except BadImageError as e:
            status[j] = e.reason
            continue
        ok[j] = True
    rels = [rel for rel, _ in items]
    return _finish_batch(
        index,
        images,
        ok,
        pa.array(rels, pa.string()),
        status,
        out_dir=out_dir,
        scoring=scoring,
        schema=schema,
        names=rels,
    )


def score_array_batch(
    index: int,
    images: np.ndarray,
    *,
    start: int,
    out_dir: str,
    scoring: ScoringModel,
    schema: pa.Schema,
) -> BatchResult:
    """Score one batch of stored images (shape (n, H, W), as stored); write part ``index``."""
    n = images.shape[0]
    ids = np.arange(start, start + n, dtype=np.int64)
    return _finish_batch(
        index,
        images,
        np.ones(n, bool),
        pa.array(ids, pa.int64()),
        ["ok"] * n,
        out_dir=out_dir,
        scoring=scoring,
        schema=schema,
        names=ids,
    )


def score_zarr_batch(index: int, images: Any, *, start: int, stop: int, **kw: Any) -> BatchResult:
    """Read rows ``start:stop`` of a zarr images array and score them (see
    :func:`score_array_batch`)."""
    return score_array_batch(index, np.asarray(images[start:stop]), start=start, **kw)


def _zarr_images(job: _Job) -> StrictArray:
    open_store(job.source)  # the store's format, and that every chunk is there
    return strict_arrays(job.source, job.split)[0]


# ---------------------------------------------------------------------------- executing


# ------------------------------------------------------------------------------- stage


@dataclass
class _Totals:
    ok: int = 0
    failed: int = 0
    parts: int = 0
    resumed_parts: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, r: BatchResult) -> None:
        self.ok += r.ok
        self.failed += r.failed
        self.parts += 1
        room = LOGGED_FAILURES - len(self.examples)
        if room > 0:
            self.examples.extend(r.examples[:room])


def _part_index(name: str) -> int | None:
    m = re.fullmatch(r"part-(\d+)\.parquet", name)
    return int(m.group(1)) if m else None


def _prepare_partial(tmp: Path, *, state: dict[str, Any], resume: bool) -> dict[int, BatchResult]:
    """Make ``tmp`` the folder to write into; returns the finished parts it keeps.

    With ``resume`` and a state file equal to ``state``, the parts of the killed run are
    kept (stray temporary files removed); otherwise the folder is emptied.
    """
    state_file = tmp / STATE_FILE
    kept: dict[int, BatchResult] = {}
    if tmp.is_dir():
        try:
            old = json.loads(state_file.read_text())
        except (OSError, ValueError):
            old = None
        if resume and old == state:
            for p in sorted(tmp.iterdir()):
                i = _part_index(p.name)
                if i is not None:
                    try:
                        status = pq.read_table(p, columns=["status"]).column("status")
                    except (pa.ArrowException, OSError) as e:
                        # Parts are renamed into place complete: a damaged one was damaged
                        # afterwards. Score that batch again rather than trust or fail.
                        log.warning(
                            "rescoring batch %d: its part %s is unreadable (%s)",
                            i,
                            p,
                            " ".join(str(e).split()),
                        )
                        p.unlink()
                        continue
                    n_ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
                    kept[i] = BatchResult(n_ok, len(status) - n_ok)
                elif p.name != STATE_FILE:
                    p.unlink()  # a part being written when the run died
            log.info("resuming: %d finished parts kept in %s", len(kept), tmp)
            return kept
        if resume:
            why = "it was made from other inputs or parameters" if old else "it has no state"
            log.warning("not resuming %s: %s; starting afresh", tmp, why)
        else:
            log.info("discarding the partial output of an earlier run in %s", tmp)
        shutil.rmtree(tmp)
    elif resume:
        log.info("nothing to resume (no %s); starting afresh", tmp)
    tmp.mkdir()
    state_file.write_text(json.dumps(state, sort_keys=True))
    return kept


@dataclass(frozen=True)
class _Job:
    """Everything a build needs besides the output path."""

    kind: InputKind
    source: Path
    scoring: ScoringModel
    globs: tuple[str, ...]
    split: str
    normalize: Normalize
    batch_size: int
    scheduler: str | None
    workers: int | None
    exclude: frozenset[str] = frozenset()
    #: ``files`` inputs: the paths as given (``source`` is then the current folder).
    files: tuple[str, ...] = ()
    out: Path | None = None
    allow_empty: bool = False

    def walk(self) -> tuple[str, Iterator[WalkItem]]:
        """The absolute folder the walked paths are relative to, and the walk."""
        if self.kind == "files":
            return os.fspath(Path.cwd()), walk_inputs(self.files, globs=self.globs, out=self.out)
        walk = walk_images(self.source, globs=self.globs, exclude=self.exclude)
        return os.fspath(self.source.resolve()), walk


def _batch_tasks(
    job: _Job, out_dir: str, schema: pa.Schema, skip: set[int]
) -> Iterator[tuple[int, Delayed, int]]:
    """``(index, task, rows)`` for every batch not in ``skip``, produced lazily."""
    common: dict[str, Any] = {"out_dir": out_dir, "scoring": job.scoring, "schema": schema}
    B = job.batch_size
    if job.kind in ("folder", "files"):
        root, walk = job.walk()
        for i, items in enumerate(_batched(walk, B)):
            if i not in skip:
                # traverse=False: dask would otherwise walk every (path, problem) tuple of
                # the batch looking for collections (0.8 s per 20,000 files).
                batch = dask.delayed(items, traverse=False)
                task = dask.delayed(score_file_batch, pure=False)(
                    i, batch, root=root, normalize=job.normalize, **common
                )
                yield i, task, len(items)
    elif job.kind == "zarr":
        images = _zarr_images(job)
        n = int(images.shape[0])
        for i, start in enumerate(range(0, n, B)):
            if i not in skip:
                stop = min(n, start + B)
                task = dask.delayed(score_zarr_batch, pure=False)(
                    i, images, start=start, stop=stop, **common
                )
                yield i, task, stop - start
    else:
        start = 0
        for i, chunk in enumerate(iter_idx(job.source, rows_per_chunk=B)):
            if i not in skip:
                task = dask.delayed(score_array_batch, pure=False)(i, chunk, start=start, **common)
                yield i, task, len(chunk)
            start += len(chunk)


def _input_shape(job: _Job) -> tuple[int, ...]:
    """``(n, height, width)`` of a zarr or idx input."""
    if job.kind == "zarr":
        shape = tuple(_zarr_images(job).shape)
    else:
        try:
            shape = read_header(job.source).shape
        except InputError as e:
            raise InputError(
                f"INPUT: expected a folder of images, a zarr store or an idx images file, got: {e}"
            ) from None
    if len(shape) != 3:
        raise InputError(
            f"{job.source}: expected images of shape (n, height, width), got shape {shape}"
        )
    return shape


def build_predictions(
    out_dir: Path,
    *,
    job: _Job,
    meta: dict[str, Any],
    state: dict[str, Any],
    total: int,
    resume: bool,
) -> dict[str, Any]:
    """Write (or continue) the predictions dataset in ``out_dir``; returns a summary.

    ``meta`` goes into the parquet schema metadata; ``state`` (inputs' fingerprints and
    parameters) decides whether a partial output may be resumed.
    """
    if total == 0 and not job.allow_empty:
        where = ", ".join(job.files) if job.kind == "files" else job.source
        raise InputError(
            f"INPUT: expected images to score in {where}, got none (allow_empty writes an "
            "empty output instead)"
        )
    refuse_decompression_bombs()
    kept = _prepare_partial(out_dir, state=state, resume=resume)
    files = job.kind in ("folder", "files")
    id_column: Literal["path", "image_index"] = "path" if files else "image_index"
    schema = prediction_schema(job.scoring, id_column=id_column, meta=meta)
    totals = _Totals(resumed_parts=len(kept))
    for r in kept.values():
        totals.add(r)
    out_s = os.fspath(out_dir.resolve())
    with (
        # Decoding many small files is Python-bound (Pillow's per-file overhead holds the
        # GIL): threads do not scale (2 were slower than 1), worker processes do.
        executor(
            logger=log,
            scheduler=job.scheduler,
            workers=job.workers,
            processes=files,
            worker_init=refuse_decompression_bombs,
            preload=("pipeline.score", "pipeline.jit"),
        ) as (run_window, slots),
        progress(log, "score", total=total, unit="images") as advance,
    ):
        advance(totals.ok + totals.failed)
        window: list[tuple[Delayed, int]] = []
        size = max(2, WINDOW_PER_WORKER * slots)

        def flush() -> None:
            for r in run_window([t for t, _ in window], [w for _, w in window], advance):
                totals.add(r)
            window.clear()

        for _, task, rows in _batch_tasks(job, out_s, schema, set(kept)):
            window.append((task, rows))
            if len(window) >= size:
                flush()
        flush()
    if totals.parts == 0:  # no input at all: one empty part, so readers still get the schema
        empty = predict_table(
            np.zeros((0, *MNIST_SHAPE), np.uint8),
            np.zeros(0, bool),
            ids=pa.array([], schema.field(id_column).type),
            status=[],
            scoring=job.scoring,
            schema=schema,
        )
        write_part(out_dir / PART_NAME.format(0), empty)
        totals.parts = 1
        log.warning("%s: no input images found", job.source)
    (out_dir / STATE_FILE).unlink()
    for example in totals.examples:
        log.warning("failed: %s", example)
    rows = totals.ok + totals.failed
    log.info(
        "scored %d inputs: %d ok, %d failed",
        rows,
        totals.ok,
        totals.failed,
        extra={"data": {"rows": rows, "ok": totals.ok, "failed": totals.failed}},
    )
    return {
        "input_kind": job.kind,
        "rows": rows,
        "ok": totals.ok,
        "failed": totals.failed,
        "parts": totals.parts,
        "resumed_parts": totals.resumed_parts,
        "classes": job.scoring.classes,
        "feature_config_hash": job.scoring.config.hash,
        "failure_examples": totals.examples,
    }


#: Which input kinds each kind-specific option applies to, and its command-line name.
_APPLIES_TO: dict[str, tuple[str, tuple[InputKind, ...]]] = {
    "globs": ("--glob", ("folder", "files")),
    "normalize": ("--normalize", ("folder", "files")),
    "split": ("--split", ("zarr",)),
}


def _check_applicable(kind: InputKind, source: Path, given: Collection[str]) -> None:
    for name in given:
        flag, kinds = _APPLIES_TO[name]
        if kind not in kinds:
            names = {"files": "image file", "folder": "folder"}
            raise InputError(
                f"{flag}: applies to {' or '.join(names.get(k, k) for k in kinds)} inputs "
                f"only, got {source} (a {kind} input)"
            )


def score(
    *,
    model: Path,
    source: Path | Sequence[Path],
    out: Path,
    globs: Sequence[str] = DEFAULT_GLOBS,
    split: str = "test",
    normalize: Normalize = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    resume: bool = False,
    allow_empty: bool = False,
    scheduler: str | None = None,
    workers: int | None = None,
    force: bool = False,
    lock_timeout: float = 60.0,
    given: Collection[str] = (),
) -> StageResult:
    """The ``score`` stage (see the module docstring).

    Parameters
    ----------
    model : Path
        Model artifact folder (``model.json`` + ``model.npz``).
    source : Path or sequence of Path
        Folder of images, zarr dataset store, or idx images file; or image files and
        folders of them (their rows are named by the paths as given).
    out : Path
        Parquet dataset folder to write.
    globs : sequence of str
        File name patterns selecting images in a folder input.
    split : str
        Split of a zarr store input.
    normalize : {"auto", "always", "never"}
        How image files are brought to MNIST format (:func:`pipeline.images.to_mnist`).
    batch_size : int
        Inputs per task and per output part.
    resume : bool
        Continue the partial output of a killed run with the same inputs and parameters.
    allow_empty : bool
        Write an empty output for an input without images (else that is an error).
    given : collection of str
        Names of the options the user set explicitly (``globs``, ``split``, ``normalize``):
        one that does not apply to the input's kind is an error, not silently ignored.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size: expected a positive number of images, got {batch_size}")
    if normalize not in ("auto", "always", "never"):
        raise InputError(f"--normalize: expected auto, always or never, got {normalize!r}")
    typed = [source] if isinstance(source, str | os.PathLike) else list(source)
    sources = [local_path(p, what="INPUT") for p in typed]
    model = local_path(model, what="model")
    out = local_path(out, what="output")
    kind = detect_inputs(sources)
    _check_applicable(kind, sources[0], given)
    globs = tuple(globs) or DEFAULT_GLOBS
    root = sources[0] if kind != "files" else Path.cwd()
    exclude = _own_files(root, out) if kind == "folder" else frozenset()
    files = tuple(os.fspath(p) for p in typed) if kind == "files" else ()

    def make_job(scoring: ScoringModel) -> tuple[_Job, int]:
        """The job for ``scoring``, and how many stored images a zarr or idx input has."""
        job = _Job(
            kind,
            root,
            scoring,
            globs,
            split,
            normalize,
            batch_size,
            scheduler,
            workers,
            exclude,
            files=files,
            out=out,
            allow_empty=allow_empty,
        )
        if kind in ("folder", "files"):
            check_image_shape(scoring, MNIST_SHAPE)
            return job, 0
        n_stored, height, width = _input_shape(job)
        check_image_shape(scoring, (height, width))
        return job, n_stored

    # Fail fast on a bad model or input, before waiting for the lock; what is scored is
    # the model as read again under the lock (see _ModelUnderLock).
    if kind in ("folder", "files"):
        glob_matcher(globs)
    make_job(load_scoring_model(model))
    params: dict[str, Any] = {"input_kind": kind, "batch_size": batch_size}
    if kind in ("folder", "files"):
        params.update(globs=list(globs), normalize=normalize)
    elif kind == "zarr":
        params["split"] = split
    if kind == "files":
        params["inputs"] = list(files)  # the names its rows carry
    model_input = _ModelUnderLock(model)
    fingerprints: dict[str, str] = {}
    counts = {"files": 0}
    inputs = (
        {"input": sources[0]}
        if len(sources) == 1
        else {f"input {i}": p for i, p in enumerate(sources, 1)}
    )

    def fingerprint(path: Path) -> str:
        if path == model:
            digest = fingerprints["model"] = model_input.fingerprint()
            return digest
        if kind == "folder":
            digest, n = folder_fingerprint(path, globs=globs, exclude=exclude)
        elif kind == "files":
            given_as = files[sources.index(path)]
            digest, n = _stat_digest(
                os.fspath(Path.cwd()), walk_inputs([given_as], globs=globs, out=out)
            )
        else:
            digest, n = content_fingerprint(path), 0
        counts["files"] += n
        fingerprints[next(k for k, v in inputs.items() if v == path)] = digest
        return digest

    def build(tmp: Path) -> dict[str, Any]:
        scoring = model_input.loaded
        job, n_stored = make_job(scoring)
        meta = {
            "format": FORMAT,
            "pipeline_version": __version__,
            "model": os.fspath(model),
            "model_sha256": fingerprints["model"],
            "model_mode": scoring.model.mode,
            "positive_class": scoring.model.positive_class,
            "threshold": scoring.model.threshold,
            "classes": scoring.classes,
            "feature_config_hash": scoring.config.hash,
            "input": ", ".join(os.fspath(p) for p in sources),
            **params,
        }
        state = {
            "format": FORMAT,
            "pipeline_version": __version__,
            "params": params,
            "inputs": fingerprints,
        }
        total = counts["files"] if kind in ("folder", "files") else n_stored
        return build_predictions(tmp, job=job, meta=meta, state=state, total=total, resume=resume)

    # resume=True always: the partial of a run that dies is kept for a later --resume;
    # the build itself discards it when this run does not resume.
    return run_stage(
        "score",
        output=out,
        inputs={"model": model, **inputs},
        params=params,
        build=build,
        force=force,
        lock_timeout=lock_timeout,
        resume=True,
        input_fingerprint=fingerprint,
    )


def _own_files(source: Path, out: Path) -> frozenset[str]:
    """Relative paths of this job's output, partial, lock and manifest when they lie inside
    the input folder, so a run never scores (or fingerprints) its own output."""
    own = set()
    src = source.resolve()
    lock = out.with_name(f".{out.name}.lock")
    for path in (out, temp_path(out), lock, manifest_path(out)):
        try:
            own.add(path.resolve().relative_to(src).as_posix())
        except ValueError:
            continue
    return frozenset(own)


def check_failures(result: StageResult, *, max_failures: int | None) -> None:
    """Raise :class:`TooManyFailuresError` when more inputs failed than allowed."""
    failed = int(result.result.get("failed", 0))
    if max_failures is not None and failed > max_failures:
        raise TooManyFailuresError(
            f"score: expected at most {max_failures} failed inputs (--max-failures), got "
            f"{failed}; their reasons are in the status column of {result.output}"
        )
