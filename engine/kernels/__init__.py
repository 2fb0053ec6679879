"""Numba kernels by concern: active-set sampling, forward/backward, optimizer, inference."""
