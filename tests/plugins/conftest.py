"""Fixtures for testing built-in plugins on in-process Relay objects."""

import logging

import pytest


@pytest.fixture(autouse=True)
def restore_pgrelay_logger():
    """Relay.reload() reconfigures the 'pgrelay' logger (stderr handler, no propagation): undo that."""
    logger = logging.getLogger("pgrelay")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    for handler in list(logger.handlers):
        if handler not in saved[0]:
            logger.removeHandler(handler)
            handler.close()
    logger.propagate, logger.level = saved[1], saved[2]
