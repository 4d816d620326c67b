"""pgrelay/settings.py: setting types, the core and planned declarations, and PgBouncer's defaults."""

import pytest

from pgrelay.settings import (
    BOOL, CORE_SETTINGS, INT, LIST, PLANNED_SETTINGS, POOL_MODE, SECONDS, STR, Int, Setting,
    SettingsRegistry, core_registry,
)


@pytest.mark.parametrize("text,value", [
    ("1", True), ("yes", True), ("on", True), ("true", True), ("TRUE", True), (" Yes ", True),
    ("0", False), ("no", False), ("off", False), ("false", False), ("Off", False),
])
def test_bool_valid(text, value):
    assert BOOL.parse(text) is value


@pytest.mark.parametrize("text", ["2", "y", "maybe", "", "enabled", "-1"])
def test_bool_invalid(text):
    with pytest.raises(ValueError, match="invalid boolean"):
        BOOL.parse(text)


@pytest.mark.parametrize("text,value", [
    ("30", 30.0), ("1.5", 1.5), ("500ms", 0.5), ("5min", 300.0), ("1h", 3600.0), ("30s", 30.0),
    ("1d", 86400.0), ("0", 0.0), (" 2 min ", 120.0), ("10MS", 0.01),
])
def test_seconds_valid(text, value):
    assert SECONDS.parse(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["-1", "abc", "", "5 parsecs", "1.5.2", "ms", "1e3"])
def test_seconds_invalid(text):
    with pytest.raises(ValueError, match="invalid duration"):
        SECONDS.parse(text)


def test_enum_case_insensitive():
    assert POOL_MODE.parse("Session") == "session"
    assert POOL_MODE.parse(" TRANSACTION ") == "transaction"
    assert POOL_MODE.parse("statement") == "statement"
    assert POOL_MODE.name == "session|transaction|statement"
    with pytest.raises(ValueError, match="expected one of session, transaction, statement"):
        POOL_MODE.parse("sessions")
    with pytest.raises(ValueError):
        POOL_MODE.parse("")


def test_list_splits_and_strips():
    assert LIST.parse(" a , b,,c ") == ("a", "b", "c")
    assert LIST.parse("IntervalStyle") == ("IntervalStyle",)
    assert LIST.parse("") == ()
    assert LIST.parse(" , ") == ()


def test_str_strips():
    assert STR.parse("  DISCARD ALL  ") == "DISCARD ALL"
    assert STR.parse("") == ""


def test_int_and_minimum():
    assert INT.parse(" 42 ") == 42
    assert INT.parse("0") == 0
    with pytest.raises(ValueError, match="below the minimum 0"):
        INT.parse("-1")
    with pytest.raises(ValueError, match="invalid integer"):
        INT.parse("4.5")
    with pytest.raises(ValueError, match="invalid integer"):
        INT.parse("abc")
    with pytest.raises(ValueError, match="invalid integer"):
        INT.parse("")
    port = Int(1)
    assert port.parse("6432") == 6432
    with pytest.raises(ValueError, match="below the minimum 1"):
        port.parse("0")
    assert Int(None).parse("-5") == -5


def test_octal():
    mode = Int(0, base=8)
    assert mode.name == "octal"
    assert mode.parse("0777") == 0o777
    assert mode.parse("600") == 0o600
    with pytest.raises(ValueError, match="invalid integer"):
        mode.parse("0778")
    with pytest.raises(ValueError, match="invalid integer"):
        mode.parse("rwx")


@pytest.mark.parametrize("setting", CORE_SETTINGS + PLANNED_SETTINGS, ids=lambda s: s.name)
def test_every_default_parses_with_its_type(setting):
    assert setting.section == "pgbouncer"
    assert setting.default_value == setting.type.parse(setting.default)
    assert setting.doc and setting.doc.endswith("."), setting.name


def test_no_setting_declared_twice():
    core = [s.name for s in CORE_SETTINGS]
    planned = [s.name for s in PLANNED_SETTINGS]
    assert len(core) == len(set(core))
    assert len(planned) == len(set(planned))
    assert all(not s.planned for s in CORE_SETTINGS)
    assert all(s.planned for s in PLANNED_SETTINGS)
    registry = core_registry()
    for name in set(core) & set(planned):  # a planned key that the core now implements
        assert not registry.settings[name].planned
    assert set(registry.settings) == set(core) | set(planned)


def test_registry_replacement_rules():
    registry = SettingsRegistry()
    registry.add(Setting("x", INT, "1", True, "Planned x.", planned=True))
    registry.add(Setting("x", INT, "2", True, "Core x."))  # planned -> core: allowed
    assert registry.settings["x"].default == "2" and not registry.settings["x"].planned
    with pytest.raises(ValueError, match="declared twice"):
        registry.add(Setting("x", INT, "3", True, "Core x again."))
    with pytest.raises(ValueError, match="declared twice"):
        registry.add(Setting("x", INT, "3", True, "Planned after core.", planned=True))
    registry.add(Setting("host", STR, "", True, "A [databases] key.", section="databases"))
    assert "host" not in registry.settings
    assert registry.section_keys["databases"]["host"].name == "host"


def test_core_registry_is_fresh_each_call():
    a, b = core_registry(), core_registry()
    assert a is not b and a.settings is not b.settings
    a.add(Setting("only_in_a", STR, "", True, "Test."))
    assert "only_in_a" not in b.settings
    assert a.sections.keys() == {"pgbouncer", "listeners", "peers"}
    assert a.sections["pgbouncer"] == "pgrelay's own settings (also accepted as [pgrelay])."


@pytest.mark.parametrize("name,value", [
    ("pool_mode", "session"),
    ("default_pool_size", 20),
    ("max_client_conn", 100),
    ("listen_port", 6432),
    ("server_reset_query", "DISCARD ALL"),
    ("server_lifetime", 3600.0),
    ("server_idle_timeout", 600.0),
    ("query_wait_timeout", 120.0),
    ("track_extra_parameters", ("IntervalStyle",)),
    ("unix_socket_dir", "/tmp"),
    ("min_pool_size", 0),
    ("server_connect_timeout", 15.0),
    ("server_login_retry", 15.0),
    ("client_login_timeout", 60.0),
    ("listen_backlog", 128),
    ("unix_socket_mode", 0o777),
    ("stats_period", 60),
    ("server_reset_query_always", False),
    ("max_packet_size", 2147483647),
])
def test_pgbouncer_defaults(name, value):
    assert core_registry().settings[name].default_value == value
