"""Extreme Classification Repository text format <-> `Dataset` CSR arrays, one-shot or streamed.

The format (http://manikvarma.org/downloads/XC/XMLRepository.html)::

    N D L                      line 1: points, features, labels
    l1,l2,l3 f:v f:v ...       one point per line, 0-based ids
     f:v f:v                   no labels: the line starts with a space (or tab)
    f:v f:v                    no labels, written without the leading space: also accepted
    l1,l2                      labels and no features: accepted

Why a numba kernel: a Python loop over tokens parses ~1 MB/s; Amazon-670K's training file is ~600 MB.
`_parse_lines` walks a uint8 buffer byte by byte and writes straight into the growing CSR arrays,
so memory is bounded by the output (plus one incomplete line kept between chunks).

Conventions (the same for `read_xmc`, `parse_xmc_bytes` and `XMCStreamParser`):
- Each row's feature ids and label ids are stored in ascending order, whatever the input order
  (values follow their ids). Repeating an id within a line is an error.
- Empty lines (nothing but an optional '\\r') are skipped and not counted as points; a point with
  neither labels nor features is a line holding whitespace only (that is how `write_xmc` writes it).
  Line numbers in errors always count every physical line, header = line 1.
- '\\r\\n' line endings and a UTF-8 byte order mark are accepted.
- Values are parsed to float64 from at most 18 significant digits, then rounded to float32.
  NaN, infinities and values beyond the float32 range are errors.
"""

from __future__ import annotations

import gzip as _gzip
import os
import zlib
from pathlib import Path

import numpy as np

from engine._numba import kernel
from engine.sparse import Dataset

__all__ = [
    "XMCParseError",
    "XMCTooLargeError",
    "XMCStreamParser",
    "parse_xmc_bytes",
    "read_xmc",
    "write_xmc",
    "format_xmc_rows",
]

GZIP_MAGIC = b"\x1f\x8b"
MAX_ID = 2**31 - 1
"""Ids are stored as int32, so declared dimensions must not exceed this."""
READ_CHUNK = 1 << 20
INFLATE_PIECE = 1 << 20
"""Inflate at most this many bytes per step, so a gzip bomb is stopped within one piece of the limit."""

# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class XMCParseError(ValueError):
    """The input is not valid XMC text.

    `line`: 1-based line number in the (decompressed) text, header = line 1; None for problems of the
    stream as a whole (corrupt or truncated gzip). `column`: 1-based byte column in that line, or None.
    `reason`: what is wrong and how to fix it, without the line prefix.
    """

    def __init__(self, line: int | None, reason: str, column: int | None = None):
        self.line = line
        self.column = column
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.line is None:
            return self.reason
        where = f"line {self.line}" if self.column is None else f"line {self.line}, column {self.column}"
        return f"{where}: {self.reason}"

    def __reduce__(self):
        return (type(self), (self.line, self.reason, self.column))


class XMCTooLargeError(XMCParseError):
    """The (decompressed) text passed `limit` bytes; raised as soon as that happens, not after reading all."""

    def __init__(self, line: int | None, reason: str, column: int | None = None, limit: int = 0):
        self.limit = limit
        super().__init__(line, reason, column)

    def __reduce__(self):
        return (type(self), (self.line, self.reason, self.column, self.limit))


# Kernel status codes. The kernel reports a code, the line's start offset, the 1-based column and one
# integer (the offending id); `_raise_kernel_error` turns that into a message.
OK = 0
NEED_SPACE = 1
E_NUMBER = 2  # expected a digit
E_COLON = 3  # feature token without ':'
E_FEATURE_RANGE = 4
E_LABEL_RANGE = 5
E_NEGATIVE_FEATURE = 6
E_NEGATIVE_LABEL = 7
E_NONFINITE = 8
E_VALUE_RANGE = 9
E_DUP_FEATURE = 10
E_DUP_LABEL = 11
E_TOO_MANY_POINTS = 12
E_LABEL_AFTER_COMMA = 13
E_AFTER_VALUE = 14
E_AFTER_LABEL = 15
E_FEATURE_ID = 16  # feature id followed by something other than ':'

_CLAMP = 1 << 40  # ids are accumulated up to this, so a 30-digit id cannot overflow int64

_POW10 = np.array([10.0**i for i in range(23)], dtype=np.float64)  # exact in float64


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@kernel
def _is_space(c):
    return c == 32 or c == 9  # ' ' or '\t'


