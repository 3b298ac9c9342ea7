"""The Stable Diffusion tests run torch on one thread (tests/sd_files.py: one_thread)."""

from __future__ import annotations

import pytest

from tests.sd_files import one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield
