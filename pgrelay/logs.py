"""Log output in PgBouncer's format: `2026-01-01 12:00:00.000 UTC [pid] LOG message`."""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time

LOGGER = "pgrelay"
_FORMAT = "%(asctime)s.%(msecs)03d UTC [%(process)d] %(levelname)s %(message)s"


class _Formatter(logging.Formatter):
    converter = time.gmtime

    def __init__(self):
        super().__init__(_FORMAT, "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.levelname = {"INFO": "LOG", "CRITICAL": "FATAL"}.get(record.levelname, record.levelname)
        return super().format(record)


def setup(config) -> None:
    """(Re)configure pgrelay's logger from `verbose` and `logfile`; safe to call on every reload."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        if getattr(handler, "_pgrelay", False):
            logger.removeHandler(handler)
            handler.close()
    formatter = _Formatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if config.logfile:
        handlers.append(logging.handlers.WatchedFileHandler(config.logfile))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._pgrelay = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if config.verbose else logging.INFO)
    logger.propagate = False
