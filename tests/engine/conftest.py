"""Fixtures shared by the engine tests."""

import pytest

from engine._numba import set_threads


@pytest.fixture(autouse=True)
def restore_threads():
    """Tests pin Numba's thread count (determinism checks); every test leaves it at the default."""
    yield
    set_threads(None)
