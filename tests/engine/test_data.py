"""XMC text format: round trips, streaming at every split point, gzip handling, and every error kind."""

from __future__ import annotations

import gzip
import pickle
import zlib

import numpy as np
import pytest

from engine.data import (
    INFLATE_PIECE,
    XMCParseError,
    XMCStreamParser,
    XMCTooLargeError,
    format_xmc_rows,
    parse_xmc_bytes,
    read_xmc,
    write_xmc,
)
from engine.sparse import Dataset

ARRAYS = ("x_indptr", "x_indices", "x_values", "y_indptr", "y_indices")


def assert_same(a: Dataset, b: Dataset) -> None:
    assert (a.num_features, a.num_labels) == (b.num_features, b.num_labels)
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def random_dataset(seed: int, n: int = 300, d: int = 1000, n_labels: int = 200) -> Dataset:
    """Sorted rows, with some points lacking labels, features or both; values of every magnitude."""
    rng = np.random.default_rng(seed)
    nf = rng.integers(0, 30, n)
    nl = rng.integers(0, 6, n)
    nf[::17] = 0
    nl[::13] = 0
    xi = [np.sort(rng.choice(d, k, replace=False)) for k in nf]
    yi = [np.sort(rng.choice(n_labels, k, replace=False)) for k in nl]
    nnz = int(nf.sum())
    mags = 10.0 ** rng.integers(-12, 12, nnz)
    xv = (rng.standard_normal(nnz) * mags).astype(np.float32)
    xv[::7] = np.round(xv[::7], 2)
    return Dataset(
        np.concatenate([[0], np.cumsum(nf)]).astype(np.int64),
        np.concatenate(xi).astype(np.int32),
        xv,
        np.concatenate([[0], np.cumsum(nl)]).astype(np.int64),
        np.concatenate(yi).astype(np.int32),
        d,
        n_labels,
    )


def naive_parse(text: str):
    """Pure-Python reference: sorted ids per row, empty lines skipped."""
    lines = text.splitlines()
    n, d, n_labels = map(int, lines[0].split())
    xi, xv, yi, xp, yp = [], [], [], [0], [0]
    for line in lines[1:]:
        if line == "":
            continue
        toks = line.replace("\t", " ").split(" ")
        labels = []
        if toks[0] and ":" not in toks[0]:
            labels = [int(t) for t in toks[0].split(",")]
            toks = toks[1:]
        feats = sorted((int(t.split(":")[0]), np.float32(float(t.split(":")[1]))) for t in toks if t)
        xi += [f for f, _ in feats]
        xv += [v for _, v in feats]
        yi += sorted(labels)
        xp.append(len(xi))
        yp.append(len(yi))
    assert len(xp) - 1 == n
    return Dataset(
        np.array(xp, np.int64),
        np.array(xi, np.int32),
        np.array(xv, np.float32),
        np.array(yp, np.int64),
        np.array(yi, np.int32),
        d,
        n_labels,
    )


SMALL = b"6 20 8\n1,3 0:1.5 7:0.25 19:3e-2\n 2:1 4:-0.5\n5:0.125 6:2\n0,7\n\n \n4 12:1E+2\t13:.5 14:7.\n"


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_write_read_round_trip_plain_and_gzip(tmp_path, seed):
    ds = random_dataset(seed)
    plain = write_xmc(ds, tmp_path / "d.txt")
    packed = write_xmc(ds, tmp_path / "d.txt.gz")
    assert packed.read_bytes()[:2] == b"\x1f\x8b" and plain.read_bytes()[:2] != b"\x1f\x8b"
    assert_same(read_xmc(plain), ds)
    assert_same(read_xmc(packed), ds)
    assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()


def test_gzip_is_detected_by_magic_bytes_not_name(tmp_path):
    ds = random_dataset(2, n=40)
    disguised = write_xmc(ds, tmp_path / "looks_plain.txt", gzip=True)
    plain_gz_name = write_xmc(ds, tmp_path / "looks_packed.gz", gzip=False)
    assert disguised.read_bytes()[:2] == b"\x1f\x8b"
    assert plain_gz_name.read_bytes()[:2] != b"\x1f\x8b"
    assert_same(read_xmc(disguised), ds)
    assert_same(read_xmc(plain_gz_name), ds)


def test_gzip_output_is_deterministic(tmp_path):
    ds = random_dataset(3, n=50)
    a = write_xmc(ds, tmp_path / "a.gz").read_bytes()
    b = write_xmc(ds, tmp_path / "b.gz").read_bytes()
    assert a == b


