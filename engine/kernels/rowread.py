"""Copy chosen rows of a CSR array (the slices [starts[i], stops[i]) of its indices, values or labels)
into one compact array, from memory or straight from the array's .npy file with pread.

Training reads ~128 rows of a dataset of ~500,000 a step, in random order. Read through a memory map,
every page it ever touched would stay mapped into the process (the whole ~300 MB of amazon670k's
features within a few hundred steps, counted in its resident set); pread copies just the rows and
leaves the file's pages to the page cache."""

from __future__ import annotations

from .._numba import kernel
from .lowlevel import pread_into


@kernel
def rows_from_file(fd, data_offset, starts, stops, out):
    """out[...] = the rows [starts[i], stops[i]) of the array whose element 0 is at byte data_offset of
    the file fd, one after the other; out's length is their total. Returns 0, or -1 on a read error or a
    file shorter than the rows (out is then incomplete)."""
    item = out.itemsize
    q = 0
    for i in range(starts.shape[0]):
        done = 0
        count = stops[i] - starts[i]
        while done < count:
            got = pread_into(fd, out, q + done, count - done, data_offset + (starts[i] + done) * item)
            if got <= 0 or got % item != 0:
                return -1
            done += got // item
        q += count
    return 0


@kernel
def rows_from_memory(src, starts, stops, out):
    """rows_from_file for an array in memory."""
    q = 0
    for i in range(starts.shape[0]):
        for z in range(starts[i], stops[i]):
            out[q] = src[z]
            q += 1
    return 0
