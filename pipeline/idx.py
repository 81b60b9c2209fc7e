"""Strict reader and writer of the idx format (MNIST's file format), raw or gzip-compressed.

An idx file is a 4-byte magic number ``00 00 TT DD`` (TT: element type code, DD: number of
dimensions), DD big-endian uint32 dimension sizes, then the elements in C order, big-endian.
Compression is detected from the content (the gzip magic ``1f 8b``), never from the name.

Every deviation raises :class:`~pipeline.errors.IdxFormatError` with an "expected X, got Y"
message naming the file.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.errors import IdxFormatError

#: idx element type code -> big-endian numpy dtype.
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in IDX_TYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
# A single row larger than this is a corrupt header, not a dataset.
_MAX_ROW_BYTES = 1 << 28
_READ_PIECE = 1 << 24
_READ_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error, OSError)


@dataclass(frozen=True)
class IdxHeader:
    """Parsed idx header.

    Attributes
    ----------
    dtype : numpy.dtype
        Element type in native byte order (what :func:`iter_idx` yields).
    shape : tuple of int
        Full array shape; ``shape[0]`` is the number of items.
    header_bytes : int
        Size of the header, i.e. the offset of the first element.
    """

    dtype: np.dtype
    shape: tuple[int, ...]
    header_bytes: int

    @property
    def count(self) -> int:
        return self.shape[0]

    @property
    def item_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def payload_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def is_gzip(path: Path) -> bool:
    """Whether ``path`` starts with the gzip magic bytes."""
    with Path(path).open("rb") as f:
        return f.read(2) == _GZIP_MAGIC


@contextmanager
def open_idx(path: Path) -> Iterator[BinaryIO]:
    """Open an idx file for reading, transparently decompressing gzip content."""
    path = Path(path)
    try:
        raw = path.open("rb")
    except FileNotFoundError:
        raise IdxFormatError(f"{path}: expected an idx file, got no such file") from None
    except OSError as e:
        raise IdxFormatError(
            f"{path}: expected a readable idx file, got {e.strerror or e}"
        ) from None
    with raw:
        if raw.read(2) == _GZIP_MAGIC:
            raw.seek(0)
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield gz  # type: ignore[misc]
        else:
            raw.seek(0)
            yield raw


def _read_exact(stream: BinaryIO, n: int, path: Path, what: str) -> bytes:
    try:
        data = stream.read(n)
    except _READ_ERRORS as e:
        raise IdxFormatError(f"{path}: expected a valid gzip stream, got {_describe(e)}") from None
    if len(data) != n:
        raise IdxFormatError(f"{path}: expected {n} bytes of {what}, got {len(data)} (truncated)")
    return data


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def read_idx_header(stream: BinaryIO, *, path: Path) -> IdxHeader:
    """Parse and check the header at the start of ``stream``."""
    magic = _read_exact(stream, 4, path, "idx magic")
    if magic[0] != 0 or magic[1] != 0:
        raise IdxFormatError(
            f"{path}: expected idx magic 0x0000TTDD, got 0x{magic.hex()} (not an idx file)"
        )
    code, ndim = magic[2], magic[3]
    if code not in IDX_TYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_TYPES)
        raise IdxFormatError(f"{path}: expected idx type code in {{{known}}}, got 0x{code:02X}")
    if ndim == 0:
        raise IdxFormatError(f"{path}: expected at least 1 dimension, got 0")
    dims = np.frombuffer(_read_exact(stream, 4 * ndim, path, "idx dimensions"), dtype=">u4")
    shape = tuple(int(d) for d in dims)
    dtype = IDX_TYPES[code]
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    if row_bytes > _MAX_ROW_BYTES:
        raise IdxFormatError(
            f"{path}: expected items of at most {_MAX_ROW_BYTES} bytes, got shape {shape}"
        )
    return IdxHeader(dtype=dtype.newbyteorder("="), shape=shape, header_bytes=4 + 4 * ndim)


def read_header(path: Path) -> IdxHeader:
    """Read only the header of the idx file at ``path``; also checks a raw file's length."""
    path = Path(path)
    with open_idx(path) as f:
        header = read_idx_header(f, path=path)
    if not is_gzip(path):
        expected = header.header_bytes + header.payload_bytes
        actual = path.stat().st_size
        if actual != expected:
            kind = "truncated" if actual < expected else "trailing bytes"
            raise IdxFormatError(
                f"{path}: expected {expected} bytes for shape {header.shape}, got {actual} ({kind})"
            )
    return header


