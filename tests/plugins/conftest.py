"""Fixtures for testing built-in plugins on in-process Relay objects."""

import pytest


@pytest.fixture(autouse=True)
def _pgrelay_logger_restored(restore_pgrelay_logger):
    """Every plugin test leaves the 'pgrelay' logger as it found it (tests/conftest.py)."""
    yield
