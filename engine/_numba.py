"""The one place where Numba options are set, so caching and threading flags cannot drift apart."""

from __future__ import annotations

import numba

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
