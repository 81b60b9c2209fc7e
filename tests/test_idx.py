"""The idx reader and writer: property-based round trips and every way a file can be wrong."""

from __future__ import annotations

import gzip
import math
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.errors import IdxFormatError, InputError
from pipeline.idx import (
    IDX_TYPES,
    encode_idx,
    is_gzip,
    iter_idx,
    read_header,
    read_idx,
    write_idx,
)

# type code -> (numpy dtype, struct format char): the struct side is an independent encoder.
TYPES = {
    0x08: (np.dtype(">u1"), "B"),
    0x09: (np.dtype(">i1"), "b"),
    0x0B: (np.dtype(">i2"), "h"),
    0x0C: (np.dtype(">i4"), "i"),
    0x0D: (np.dtype(">f4"), "f"),
    0x0E: (np.dtype(">f8"), "d"),
}
CODES = sorted(TYPES)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_type_table_matches_the_idx_spec() -> None:
    assert {code: dt.str for code, dt in IDX_TYPES.items()} == {
        code: dt.str for code, (dt, _) in TYPES.items()
    }


def _arrays(code: int, *, min_dims: int = 1, max_dims: int = 4) -> st.SearchStrategy:
    dtype = TYPES[code][0]
    return hnp.arrays(
        dtype=st.sampled_from([dtype, dtype.newbyteorder("=")]),
        shape=hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0, max_side=7),
    )


def _reference_encode(code: int, array: np.ndarray) -> bytes:
    """idx bytes built with struct, independently of pipeline.idx."""
    fmt = TYPES[code][1]
    flat = array.ravel().tolist()
    return (
        struct.pack(">BBBB", 0, 0, code, array.ndim)
        + struct.pack(f">{array.ndim}I", *array.shape)
        + struct.pack(f">{len(flat)}{fmt}", *flat)
    )