@kernel
def _decimal_to_float(mantissa, exp10, pow10):
    """mantissa * 10**exp10 in float64, correctly rounded when mantissa < 2**53 and abs(exp10) <= 22.

    Shared by the parser and the writer, so what the writer checks is what the parser will compute.
    """
    if mantissa == 0:
        return 0.0
    m = float(mantissa)
    if 0 <= exp10 <= 22:
        return m * pow10[exp10]
    if -22 <= exp10 < 0:
        return m / pow10[-exp10]
    if exp10 > 0:
        if exp10 > 400:
            return np.inf
        return m * 10.0**exp10
    if exp10 < -400:
        return 0.0
    return m / 10.0 ** (-exp10)


@kernel
def _sort_row(idx, val, start, stop, has_values):
    """Sort idx[start:stop] ascending (val along) in place; return the first repeated id or -1.

    Rows are usually already sorted, so a strictly-increasing check comes first and costs one pass.
    """
    increasing = True
    for i in range(start + 1, stop):
        if idx[i] <= idx[i - 1]:
            increasing = False
            break
    if increasing:
        return -1
    order = np.argsort(idx[start:stop], kind="mergesort")
    si = idx[start:stop][order]
    idx[start:stop] = si
    if has_values:
        sv = val[start:stop][order]
        val[start:stop] = sv
    for i in range(start + 1, stop):
        if idx[i] == idx[i - 1]:
            return idx[i]
    return -1


