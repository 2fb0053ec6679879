"""The one place where Numba options are set, so caching and threading flags cannot drift apart."""

from __future__ import annotations

import types

import numba
import numpy as np

KERNEL_OPTIONS = dict(cache=True, nogil=True, fastmath=False, error_model="numpy")

kernel = numba.njit(**KERNEL_OPTIONS)
"""Serial kernel: a plain function over arrays and scalars."""

parallel_kernel = numba.njit(parallel=True, **KERNEL_OPTIONS)
"""Kernel whose outer `prange` loop runs on Numba's thread pool."""

FAST_MATH = {"reassoc", "contract", "nsz", "arcp"}
"""Float reassociation (SIMD reductions), fused multiply-add, no signed zeros, reciprocals; NaN and
inf keep their meaning. Results stay deterministic for a given build, not bit-equal to a naive loop."""

FAST_OPTIONS = dict(KERNEL_OPTIONS, fastmath=FAST_MATH)

fast_kernel = numba.njit(**FAST_OPTIONS)
"""Serial numerical kernel (dot products, optimizer steps) allowed to vectorise its reductions."""

fast_parallel_kernel = numba.njit(parallel=True, **FAST_OPTIONS)
"""Parallel numerical kernel allowed to vectorise its reductions."""


def set_threads(threads: int | None) -> int:
    """Use `threads` worker threads for parallel kernels (None = all Numba was started with)."""
    limit = numba.config.NUMBA_NUM_THREADS
    n = limit if not threads else max(1, min(int(threads), limit))
    numba.set_num_threads(n)
    return n


def read_only(x):
    """`x` (an array, or a tuple or NamedTuple group of them, nested) with every writable array replaced by a
    read-only view of it. Numba compiles one version of a kernel per argument type, and a read-only array (a
    memory-mapped snapshot or dataset) is another type than a writable one: kernels that only read an argument
    get it read-only from every caller, so they compile once whichever the arrays came from."""
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:
            return x
        view = x.view()
        view.flags.writeable = False
        return view
    if isinstance(x, tuple):
        items = [read_only(item) for item in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    return x


def renamed(fn, name: str):
    """A copy of the Python function `fn` under another name, to compile it a second time with other options.
    Numba's on-disk cache keys a kernel by its module, name and bytecode, not by its options: without the new
    name the threaded and the serial compilation of one function would share a cache entry, and whichever was
    compiled first would be loaded for both."""
    twin = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    twin.__qualname__ = name
    twin.__doc__ = fn.__doc__
    return twin


def scratch_rows(buf, n: int):
    """The scratch buffer `buf` (parts, rows, width) as a C-contiguous (parts, n, width) array on its first
    elements. `buf[:, :n]` would be strided for n < rows (a short last batch), and Numba compiles every kernel
    that takes it again for a strided array; its entries are not those of `buf[:, :n]`, so scratch only."""
    parts, _, width = buf.shape
    return buf.reshape(-1)[: parts * n * width].reshape(parts, n, width)