def test_every_float32_value_round_trips_with_short_text():
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    vals = bits.view(np.float32)
    vals = vals[np.isfinite(vals)]
    extremes = np.array(
        [
            np.finfo(np.float32).max,
            -np.finfo(np.float32).max,
            np.finfo(np.float32).tiny,
            np.float32(1e-45),
            1.0,
            0.1,
            1e15,
            1e16,
            123456789.0,
            0.0,
            -0.0,
            1e-5,
            9.99999e-6,
        ],
        dtype=np.float32,
    )
    vals = np.concatenate([vals, extremes])
    n = len(vals)
    ds = Dataset(
        np.arange(n + 1, dtype=np.int64),
        np.zeros(n, np.int32),
        vals,
        np.zeros(n + 1, np.int64),
        np.zeros(0, np.int32),
        1,
        1,
    )
    text = format_xmc_rows(ds)
    back = parse_xmc_bytes(f"{n} 1 1\n".encode() + text)
    np.testing.assert_array_equal(back.x_values.view(np.uint32)[vals != 0], vals.view(np.uint32)[vals != 0])
    assert np.all(back.x_values[vals == 0] == 0)
    # shortest form: simple decimals come out as written
    simple = np.array([0.5, 0.1, 3.0, 100.0, 0.001, 1.5e-7, 2.5e20], dtype=np.float32)
    ds = Dataset(
        np.arange(8, dtype=np.int64), np.zeros(7, np.int32), simple, np.zeros(8, np.int64), np.zeros(0, np.int32), 1, 1
    )
    assert format_xmc_rows(ds).split() == [b"0:0.5", b"0:0.1", b"0:3", b"0:100", b"0:0.001", b"0:1.5e-7", b"0:2.5e20"]


def test_write_rejects_nonfinite_values(tmp_path):
    ds = Dataset(
        np.array([0, 1], np.int64),
        np.array([0], np.int32),
        np.array([np.nan], np.float32),
        np.array([0, 0], np.int64),
        np.zeros(0, np.int32),
        1,
        1,
    )
    with pytest.raises(ValueError, match="NaN or infinity"):
        write_xmc(ds, tmp_path / "x.txt")


# --- accepted variants ---------------------------------------------------------------------


def test_small_file_variants_match_naive_parser():
    ds = parse_xmc_bytes(SMALL)
    assert_same(ds, naive_parse(SMALL.decode()))
    assert ds.num_points == 6
    np.testing.assert_array_equal(ds.y_indptr, [0, 2, 2, 2, 4, 4, 5])  # feature-only line has no labels
    np.testing.assert_array_equal(ds.x_indptr, [0, 3, 5, 7, 7, 7, 10])  # labels-only and blank-only rows
    np.testing.assert_array_equal(ds.x_values[7:], np.float32([100, 0.5, 7]))


def test_unsorted_ids_are_stored_sorted_with_values_following():
    ds = parse_xmc_bytes(b"1 10 10\n7,2,5 9:0.9 1:0.1 4:0.4\n")
    np.testing.assert_array_equal(ds.x_indices, [1, 4, 9])
    np.testing.assert_array_equal(ds.x_values, np.float32([0.1, 0.4, 0.9]))
    np.testing.assert_array_equal(ds.y_indices, [2, 5, 7])


def test_crlf_bom_and_missing_final_newline():
    a = parse_xmc_bytes(b"\xef\xbb\xbf2 5 5\r\n1 0:1\r\n 2:2")
    b = parse_xmc_bytes(b"2 5 5\n1 0:1\n 2:2\n")
    assert_same(a, b)


def test_random_texts_match_naive_parser():
    rng = np.random.default_rng(11)
    for _ in range(20):
        n = int(rng.integers(1, 30))
        lines = [f"{n} 50 20"]
        for _ in range(n):
            labels = ",".join(map(str, rng.choice(20, rng.integers(0, 4), replace=False)))
            feats = [
                f"{f}:{rng.standard_normal():.{rng.integers(0, 9)}g}"
                for f in rng.choice(50, rng.integers(0, 8), replace=False)
            ]
            sep = " \t"[int(rng.integers(0, 2))] * int(rng.integers(1, 3))
            lead = " " if not labels and (not feats or rng.random() < 0.5) else ""
            lines.append((labels or lead) + "".join(sep + f for f in feats))
        text = "\n".join(lines) + "\n" * int(rng.integers(0, 3))
        assert_same(parse_xmc_bytes(text.encode()), naive_parse(text))