@kernel
def _parse_lines(
    buf,
    pos,
    end,
    line_no,
    max_points,
    num_features,
    num_labels,
    x_indptr,
    x_indices,
    x_values,
    y_indptr,
    y_indices,
    npts,
    nx,
    ny,
    pow10,
):
    """Parse the complete lines in buf[pos:end] (buf[end-1] is '\\n') into the CSR arrays.

    buf uint8; x_indptr/y_indptr int64 (cap_points+1,); x_indices int32, x_values float32 (cap_x,);
    y_indices int32 (cap_y,). npts/nx/ny: entries already filled. line_no: 1-based number of the line
    at buf[pos].

    Returns (status, pos, line_no, npts, nx, ny, column, value). On OK pos == end. On NEED_SPACE
    nothing of the line at `pos` was written; `column` and `value` are then the feature and label
    capacity the line may need (the caller grows the arrays and calls again from `pos`). On an error
    pos is the start of the offending line, `column` 1-based, `value` the offending id (or -1).
    """
    cap_pts = len(x_indptr) - 1
    cap_x = len(x_indices)
    cap_y = len(y_indices)
    while pos < end:
        ls = pos
        le = ls
        while buf[le] != 10:
            le += 1
        nxt = le + 1
        if le > ls and buf[le - 1] == 13:
            le -= 1
        if le == ls:  # empty line: skipped, still counted for line numbers
            pos = nxt
            line_no += 1
            continue
        n = le - ls
        need_x = nx + n // 4 + 1
        need_y = ny + n // 2 + 1
        if npts + 1 > cap_pts or need_x > cap_x or need_y > cap_y:
            return NEED_SPACE, pos, line_no, npts, nx, ny, need_x, need_y
        if npts >= max_points:
            return E_TOO_MANY_POINTS, ls, line_no, npts, nx, ny, 1, -1
        x0 = nx
        y0 = ny
        p = ls
        # --- labels: the first token, unless the line starts with blank or the token holds ':'
        if not _is_space(buf[p]):
            q = p
            has_colon = False
            while q < le and not _is_space(buf[q]):
                if buf[q] == 58:
                    has_colon = True
                    break
                q += 1
            if not has_colon:
                while True:
                    c = buf[p]
                    if c == 45:
                        return E_NEGATIVE_LABEL, ls, line_no, npts, x0, y0, p - ls + 1, -1
                    if c < 48 or c > 57:
                        return E_NUMBER, ls, line_no, npts, x0, y0, p - ls + 1, -1
                    v = 0
                    while p < le and 48 <= buf[p] <= 57:
                        if v < _CLAMP:
                            v = v * 10 + (buf[p] - 48)
                        p += 1
                    if v >= num_labels:
                        return E_LABEL_RANGE, ls, line_no, npts, x0, y0, p - ls, v
                    y_indices[ny] = v
                    ny += 1
                    if p >= le or _is_space(buf[p]):
                        break
                    if buf[p] != 44:
                        return E_AFTER_LABEL, ls, line_no, npts, x0, y0, p - ls + 1, -1
                    p += 1
                    if p >= le or _is_space(buf[p]) or buf[p] == 44:
                        return E_LABEL_AFTER_COMMA, ls, line_no, npts, x0, y0, p - ls + 1, -1
        # --- features: "id:value" tokens separated by blanks
        while True:
            while p < le and _is_space(buf[p]):
                p += 1
            if p >= le:
                break
            c = buf[p]
            if c == 45:
                return E_NEGATIVE_FEATURE, ls, line_no, npts, x0, y0, p - ls + 1, -1
            if c < 48 or c > 57:
                return E_NUMBER, ls, line_no, npts, x0, y0, p - ls + 1, -1
            v = 0
            while p < le and 48 <= buf[p] <= 57:
                if v < _CLAMP:
                    v = v * 10 + (buf[p] - 48)
                p += 1
            if p >= le or _is_space(buf[p]):
                return E_COLON, ls, line_no, npts, x0, y0, p - ls, -1
            if buf[p] != 58:
                return E_FEATURE_ID, ls, line_no, npts, x0, y0, p - ls + 1, -1
            if v >= num_features:
                return E_FEATURE_RANGE, ls, line_no, npts, x0, y0, p - ls, v
            p += 1
            vstart = p
            neg = False
            if p < le and (buf[p] == 45 or buf[p] == 43):
                neg = buf[p] == 45
                p += 1
            if p < le and (buf[p] == 110 or buf[p] == 78 or buf[p] == 105 or buf[p] == 73):  # n N i I
                return E_NONFINITE, ls, line_no, npts, x0, y0, vstart - ls + 1, -1
            mant = 0
            nd = 0  # significant digits kept in mant
            ndig = 0  # all mantissa digits seen
            exp10 = 0
            while p < le and 48 <= buf[p] <= 57:
                if nd < 18:
                    mant = mant * 10 + (buf[p] - 48)
                    if mant > 0:
                        nd += 1
                else:
                    exp10 += 1  # integer digit beyond the 18 kept: scale instead
                ndig += 1
                p += 1
            if p < le and buf[p] == 46:
                p += 1
                while p < le and 48 <= buf[p] <= 57:
                    if nd < 18:
                        mant = mant * 10 + (buf[p] - 48)
                        if mant > 0:
                            nd += 1
                        exp10 -= 1
                    ndig += 1
                    p += 1
            if ndig == 0:
                return E_NUMBER, ls, line_no, npts, x0, y0, p - ls + 1, -1
            if p < le and (buf[p] == 101 or buf[p] == 69):  # e E
                p += 1
                eneg = False
                if p < le and (buf[p] == 45 or buf[p] == 43):
                    eneg = buf[p] == 45
                    p += 1
                if p >= le or buf[p] < 48 or buf[p] > 57:
                    return E_NUMBER, ls, line_no, npts, x0, y0, p - ls + 1, -1
                e = 0
                while p < le and 48 <= buf[p] <= 57:
                    if e < 100000:
                        e = e * 10 + (buf[p] - 48)
                    p += 1
                exp10 += -e if eneg else e
            if p < le and not _is_space(buf[p]):
                return E_AFTER_VALUE, ls, line_no, npts, x0, y0, p - ls + 1, -1
            f = _decimal_to_float(mant, exp10, pow10)
            f32 = np.float32(-f if neg else f)
            if np.isinf(f32):
                return E_VALUE_RANGE, ls, line_no, npts, x0, y0, vstart - ls + 1, -1
            x_indices[nx] = v
            x_values[nx] = f32
            nx += 1
        dup = _sort_row(x_indices, x_values, x0, nx, True)
        if dup >= 0:
            return E_DUP_FEATURE, ls, line_no, npts, x0, y0, 0, dup
        dup = _sort_row(y_indices, x_values, y0, ny, False)
        if dup >= 0:
            return E_DUP_LABEL, ls, line_no, npts, x0, y0, 0, dup
        npts += 1
        x_indptr[npts] = nx
        y_indptr[npts] = ny
        pos = nxt
        line_no += 1
    return OK, pos, line_no, npts, nx, ny, 0, -1


@kernel
def _write_uint(out, o, v):
    """Decimal digits of v >= 0 at out[o:]; returns the new offset."""
    if v == 0:
        out[o] = 48
        return o + 1
    n = 0
    t = v
    while t > 0:
        n += 1
        t //= 10
    t = v
    for i in range(n - 1, -1, -1):
        out[o + i] = 48 + t % 10
        t //= 10
    return o + n