def _same(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal shape, native dtype of the same kind/size, and bit-identical values (NaNs too)."""
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype.newbyteorder("=")
    assert actual.dtype.isnative
    assert actual.tobytes() == expected.astype(actual.dtype).tobytes()


@pytest.mark.parametrize("code", CODES, ids=[f"0x{c:02X}" for c in CODES])
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
@SETTINGS
@given(data=st.data())
def test_round_trip_every_type(code: int, compress: bool, data: st.DataObject) -> None:
    array = data.draw(_arrays(code), label="array")
    rows = data.draw(st.integers(1, 9), label="rows_per_chunk")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.idx"
        write_idx(path, array, compress=compress)
        assert is_gzip(path) == compress
        header = read_header(path)
        assert header.shape == array.shape
        assert header.dtype == array.dtype.newbyteorder("=")
        assert header.header_bytes == 4 + 4 * array.ndim
        whole = read_idx(path)
        _same(whole, array)
        chunks = list(iter_idx(path, rows_per_chunk=rows))
    n = array.shape[0]
    assert len(chunks) == math.ceil(n / rows)
    for i, chunk in enumerate(chunks):
        assert chunk.shape == (min(rows, n - i * rows), *array.shape[1:])
        assert chunk.dtype.isnative
    if chunks:
        _same(np.concatenate(chunks), array)


@pytest.mark.parametrize("code", CODES, ids=[f"0x{c:02X}" for c in CODES])
@SETTINGS
@given(data=st.data())
def test_encoding_matches_an_independent_encoder(code: int, data: st.DataObject) -> None:
    array = data.draw(_arrays(code, max_dims=3), label="array")
    expected = _reference_encode(code, array)
    assert encode_idx(array) == expected
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ref.idx"
        path.write_bytes(expected)
        _same(read_idx(path), array)
        gz = Path(d) / "ref.idx.gz"
        gz.write_bytes(gzip.compress(expected))
        _same(read_idx(gz), array)


@SETTINGS
@given(
    values=hnp.arrays(np.uint8, st.integers(0, 300)),
    rows=st.integers(1, 400),
    compress=st.booleans(),
)
def test_iter_idx_one_dimensional_chunks_equal_read_idx(
    values: np.ndarray, rows: int, compress: bool
) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "labels"
        write_idx(path, values, compress=compress)
        chunks = list(iter_idx(path, rows_per_chunk=rows))
        whole = read_idx(path)
    assert whole.shape == values.shape
    np.testing.assert_array_equal(whole, values)
    assert [len(c) for c in chunks] == [
        min(rows, len(values) - s) for s in range(0, len(values), rows)
    ]
    if chunks:
        np.testing.assert_array_equal(np.concatenate(chunks), values)


def test_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    array = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    raw_named_gz = tmp_path / "raw.gz"
    gz_named_raw = tmp_path / "compressed.idx"
    write_idx(raw_named_gz, array, compress=False)
    write_idx(gz_named_raw, array, compress=True)
    assert not is_gzip(raw_named_gz) and is_gzip(gz_named_raw)
    np.testing.assert_array_equal(read_idx(raw_named_gz), array)
    np.testing.assert_array_equal(read_idx(gz_named_raw), array)


def test_encode_rejects_non_idx_dtypes_and_scalars() -> None:
    with pytest.raises(ValueError, match="expected an idx dtype"):
        encode_idx(np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="expected an idx dtype"):
        encode_idx(np.zeros(3, dtype=np.uint16))
    with pytest.raises(ValueError, match="expected 1 to 255 dimensions"):
        encode_idx(np.uint8(3))


def test_rows_per_chunk_must_be_positive(tmp_path: Path) -> None:
    path = tmp_path / "x"
    write_idx(path, np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="rows_per_chunk"):
        next(iter_idx(path, rows_per_chunk=0))


# ----------------------------------------------------------------------------- failures

GOOD = encode_idx(np.arange(60, dtype=np.uint8).reshape(5, 3, 4))  # 16 header + 60 payload


def _check_all_readers(path: Path, *patterns: str) -> None:
    """read_idx and iter_idx must both raise IdxFormatError naming the file and the pattern."""
    for reader in (read_idx, lambda p: list(iter_idx(p, rows_per_chunk=2))):
        with pytest.raises(IdxFormatError) as info:
            reader(path)
        message = str(info.value)
        assert "expected" in message
        assert str(path) in message
        assert "\n" not in message
        for pattern in patterns:
            assert pattern in message, message
    assert issubclass(IdxFormatError, InputError)  # exit code 2 in the jobs


@pytest.mark.parametrize(
    "magic", [b"\x01\x00\x08\x03", b"\x00\x01\x08\x03", b"\xff\xd8\xff\xe0", b"PK\x03\x04"]
)
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_wrong_magic(tmp_path: Path, magic: bytes, compress: bool) -> None:
    data = magic + GOOD[4:]
    path = tmp_path / "bad"
    path.write_bytes(gzip.compress(data) if compress else data)
    _check_all_readers(path, "expected idx magic", f"0x{magic.hex()}")


@pytest.mark.parametrize("code", [0x00, 0x07, 0x0A, 0x0F, 0xFF])
def test_unknown_type_code(tmp_path: Path, code: int) -> None:
    path = tmp_path / "bad"
    path.write_bytes(bytes([0, 0, code, 3]) + GOOD[4:])
    _check_all_readers(path, "expected idx type code", f"got 0x{code:02X}")


def test_zero_dimensions(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x00\x00\x08\x00" + b"\x07")
    _check_all_readers(path, "expected at least 1 dimension, got 0")


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"", "expected 4 bytes of idx magic, got 0"),
        (b"\x00\x00", "expected 4 bytes of idx magic, got 2"),
        (GOOD[:4], "expected 12 bytes of idx dimensions, got 0"),
        (GOOD[:9], "expected 12 bytes of idx dimensions, got 5"),
    ],
    ids=["empty", "half-magic", "no-dims", "half-dims"],
)
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_truncated_header(tmp_path: Path, data: bytes, what: str, compress: bool) -> None:
    path = tmp_path / "bad"
    path.write_bytes(gzip.compress(data) if compress else data)
    _check_all_readers(path, what, "truncated")


@pytest.mark.parametrize("cut", [1, 12, 59, 60])
def test_truncated_payload_raw(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "bad"
    path.write_bytes(GOOD[:-cut])
    _check_all_readers(path, "truncated", f"expected {len(GOOD)} bytes", f"got {len(GOOD) - cut}")
    with pytest.raises(IdxFormatError, match="truncated"):
        read_header(path)  # the header alone already knows a raw file is short


@pytest.mark.parametrize("cut", [1, 12, 59, 60])
def test_truncated_payload_gzip(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(GOOD[:-cut]))
    _check_all_readers(path, "truncated", f"expected {len(GOOD)} bytes", f"got {len(GOOD) - cut}")


def test_truncated_gzip_payload_fails_after_good_chunks(tmp_path: Path) -> None:
    """Streaming yields the complete chunks, then raises where the content ends."""
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(GOOD[:-5]))  # 4 complete rows of 12 bytes, then 7 bytes
    it = iter_idx(path, rows_per_chunk=1)
    got = [next(it) for _ in range(4)]
    np.testing.assert_array_equal(np.concatenate(got), np.arange(48).reshape(4, 3, 4))
    with pytest.raises(IdxFormatError, match="truncated"):
        next(it)


def test_corrupt_header_claiming_huge_count_is_a_format_error(tmp_path: Path) -> None:
    """A gzip file whose header claims ~70 TB must fail as truncated, not with MemoryError."""
    header = bytes([0, 0, 0x08, 2]) + struct.pack(">II", 0xFFFFFFFF, 1 << 14)
    path = tmp_path / "huge.gz"
    path.write_bytes(gzip.compress(header + b"x" * 100))
    _check_all_readers(path, "truncated")


@pytest.mark.parametrize("extra", [b"\x00", b"\x01\x02\x03", b"\x00" * 5000])
def test_trailing_bytes_raw(tmp_path: Path, extra: bytes) -> None:
    path = tmp_path / "bad"
    path.write_bytes(GOOD + extra)
    _check_all_readers(path, "trailing bytes", f"got {len(GOOD) + len(extra)}")
    with pytest.raises(IdxFormatError, match="trailing"):
        read_header(path)


@pytest.mark.parametrize("extra", [b"\x00", b"\x01\x02\x03", b"\x00" * 100_000])
def test_trailing_bytes_gzip(tmp_path: Path, extra: bytes) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(GOOD + extra))
    _check_all_readers(path, "trailing bytes", "after 5 items")


def test_trailing_garbage_after_the_gzip_stream(tmp_path: Path) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(GOOD) + b"garbage")
    _check_all_readers(path, "expected a valid gzip stream")


@pytest.mark.parametrize(
    "make",
    [
        lambda good: b"\x1f\x8b" + b"this is not a deflate stream at all",
        lambda good: good[:10] + b"\xff" * 64,  # valid gzip header, corrupt deflate data
        lambda good: good[:-8] + b"\x00\x00\x00\x00" + good[-4:],  # wrong CRC
        lambda good: good[: len(good) // 2],  # compressed stream cut short
    ],
    ids=["magic-then-garbage", "corrupt-deflate", "bad-crc", "cut-stream"],
)
def test_bad_gzip(tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.gz"
    path.write_bytes(make(gzip.compress(GOOD, mtime=0)))
    _check_all_readers(path, "expected a valid gzip stream")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.idx"
    _check_all_readers(path, "no such file")
    with pytest.raises(IdxFormatError, match="expected an idx file"):
        read_header(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    _check_all_readers(tmp_path)


def test_header_is_read_without_the_payload(tmp_path: Path) -> None:
    """read_header of a huge raw file only stats it; the streamed read stays chunked."""
    path = tmp_path / "big"
    array = np.arange(1000 * 7, dtype=">f8").reshape(1000, 7)
    write_idx(path, array)
    header = read_header(path)
    assert (header.count, header.item_shape, header.payload_bytes) == (1000, (7,), 56000)
    sizes = [len(c) for c in iter_idx(path, rows_per_chunk=333)]
    assert sizes == [333, 333, 333, 1]