def iter_idx(path: Path, *, rows_per_chunk: int = 4096) -> Iterator[np.ndarray]:
    """Stream an idx file in chunks along its first axis.

    Memory use is one chunk. The payload length is checked against the header: a short
    payload raises at the chunk where it ends, trailing bytes raise after the last chunk,
    so a consumer must treat what it wrote as provisional until the iterator is exhausted.

    Parameters
    ----------
    path : Path
        Raw or gzip idx file.
    rows_per_chunk : int
        Items per yielded chunk (the last may be shorter).

    Yields
    ------
    numpy.ndarray
        Shape ``(rows, *header.item_shape)``, dtype ``header.dtype`` (native byte order).
    """
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    path = Path(path)
    header = read_header(path)
    row_items = int(np.prod(header.item_shape, dtype=np.int64))
    be_dtype = header.dtype.newbyteorder(">")
    with open_idx(path) as f:
        f.read(header.header_bytes)
        done = 0
        while done < header.count:
            rows = min(rows_per_chunk, header.count - done)
            nbytes = rows * row_items * header.dtype.itemsize
            buf = _read_up_to(f, nbytes, path)
            got = len(buf)
            if got != nbytes:
                expected = header.header_bytes + header.payload_bytes
                arrived = header.header_bytes + done * row_items * header.dtype.itemsize + got
                raise IdxFormatError(
                    f"{path}: expected {expected} bytes of content for shape {header.shape}, "
                    f"got {arrived} (truncated)"
                )
            chunk = np.frombuffer(buf, dtype=be_dtype).reshape((rows, *header.item_shape))
            yield chunk if be_dtype.itemsize == 1 else chunk.astype(header.dtype)
            done += rows
        try:
            extra = len(f.read(1 << 16))
        except _READ_ERRORS as e:
            raise IdxFormatError(
                f"{path}: expected a valid gzip stream, got {_describe(e)}"
            ) from None
        if extra:
            raise IdxFormatError(
                f"{path}: expected the content to end after {header.count} items, "
                "got trailing bytes"
            )


def _read_up_to(f: BinaryIO, n: int, path: Path) -> bytearray:
    """Read up to ``n`` bytes. Memory grows with what arrives, not with what the header
    claims, so a corrupt (gzip) header fails as truncated instead of exhausting memory."""
    buf = bytearray()
    while len(buf) < n:
        try:
            piece = f.read(min(n - len(buf), _READ_PIECE))
        except _READ_ERRORS as e:
            raise IdxFormatError(
                f"{path}: expected a valid gzip stream, got {_describe(e)}"
            ) from None
        if not piece:
            break
        buf += piece
    return buf


def read_idx(path: Path) -> np.ndarray:
    """Read a whole idx file into memory. Shape and dtype as in the header (native order)."""
    header = read_header(path)
    chunks = list(iter_idx(path, rows_per_chunk=max(1, header.count)))
    if not chunks:
        return np.empty(header.shape, dtype=header.dtype)
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def encode_idx(array: np.ndarray) -> bytes:
    """Encode ``array`` as idx bytes (uncompressed). Its dtype must be an idx type."""
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _CODES:
        raise ValueError(f"expected an idx dtype (u1, i1, >i2, >i4, >f4, >f8), got {array.dtype}")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"expected 1 to 255 dimensions, got {array.ndim}")
    out = io.BytesIO()
    out.write(bytes([0, 0, _CODES[native], array.ndim]))
    out.write(np.asarray(array.shape, dtype=">u4").tobytes())
    out.write(np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes())
    return out.getvalue()


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> None:
    """Write ``array`` to ``path`` as an idx file, gzip-compressed if ``compress``."""
    data = encode_idx(array)
    if compress:
        data = gzip.compress(data, compresslevel=6, mtime=0)
    Path(path).write_bytes(data)