@kernel
def _shortest_digits(a, pow10):
    """Fewest significant digits (m, e) with float32(m * 10**e) == a, for finite a > 0.

    Tries 1..9 digits (9 always suffice for float32) and keeps the first that the parser's own
    conversion maps back to `a`, so write -> read is exact by construction.
    """
    x = float(a)
    e10 = int(np.floor(np.log10(x)))
    for prec in range(1, 10):
        for shift in (0, 1, -1):
            ee = e10 + shift - prec + 1  # exponent of the last kept digit
            scaled = x / _decimal_to_float(1, ee, pow10) if ee >= -22 else x * _decimal_to_float(1, -ee, pow10)
            m = np.int64(np.floor(scaled + 0.5))
            if m <= 0:
                continue
            if np.float32(_decimal_to_float(m, ee, pow10)) == a:
                while m % 10 == 0:
                    m //= 10
                    ee += 1
                return m, ee
    # unreachable for finite float32; fall back to the nearest 9-digit value
    ee = e10 - 8
    return np.int64(np.floor(x / 10.0**ee + 0.5)), ee


@kernel
def _write_value(out, o, v, pow10):
    """Shortest text that parses back to float32 v: fixed notation for 1e-5 <= |v| < 1e16, else 'd.ddde-7'."""
    if v == 0:
        out[o] = 48
        return o + 1
    if v < 0:
        out[o] = 45
        o += 1
        v = -v
    m, e = _shortest_digits(v, pow10)
    nd = 0
    t = m
    while t > 0:
        nd += 1
        t //= 10
    lead = e + nd - 1  # decimal exponent of the leading digit
    if e >= 0 and lead < 16:
        o = _write_uint(out, o, m)
        for _ in range(e):
            out[o] = 48
            o += 1
        return o
    if 0 <= lead < 16:  # e < 0: point inside the digits
        o = _write_uint(out, o, m)
        k = -e  # digits after the point
        for i in range(o - 1, o - 1 - k, -1):
            out[i + 1] = out[i]
        out[o - k] = 46
        return o + 1
    if -5 <= lead < 0:
        out[o] = 48
        out[o + 1] = 46
        o += 2
        for _ in range(-lead - 1):
            out[o] = 48
            o += 1
        return _write_uint(out, o, m)
    # scientific: d[.ddd]e[-]xx
    s = o
    o = _write_uint(out, o, m)
    if nd > 1:
        for i in range(o - 1, s, -1):
            out[i + 1] = out[i]
        out[s + 1] = 46
        o += 1
    out[o] = 101
    o += 1
    if lead < 0:
        out[o] = 45
        o += 1
        lead = -lead
    return _write_uint(out, o, lead)


BYTES_PER_FEATURE = 32  # id (10) ':' value (<= 17) ' '
BYTES_PER_LABEL = 11  # id (10) ','
BYTES_PER_LINE = 2


@kernel
def _format_rows(x_indptr, x_indices, x_values, y_indptr, y_indices, r0, r1, out, pow10):
    """Lines of points [r0, r1) into out (sized by the BYTES_PER_* bounds); returns bytes written."""
    o = 0
    for r in range(r0, r1):
        ys = y_indptr[r]
        ye = y_indptr[r + 1]
        for j in range(ys, ye):
            if j > ys:
                out[o] = 44
                o += 1
            o = _write_uint(out, o, y_indices[j])
        xs = x_indptr[r]
        xe = x_indptr[r + 1]
        for j in range(xs, xe):
            out[o] = 32
            o += 1
            o = _write_uint(out, o, x_indices[j])
            out[o] = 58
            o += 1
            o = _write_value(out, o, x_values[j], pow10)
        if ye == ys and xe == xs:
            out[o] = 32  # a point with neither labels nor features: one blank, not an empty line
            o += 1
        out[o] = 10
        o += 1
    return o


# ---------------------------------------------------------------------------------------------
# Streaming parser
# ---------------------------------------------------------------------------------------------


