"""Relay.reload: settings that need a restart keep their value, and a bad file changes nothing."""

import logging

import pytest

from pgrelay.relay import Relay

BASE = """[databases]
app = host=127.0.0.1 port=5432
[listeners]
direct = port={direct} role=direct
[pgbouncer]
listen_port = 6432
auth_type = trust
default_pool_size = {size}
"""


@pytest.fixture(autouse=True)
def propagate(monkeypatch):
    """pgrelay's logger stops propagating once a relay has set up logging; caplog needs it back."""
    monkeypatch.setattr(logging.getLogger("pgrelay"), "propagate", True)


def write(path, direct=7001, size=10, extra=""):
    path.write_text(BASE.format(direct=direct, size=size) + extra)


def test_reload_applies_reloadable_settings_and_keeps_restart_only_ones(tmp_path, caplog):
    ini = tmp_path / "r.ini"
    write(ini)
    relay = Relay(str(ini), env={})
    write(ini, direct=7002, size=25, extra="listen_backlog = 64\n")
    with caplog.at_level(logging.WARNING, logger="pgrelay"):
        assert relay.reload() is True
    assert relay.config.default_pool_size == 25
    assert relay.config.listen_backlog == 128  # needs a restart: old value kept
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "setting [listeners] cannot be changed by a reload; restart pgrelay to apply it" in warnings
    assert "setting listen_backlog cannot be changed by a reload; restart pgrelay to apply it" in warnings


def test_reload_with_a_bad_listener_line_keeps_the_old_configuration(tmp_path, caplog):
    ini = tmp_path / "r.ini"
    write(ini)
    relay = Relay(str(ini), env={})
    ini.write_text(BASE.format(direct=7001, size=30).replace("role=direct", "role=sideways"))
    with caplog.at_level(logging.ERROR, logger="pgrelay"):
        assert relay.reload() is False
    assert relay.config.default_pool_size == 10
    assert any("role: invalid value 'sideways'" in r.getMessage() for r in caplog.records)