def test_capacity_grows_past_initial_allocation():
    ds = random_dataset(4, n=5000, d=100_000, n_labels=50_000)
    text = f"{ds.num_points} {ds.num_features} {ds.num_labels}\n".encode() + format_xmc_rows(ds)
    assert_same(parse_xmc_bytes(text), ds)


def test_empty_dataset_is_valid():
    ds = parse_xmc_bytes(b"0 10 4\n")
    assert ds.num_points == 0 and ds.num_features == 10 and ds.num_labels == 4


# --- streaming -----------------------------------------------------------------------------


def test_stream_every_split_point_equals_one_shot():
    expected = parse_xmc_bytes(SMALL)
    for cut in range(len(SMALL) + 1):
        p = XMCStreamParser()
        p.feed(SMALL[:cut])
        p.feed(SMALL[cut:])
        assert_same(p.finish(), expected)
        assert p.bytes_seen == len(SMALL)


def test_stream_three_way_splits_and_byte_by_byte():
    expected = parse_xmc_bytes(SMALL)
    for i in range(0, len(SMALL), 3):
        for j in range(i, len(SMALL), 5):
            p = XMCStreamParser()
            for part in (SMALL[:i], SMALL[i:j], SMALL[j:]):
                p.feed(part)
            assert_same(p.finish(), expected)
    p = XMCStreamParser()
    for k in range(len(SMALL)):
        p.feed(SMALL[k : k + 1])
    assert_same(p.finish(), expected)


def test_gzip_stream_every_split_point():
    packed = gzip.compress(SMALL, mtime=0)
    expected = parse_xmc_bytes(SMALL)
    for cut in range(len(packed) + 1):
        p = XMCStreamParser()  # gzip detected from the first two bytes, even when they arrive apart
        p.feed(packed[:cut])
        p.feed(packed[cut:])
        assert_same(p.finish(), expected)
        assert p.raw_bytes_seen == len(packed) and p.bytes_seen == len(SMALL)


def test_concatenated_gzip_members_are_one_stream():
    head, body = SMALL[:40], SMALL[40:]
    packed = gzip.compress(head, mtime=0) + gzip.compress(body, mtime=0)
    assert_same(parse_xmc_bytes(packed), parse_xmc_bytes(SMALL))