class XMCStreamParser:
    """Parse XMC text fed in chunks that may split lines and numbers anywhere.

    Memory: the growing CSR arrays (amortized doubling) plus the current incomplete line; the text
    itself is never accumulated. With `gzip=True` (or None and the stream starts with the gzip magic
    bytes) chunks are inflated incrementally, `INFLATE_PIECE` bytes at a time.

    `max_bytes` caps the *decompressed* text: `XMCTooLargeError` is raised by the `feed` call during
    which the limit is passed, at most one inflate piece later (gzip bomb protection).

        p = XMCStreamParser(max_bytes=2**30)
        for chunk in upload:
            p.feed(chunk)
        dataset = p.finish()
    """

    def __init__(self, max_bytes: int | None = None, gzip: bool | None = None):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be None (no limit) or >= 0; got {max_bytes}")
        self.max_bytes = max_bytes
        self._gzip = gzip
        self._inflater: zlib._Decompress | None = None
        self._pending = b""  # first byte(s) while detecting gzip
        self.bytes_seen = 0
        """Bytes of (decompressed) text fed so far."""
        self.raw_bytes_seen = 0
        """Bytes passed to `feed` (compressed size for gzip input)."""
        self._tail = bytearray()  # incomplete last line
        self._line_no = 1
        self._header: tuple[int, int, int] | None = None
        self._npts = self._nx = self._ny = 0
        self._release_buffers()  # sized once the header is read
        self._state = "open"  # open | failed | finished

    # -- public ------------------------------------------------------------------------------

    @property
    def header(self) -> tuple[int, int, int] | None:
        """(num_points, num_features, num_labels) once line 1 has been read."""
        return self._header

    @property
    def points_parsed(self) -> int:
        return self._npts

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Parse what `chunk` completes; keep the trailing incomplete line for the next call."""
        self._check_open()
        try:
            if not isinstance(chunk, (bytes, bytearray)):
                chunk = bytes(chunk)
            self.raw_bytes_seen += len(chunk)
            if self._gzip is None:
                self._pending += chunk
                if len(self._pending) < 2:
                    return
                chunk, self._pending = self._pending, b""
                self._gzip = chunk[:2] == GZIP_MAGIC
            if self._gzip:
                self._inflate(chunk)
            else:
                self._feed_text(chunk)
        except BaseException:
            self._state = "failed"
            raise

    def finish(self) -> Dataset:
        """Parse the last line (a final newline is optional), check the point count, return the Dataset."""
        self._check_open()
        try:
            if self._pending:  # a 1-byte stream: too short for gzip
                chunk, self._pending = self._pending, b""
                self._gzip = False
                self._feed_text(chunk)
            if self._gzip and self._inflater is not None and not self._inflater.eof:
                raise XMCParseError(
                    None,
                    f"the gzip stream is truncated after {self.raw_bytes_seen} bytes "
                    f"(no end-of-stream marker); the upload was cut short, send the "
                    f"whole file",
                )
            if self._tail:
                tail = bytes(self._tail) + b"\n"
                self._tail = bytearray()
                self._feed_text(tail, count=False)
            if self._header is None:
                raise XMCParseError(
                    1, "empty input: the file must start with a header line 'num_points num_features num_labels'"
                )
            n = self._header[0]
            if self._npts != n:
                raise XMCParseError(
                    self._line_no,
                    f"the header declares {n} points but the file ends after {self._npts} "
                    f"(empty lines are not points); fix the first number of the header or add the "
                    f"missing lines",
                )
            ds = self._dataset()
        except BaseException:
            self._state = "failed"
            raise
        self._state = "finished"
        return ds

    # -- gzip --------------------------------------------------------------------------------

    def _inflate(self, data: bytes | bytearray) -> None:
        """Inflate `data` INFLATE_PIECE bytes at a time, feeding each piece before inflating more."""
        while True:
            if self._inflater is None:
                if not data:
                    return
                if data[:1] != GZIP_MAGIC[:1]:
                    raise XMCParseError(
                        None, "unexpected bytes after the end of the gzip data; the upload is not a single gzip file"
                    )
                self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            d = self._inflater
            try:
                out = d.decompress(data, INFLATE_PIECE)
            except zlib.error as exc:
                raise XMCParseError(
                    None,
                    f"corrupt gzip data near input byte {self.raw_bytes_seen} "
                    f"({exc}); upload the file again or send it uncompressed",
                ) from None
            self._feed_text(out)
            if d.eof:  # a member ended; what follows is another member (as `cat a.gz b.gz`)
                data = d.unused_data
                self._inflater = None
                continue
            data = d.unconsumed_tail
            if not data and len(out) < INFLATE_PIECE:
                return

    # -- text --------------------------------------------------------------------------------

    def _feed_text(self, chunk: bytes | bytearray, count: bool = True) -> None:
        if not chunk:
            return
        if count:
            self.bytes_seen += len(chunk)
            if self.max_bytes is not None and self.bytes_seen > self.max_bytes:
                raise XMCTooLargeError(
                    None,
                    f"the data is larger than the limit of {self.max_bytes} bytes"
                    f"{' once decompressed' if self._gzip else ''}; split it into smaller files or "
                    f"raise the upload size limit",
                    limit=self.max_bytes,
                )
        first_nl = chunk.find(b"\n")
        if first_nl < 0:
            self._tail += chunk
            return
        last_nl = chunk.rfind(b"\n")
        start = 0
        if self._tail or self._header is None:
            # complete the pending line with the head of this chunk and parse it on its own
            self._tail += chunk[: first_nl + 1]
            line = bytes(self._tail)
            self._tail = bytearray()
            if self._header is None:
                self._read_header(line)
            else:
                self._parse(_readonly_u8(line), 0, len(line))
            start = first_nl + 1
        if last_nl + 1 > start:
            self._parse(_readonly_u8(chunk), start, last_nl + 1)
        self._tail += chunk[last_nl + 1 :]

    def _read_header(self, line: bytes) -> None:
        text = line.rstrip(b"\r\n")
        if text.startswith(b"\xef\xbb\xbf"):
            text = text[3:]
        parts = text.split()
        shown = text[:60].decode("utf-8", "replace")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            hint = ""
            if b":" in text:
                hint = " (this looks like a data line: is the header missing?)"
            raise XMCParseError(
                1,
                f"the header must be 'num_points num_features num_labels' (three "
                f"non-negative integers separated by spaces); got {shown!r}{hint}",
            )
        n, d, num_labels = (int(p) for p in parts)
        for name, value in (("num_features", d), ("num_labels", num_labels)):
            if value > MAX_ID:
                raise XMCParseError(
                    1,
                    f"header {name} {value} is larger than {MAX_ID}: ids are stored as "
                    f"int32; remap the ids to a dense range",
                )
        self._header = (n, d, num_labels)
        self._line_no = 2
        cap_p = min(n, 1 << 16) + 1
        self._x_indptr = np.zeros(cap_p, dtype=np.int64)
        self._y_indptr = np.zeros(cap_p, dtype=np.int64)
        self._x_indices = np.empty(1 << 16, dtype=np.int32)
        self._x_values = np.empty(1 << 16, dtype=np.float32)
        self._y_indices = np.empty(1 << 14, dtype=np.int32)

    def _parse(self, buf: np.ndarray, start: int, end: int) -> None:
        assert self._header is not None, "the header is read first"
        n, d, num_labels = self._header
        pos = start
        while True:
            status, pos, line_no, npts, nx, ny, col, val = _parse_lines(
                buf,
                pos,
                end,
                self._line_no,
                n,
                d,
                num_labels,
                self._x_indptr,
                self._x_indices,
                self._x_values,
                self._y_indptr,
                self._y_indices,
                self._npts,
                self._nx,
                self._ny,
                _POW10,
            )
            self._line_no, self._npts, self._nx, self._ny = line_no, npts, nx, ny
            if status == OK:
                return
            if status == NEED_SPACE:
                self._grow(int(col), int(val))
                continue
            _raise_kernel_error(status, buf, pos, line_no, col, val, self._header)

    def _grow(self, need_x: int, need_y: int) -> None:
        """Amortized doubling; `ndarray.resize` reallocs in place when it can."""
        if self._npts + 2 > len(self._x_indptr):
            cap = 2 * len(self._x_indptr)
            self._x_indptr.resize(cap, refcheck=False)
            self._y_indptr.resize(cap, refcheck=False)
        if need_x > len(self._x_indices):
            cap = max(need_x, 2 * len(self._x_indices))
            self._x_indices.resize(cap, refcheck=False)
            self._x_values.resize(cap, refcheck=False)
        if need_y > len(self._y_indices):
            self._y_indices.resize(max(need_y, 2 * len(self._y_indices)), refcheck=False)

    def _dataset(self) -> Dataset:
        assert self._header is not None, "the header is read first"
        n, d, num_labels = self._header
        np_, nx, ny = self._npts, self._nx, self._ny
        arrays: list[np.ndarray] = []
        for arr, size in (
            (self._x_indptr, np_ + 1),
            (self._x_indices, nx),
            (self._x_values, nx),
            (self._y_indptr, np_ + 1),
            (self._y_indices, ny),
        ):
            arr.resize(size, refcheck=False)
            arrays.append(arr)
        self._release_buffers()
        x_indptr, x_indices, x_values, y_indptr, y_indices = arrays
        return Dataset(x_indptr, x_indices, x_values, y_indptr, y_indices, num_features=d, num_labels=num_labels)

    def _release_buffers(self) -> None:
        self._x_indptr = np.zeros(0, dtype=np.int64)
        self._y_indptr = np.zeros(0, dtype=np.int64)
        self._x_indices = np.zeros(0, dtype=np.int32)
        self._x_values = np.zeros(0, dtype=np.float32)
        self._y_indices = np.zeros(0, dtype=np.int32)

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"this XMCStreamParser has {self._state}; create a new one per input")


def _readonly_u8(data: bytes | bytearray) -> np.ndarray:
    """A read-only uint8 view, so bytes and bytearray inputs share one compiled kernel."""
    buf = np.frombuffer(data, dtype=np.uint8)
    buf.flags.writeable = False
    return buf


def _token_span(line: bytes, col: int) -> tuple[int, int]:
    """0-based [start, end) of the blank-delimited token covering 1-based byte column `col`."""
    i = max(0, min(col - 1, len(line) - 1))
    s = i
    while s > 0 and line[s - 1] not in b" \t":
        s -= 1
    e = i
    while e < len(line) and line[e] not in b" \t":
        e += 1
    return s, e


def _token_at(line: bytes, col: int) -> str:
    """The token covering column `col`, shortened for messages."""
    s, e = _token_span(line, col)
    tok = line[s:e].decode("utf-8", "replace")
    return tok if len(tok) <= 40 else tok[:37] + "..."


def _dup_columns(line: bytes, dup: int, labels: bool) -> int | None:
    """1-based column of the second occurrence of id `dup` in `line` (error path only)."""
    seen = 0
    col = 0
    first = True
    for tok in line.split(b" "):
        if tok:
            if labels and first and b":" not in tok:
                off = col
                for lab in tok.split(b","):
                    if lab.isdigit() and int(lab) == dup:
                        seen += 1
                        if seen == 2:
                            return off + 1
                    off += len(lab) + 1
            elif not labels and b":" in tok:
                fid = tok.split(b":", 1)[0]
                if fid.isdigit() and int(fid) == dup:
                    seen += 1
                    if seen == 2:
                        return col + 1
            first = False
        elif col == 0:
            first = False  # leading blank: no label list
        col += len(tok) + 1
    return None


def _raise_kernel_error(status, buf, line_start, line_no, col, val, header) -> None:
    n, d, num_labels = header
    end = line_start
    while end < len(buf) and buf[end] != 10:
        end += 1
    line = bytes(buf[line_start:end]).rstrip(b"\r").replace(b"\t", b" ")
    col = int(col)
    val = int(val)
    tok = _token_at(line, col) if line else ""
    column: int | None = col
    if status == E_NUMBER:
        reason = f"expected a number in {tok!r}; ids are non-negative integers and values decimal numbers"
    elif status == E_COLON:
        reason = (
            f"feature token {tok!r} has no ':'; features are written 'index:value' "
            f"(labels go first, comma-separated, with no blank between them)"
        )
    elif status == E_FEATURE_ID:
        reason = f"feature index in {tok!r} is not a non-negative integer; features are written 'index:value'"
    elif status == E_FEATURE_RANGE:
        idx = tok.split(":", 1)[0]
        column = _token_span(line, col)[0] + 1
        reason = f"feature index {idx} >= num_features {d} declared in the header"
    elif status == E_LABEL_RANGE:
        s = col - 1
        while s > 0 and chr(line[s - 1]).isdigit():
            s -= 1
        lab = line[s:col].decode("ascii", "replace")
        reason = f"label {lab} >= num_labels {num_labels} declared in the header"
        column = s + 1
    elif status == E_NEGATIVE_FEATURE:
        reason = f"negative feature index in {tok!r}; ids are 0-based non-negative integers"
    elif status == E_NEGATIVE_LABEL:
        reason = f"negative label in {tok!r}; ids are 0-based non-negative integers"
    elif status == E_NONFINITE:
        reason = f"value in {tok!r} is not finite; NaN and infinity are not allowed, drop or replace the feature"
    elif status == E_VALUE_RANGE:
        reason = f"value in {tok!r} is outside the float32 range (|v| < 3.4e38)"
    elif status == E_DUP_FEATURE:
        column = _dup_columns(line, val, labels=False)
        reason = f"feature index {val} appears more than once in this point; merge the repeated entries"
    elif status == E_DUP_LABEL:
        column = _dup_columns(line, val, labels=True)
        reason = f"label {val} appears more than once in this point; list each label once"
    elif status == E_TOO_MANY_POINTS:
        column = None
        reason = (
            f"more points than the {n} declared in the header; fix the first number of the "
            f"header or remove the extra lines"
        )
    elif status == E_LABEL_AFTER_COMMA:
        reason = f"expected a label after ',' in {tok!r}; remove the trailing or doubled comma"
    elif status == E_AFTER_LABEL:
        reason = (
            f"unexpected character {chr(line[col - 1])!r} in label list {tok!r}; labels are "
            f"comma-separated non-negative integers"
        )
    elif status == E_AFTER_VALUE:
        reason = f"unexpected character {chr(line[col - 1])!r} after the value in {tok!r}; separate features by blanks"
    else:  # pragma: no cover - every status above is mapped
        reason = f"parse error code {status}"
    raise XMCParseError(int(line_no), reason, column)


# ---------------------------------------------------------------------------------------------
# One-shot helpers
# ---------------------------------------------------------------------------------------------


def parse_xmc_bytes(data: bytes | bytearray | memoryview, max_bytes: int | None = None) -> Dataset:
    """Parse a whole XMC file held in memory (plain or gzip, detected by magic bytes)."""
    p = XMCStreamParser(max_bytes=max_bytes)
    p.feed(data)
    return p.finish()


def read_xmc(path: str | os.PathLike, max_bytes: int | None = None) -> Dataset:
    """Read an XMC file, plain or gzip (detected by its first bytes, not its name), in 1 MB chunks."""
    p = XMCStreamParser(max_bytes=max_bytes)
    with open(path, "rb") as f:
        while True:
            chunk = f.read(READ_CHUNK)
            if not chunk:
                break
            p.feed(chunk)
    return p.finish()


def format_xmc_rows(dataset: Dataset, start: int = 0, stop: int | None = None) -> bytes:
    """The XMC lines (no header) of points [start, stop) as bytes, each ending in '\\n'.

    Values are written with the fewest digits that read back to the same float32.
    """
    x_indptr, x_indices, x_values, y_indptr, y_indices = _writer_arrays(dataset)
    stop = dataset.num_points if stop is None else stop
    return _format_range(x_indptr, x_indices, x_values, y_indptr, y_indices, start, stop)


def write_xmc(
    dataset: Dataset, path: str | os.PathLike, gzip: bool | None = None, rows_per_chunk: int = 1 << 15
) -> Path:
    """Write `dataset` as XMC text; gzip-compressed when `gzip` is True, or None and path ends in '.gz'.

    Streams `rows_per_chunk` points at a time; the gzip header carries no name or time, so the same
    dataset always gives the same bytes. Read back with `read_xmc`, the arrays are equal (rows sorted
    by id, as `read_xmc` stores them).
    """
    path = Path(path)
    if gzip is None:
        gzip = path.name.endswith(".gz")
    arrays = _writer_arrays(dataset)
    with open(path, "wb") as raw:
        f = _gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) if gzip else raw
        try:
            f.write(f"{dataset.num_points} {dataset.num_features} {dataset.num_labels}\n".encode())
            for r0 in range(0, dataset.num_points, rows_per_chunk):
                r1 = min(dataset.num_points, r0 + rows_per_chunk)
                f.write(_format_range(*arrays, r0, r1))
        finally:
            if gzip:
                f.close()
    return path


def _writer_arrays(dataset: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate once what the writer kernel assumes: contiguous typed arrays, finite values, ids in range."""
    x_values = np.ascontiguousarray(dataset.x_values, dtype=np.float32)
    if not np.all(np.isfinite(x_values)):
        bad = int(np.flatnonzero(~np.isfinite(x_values))[0])
        raise ValueError(
            f"x_values[{bad}] is {x_values[bad]}; XMC text cannot hold NaN or infinity, "
            f"replace or drop those features before writing"
        )
    x_indices = np.ascontiguousarray(dataset.x_indices, dtype=np.int64)
    y_indices = np.ascontiguousarray(dataset.y_indices, dtype=np.int64)
    if len(x_indices) and (x_indices.min() < 0 or x_indices.max() >= dataset.num_features):
        raise ValueError(
            f"feature ids must be in [0, num_features={dataset.num_features}); "
            f"got range [{x_indices.min()}, {x_indices.max()}]"
        )
    if len(y_indices) and (y_indices.min() < 0 or y_indices.max() >= dataset.num_labels):
        raise ValueError(
            f"label ids must be in [0, num_labels={dataset.num_labels}); "
            f"got range [{y_indices.min()}, {y_indices.max()}]"
        )
    return (
        np.ascontiguousarray(dataset.x_indptr, dtype=np.int64),
        x_indices,
        x_values,
        np.ascontiguousarray(dataset.y_indptr, dtype=np.int64),
        y_indices,
    )


def _format_range(x_indptr, x_indices, x_values, y_indptr, y_indices, r0: int, r1: int) -> bytes:
    nfeat = int(x_indptr[r1] - x_indptr[r0])
    nlab = int(y_indptr[r1] - y_indptr[r0])
    size = BYTES_PER_FEATURE * nfeat + BYTES_PER_LABEL * nlab + BYTES_PER_LINE * (r1 - r0)
    out = np.empty(size, dtype=np.uint8)
    n = _format_rows(x_indptr, x_indices, x_values, y_indptr, y_indices, r0, r1, out, _POW10)
    return out[:n].tobytes()