def test_gzip_bomb_is_stopped_while_inflating():
    line = b"0,1 0:1 1:1 2:1 3:1\n"
    copies = (64 << 20) // len(line)
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    packed = comp.compress(f"{copies} 4 2\n".encode())
    block = line * 50_000
    for _ in range(copies // 50_000):
        packed += comp.compress(block)
    packed += comp.flush()
    assert len(packed) < (1 << 20)  # ~64 MB of text in well under 1 MB
    limit = 2 << 20
    p = XMCStreamParser(max_bytes=limit, gzip=True)
    with pytest.raises(XMCTooLargeError) as err:
        p.feed(packed)  # one call: the limit must be enforced between inflate pieces
    assert err.value.limit == limit
    assert limit < p.bytes_seen <= limit + INFLATE_PIECE
    assert "once decompressed" in str(err.value)
    with pytest.raises(RuntimeError, match="create a new one"):
        p.feed(b"more")


def test_max_bytes_applies_to_plain_text_too():
    p = XMCStreamParser(max_bytes=len(SMALL) - 1)
    p.feed(SMALL[:10])
    with pytest.raises(XMCTooLargeError):
        p.feed(SMALL[10:])
    assert parse_xmc_bytes(SMALL, max_bytes=len(SMALL)).num_points == 6


def test_truncated_gzip_fails_at_finish():
    packed = gzip.compress(SMALL, mtime=0)
    p = XMCStreamParser()
    p.feed(packed[: len(packed) - 12])
    with pytest.raises(XMCParseError, match="truncated") as err:
        p.finish()
    assert err.value.line is None


def test_corrupt_gzip_is_a_parse_error():
    packed = bytearray(gzip.compress(SMALL * 20, mtime=0))
    packed[20:40] = b"\xff" * 20
    with pytest.raises(XMCParseError, match="gzip"):
        parse_xmc_bytes(bytes(packed))


def test_forced_plain_mode_does_not_inflate():
    with pytest.raises(XMCParseError) as err:
        p = XMCStreamParser(gzip=False)
        p.feed(gzip.compress(SMALL))
        p.finish()
    assert err.value.line == 1


# --- errors --------------------------------------------------------------------------------

ERRORS = [
    # (text, line, column, fragment of the message)
    (b"", 1, None, "empty input"),
    (b"3 10\n", 1, None, "header must be"),
    (b"3 ten 5\n1 0:1\n", 1, None, "header must be"),
    (b"1 0:1 2:3\n", 1, None, "header missing"),
    (b"1 3000000000 5\n", 1, None, "int32"),
    (b"2 10 5\n1 0:1\n", 3, None, "declares 2 points but the file ends after 1"),
    (b"2 10 5\n", 2, None, "declares 2 points but the file ends after 0"),
    (b"1 10 5\n1 0:1\n2 3:1\n3 4:4\n", 3, None, "more points than the 1 declared"),
    (b"2 10 5\n1 0:1\n1 x:1\n", 3, 3, "expected a number in 'x:1'"),
    (b"2 10 5\n1 0:1\nq 1:1\n", 3, 1, "expected a number in 'q'"),
    (b"2 10 5\n1 0:1\n1 1:abc\n", 3, 5, "expected a number in '1:abc'"),
    (b"1 10 5\n1 0:1 4 2:1\n", 2, 7, "has no ':'"),
    (b"1 10 5\n1 0:1 4a:1\n", 2, 8, "not a non-negative integer"),
    (b"2 10 5\n0 1:1\n1 3:1 10:0.5\n", 3, 7, "feature index 10 >= num_features 10 declared in the header"),
    (b"1 10 5\n1 99999999999999999999999:1\n", 2, 3, "feature index 99999999999999999999999 >= num_features"),
    (b"1 10 5\n2,5 3:1\n", 2, 3, "label 5 >= num_labels 5 declared in the header"),
    (b"1 10 5\n-1 3:1\n", 2, 1, "negative label"),
    (b"1 10 5\n1 -3:1\n", 2, 3, "negative feature index"),
    (b"1 10 5\n1 3:nan\n", 2, 5, "not finite"),
    (b"1 10 5\n1 3:-Inf\n", 2, 5, "not finite"),
    (b"1 10 5\n1 3:1e39\n", 2, 5, "float32 range"),
    (b"1 10 5\n1 3:0.5 4:1 3:0.25\n", 2, 13, "feature index 3 appears more than once"),
    (b"1 10 5\n1,4,1 3:0.5\n", 2, 5, "label 1 appears more than once"),
    (b"1 10 5\n1,,2 3:1\n", 2, 3, "after ','"),
    (b"1 10 5\n1, 3:1\n", 2, 3, "after ','"),
    (b"1 10 5\n1;2 3:1\n", 2, 2, "unexpected character ';'"),
    (b"1 10 5\n1 3:1:2\n", 2, 6, "after the value"),
]


@pytest.mark.parametrize("text,line,column,fragment", ERRORS, ids=[e[3][:30] for e in ERRORS])
def test_error_kinds_report_line_and_column(text, line, column, fragment):
    with pytest.raises(XMCParseError) as err:
        parse_xmc_bytes(text)
    e = err.value
    assert isinstance(e, ValueError)
    assert fragment in str(e)
    assert (e.line, e.column) == (line, column)
    assert str(e).startswith(f"line {line}")


def test_error_message_format_and_pickling():
    with pytest.raises(XMCParseError) as err:
        parse_xmc_bytes(b"2 135909 10\n1 0:1\n1 135909:0.5\n")
    e = err.value
    assert str(e) == "line 3, column 3: feature index 135909 >= num_features 135909 declared in the header"
    assert e.reason == "feature index 135909 >= num_features 135909 declared in the header"
    again = pickle.loads(pickle.dumps(e))
    assert (again.line, again.column, again.reason) == (3, 3, e.reason)


def test_error_line_numbers_count_blank_lines_and_chunks():
    text = b"3 10 5\n1 0:1\n\n\n2 1:1\n3 11:1\n"
    for cut in range(len(text) + 1):
        p = XMCStreamParser()
        with pytest.raises(XMCParseError) as err:
            p.feed(text[:cut])
            p.feed(text[cut:])
            p.finish()
        assert err.value.line == 6, cut


def test_huge_declared_point_count_does_not_preallocate():
    p = XMCStreamParser()
    p.feed(b"1000000000000 10 5\n1 0:1\n")
    assert len(p._x_indptr) <= (1 << 16) + 1
    with pytest.raises(XMCParseError, match="declares 1000000000000 points"):
        p.finish()
