"""pgrelay/config.py: the INI reader, load_config precedence and validation, Config.changed and parse_connstr."""

import pytest

from pgrelay.config import MAX_INCLUDE_DEPTH, Entry, load_config, parse_connstr, read_ini
from pgrelay.errors import ConfigError
from pgrelay.plugins import make_plugin_manager
from pgrelay.settings import core_registry


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def registry_with_plugins():
    """The registry a relay uses: core settings plus the built-in plugins' sections."""
    registry = core_registry()
    make_plugin_manager().hook.pgrelay_add_settings(settings=registry)
    return registry


def pairs(ini, section):
    return [(e.key, e.value) for e in ini.sections[section]]


# -- read_ini ----------------------------------------------------------------------------------

def test_read_ini_sections_comments_and_positions():
    text = ("; leading comment\n"
            "# another comment\n"
            "\n"
            "[databases]\n"
            "db1 = host=localhost dbname=x\n"
            "  ; indented comment\n"
            "[ PgBouncer ]\n"
            "listen_port=6000\n"
            "   pool_mode =  transaction  \n"
            "server_reset_query = DISCARD ALL\n")
    ini = read_ini(text, "/etc/x.ini")
    assert list(ini.sections) == ["databases", "pgbouncer"]
    assert pairs(ini, "databases") == [("db1", "host=localhost dbname=x")]
    assert pairs(ini, "pgbouncer") == [("listen_port", "6000"), ("pool_mode", "transaction"),
                                       ("server_reset_query", "DISCARD ALL")]
    assert [e.where for e in ini.sections["pgbouncer"]] == ["/etc/x.ini:8", "/etc/x.ini:9", "/etc/x.ini:10"]
    assert ini.sections["databases"][0] == Entry("db1", "host=localhost dbname=x", "/etc/x.ini", 5)


def test_read_ini_value_keeps_equals_and_hash():
    ini = read_ini("[databases]\nd = host=h password=a#b;c\n", "f.ini")
    assert pairs(ini, "databases") == [("d", "host=h password=a#b;c")]


def test_read_ini_empty_section_and_repeated_section():
    ini = read_ini("[users]\n[pgbouncer]\na = 1\n[users]\nu = pool_mode=session\n", "f.ini")
    assert pairs(ini, "users") == [("u", "pool_mode=session")]
    assert pairs(ini, "pgbouncer") == [("a", "1")]


def test_include_relative_to_including_file(tmp_path, monkeypatch):
    write(tmp_path / "conf" / "sub" / "dbs.ini", "db2 = host=h2\n%include more.ini\n")
    write(tmp_path / "conf" / "sub" / "more.ini", "db3 = host=h3\n")
    main = write(tmp_path / "conf" / "main.ini", "[databases]\ndb1 = host=h1\n%include sub/dbs.ini\ndb4 = host=h4\n")
    monkeypatch.chdir(tmp_path)  # not the directory of main.ini: includes must not depend on the cwd
    with open(main) as f:
        ini = read_ini(f.read(), main)
    assert pairs(ini, "databases") == [("db1", "host=h1"), ("db2", "host=h2"), ("db3", "host=h3"), ("db4", "host=h4")]
    entries = ini.sections["databases"]
    assert entries[1].where == str(tmp_path / "conf" / "sub" / "dbs.ini") + ":1"
    assert entries[2].where == str(tmp_path / "conf" / "sub" / "more.ini") + ":1"
    assert entries[3].where == main + ":4"


def test_include_missing_file(tmp_path):
    main = write(tmp_path / "main.ini", "[pgbouncer]\n\n%include nope.ini\n")
    with pytest.raises(ConfigError) as exc:
        read_ini(open(main).read(), main)
    assert str(exc.value).startswith(f"{main}:3: cannot read included file {tmp_path / 'nope.ini'}")


def test_include_without_name():
    with pytest.raises(ConfigError, match=r"^f\.ini:2: %include needs a file name$"):
        read_ini("[pgbouncer]\n%include   \n", "f.ini")


def test_include_depth_limit(tmp_path):
    loop = write(tmp_path / "loop.ini", "[pgbouncer]\n%include loop.ini\n")
    with pytest.raises(ConfigError) as exc:
        read_ini(open(loop).read(), loop)
    assert str(exc.value) == f"{loop}:2: %include nested too deeply"
    # MAX_INCLUDE_DEPTH nested %include lines are fine; one more is refused.
    for i in range(MAX_INCLUDE_DEPTH):
        write(tmp_path / f"c{i}.ini", f"k{i} = {i}\n%include c{i + 1}.ini\n")
    top = write(tmp_path / "top.ini", "[pgbouncer]\n%include c0.ini\n")
    write(tmp_path / f"c{MAX_INCLUDE_DEPTH - 1}.ini", "last = yes\n")
    ini = read_ini(open(top).read(), top)
    assert len(ini.sections["pgbouncer"]) == MAX_INCLUDE_DEPTH
    write(tmp_path / f"c{MAX_INCLUDE_DEPTH - 1}.ini", f"last = yes\n%include c{MAX_INCLUDE_DEPTH}.ini\n")
    write(tmp_path / f"c{MAX_INCLUDE_DEPTH}.ini", "one_more = yes\n")
    with pytest.raises(ConfigError, match=rf"c{MAX_INCLUDE_DEPTH - 1}\.ini:2: %include nested too deeply$"):
        read_ini(open(top).read(), top)


def test_syntax_error_names_file_and_line():
    with pytest.raises(ConfigError) as exc:
        read_ini("[pgbouncer]\nlisten_port = 1\nthis is not a setting\n", "/x/p.ini")
    assert str(exc.value) == "/x/p.ini:3: syntax error, expected 'key = value': 'this is not a setting'"


def test_key_outside_section():
    with pytest.raises(ConfigError, match=r"^/x/p\.ini:2: setting outside of any \[section\]$"):
        read_ini("; comment\nlisten_port = 1\n[pgbouncer]\n", "/x/p.ini")


# -- load_config -----------------------------------------------------------------------------

def test_precedence_file_env_flag(tmp_path):
    path = write(tmp_path / "p.ini", "[pgbouncer]\nlisten_port = 1111\npool_mode = statement\nverbose = 1\n")
    registry = core_registry()
    assert load_config(registry, path, [], {}).listen_port == 1111
    env = {"PGRELAY_LISTEN_PORT": "2222", "PGRELAY_POOL_MODE": "Transaction"}
    config = load_config(registry, path, [], env)
    assert (config.listen_port, config.pool_mode, config.verbose) == (2222, "transaction", 1)
    config = load_config(registry, path, ["--listen_port", "3333", "--verbose=2"], env)
    assert (config.listen_port, config.pool_mode, config.verbose) == (3333, "transaction", 2)
    # Without a file: defaults, then env, then flags.
    config = load_config(registry, None, ["--default_pool_size", "7"], {"PGRELAY_MAX_CLIENT_CONN": "5"})
    assert (config.listen_port, config.max_client_conn, config.default_pool_size, config.path) == (6432, 5, 7, None)


def test_values_are_typed_and_defaults_filled(tmp_path):
    path = write(tmp_path / "p.ini", "[pgbouncer]\nserver_lifetime = 5min\nunix_socket_dir =\n"
                                     "ignore_startup_parameters = extra_float_digits, options\nlog_stats = off\n")
    config = load_config(core_registry(), path, [], {})
    assert config.server_lifetime == 300.0
    assert config.unix_socket_dir == ""
    assert config.ignore_startup_parameters == ("extra_float_digits", "options")
    assert config.log_stats is False
    assert config.default_pool_size == 20
    assert config.path == path
    assert config.warnings == ()
    with pytest.raises(AttributeError):
        config.no_such_setting


def test_os_environ_not_read_when_env_given(tmp_path, monkeypatch):
    monkeypatch.setenv("PGRELAY_LISTEN_PORT", "4444")
    path = write(tmp_path / "p.ini", "[pgbouncer]\nlisten_port = 1111\n")
    assert load_config(core_registry(), path, [], {}).listen_port == 1111
    assert load_config(core_registry(), path, [], None).listen_port == 4444


def test_pgrelay_section_like_pgbouncer(tmp_path):
    path = write(tmp_path / "p.ini", "[pgrelay]\nlisten_port = 5555\nPool_Mode = statement\n")
    config = load_config(core_registry(), path, [], {})
    assert (config.listen_port, config.pool_mode) == (5555, "statement")
    assert "pgrelay" not in config.sections


def test_unknown_key_names_key_file_line(tmp_path):
    path = write(tmp_path / "p.ini", "[pgbouncer]\nlisten_port = 1\n\nlisten_prot = 6432\n")
    with pytest.raises(ConfigError) as exc:
        load_config(core_registry(), path, [], {})
    assert str(exc.value) == f"{path}:4: unknown setting 'listen_prot'"


def test_bad_value_names_file_line(tmp_path):
    path = write(tmp_path / "p.ini", "[pgbouncer]\nlisten_port = abc\n")
    with pytest.raises(ConfigError) as exc:
        load_config(core_registry(), path, [], {})
    assert str(exc.value) == f"{path}:2: listen_port: invalid integer 'abc'"
    path = write(tmp_path / "q.ini", "[pgbouncer]\npool_mode = sometimes\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2: pool_mode: invalid value 'sometimes'"):
        load_config(core_registry(), path, [], {})


def test_bad_value_in_included_file_names_included_file(tmp_path):
    inc = write(tmp_path / "inc.ini", "; x\nquery_wait_timeout = soon\n")
    path = write(tmp_path / "p.ini", "[pgbouncer]\n%include inc.ini\n")
    with pytest.raises(ConfigError) as exc:
        load_config(core_registry(), path, [], {})
    assert str(exc.value) == f"{inc}:2: query_wait_timeout: invalid duration 'soon'"


def test_bad_env_and_flag_values_fail(tmp_path):
    with pytest.raises(ConfigError, match="listen_port: invalid integer 'x'"):
        load_config(core_registry(), None, [], {"PGRELAY_LISTEN_PORT": "x"})
    with pytest.raises(ConfigError, match="pool_mode: invalid value 'often'"):
        load_config(core_registry(), None, ["--pool_mode", "often"], {})
    with pytest.raises(ConfigError, match="unrecognized arguments: --bogus"):
        load_config(core_registry(), None, ["--bogus", "1"], {})


def test_missing_file(tmp_path):
    path = str(tmp_path / "none.ini")
    with pytest.raises(ConfigError, match=f"cannot read configuration file {path}: no such file"):
        load_config(core_registry(), path, [], {})


def test_planned_key_loads_with_warning(tmp_path):
    path = write(tmp_path / "p.ini", "[pgbouncer]\nlisten_port = 7000\ndns_max_ttl = 10\n")
    config = load_config(core_registry(), path, [], {})
    assert config.listen_port == 7000
    assert config.warnings == (
        f"{path}:3: setting 'dns_max_ttl' is not implemented by pgrelay yet and is ignored",)


def test_planned_key_bad_value_still_fails(tmp_path):
    path = write(tmp_path / "p.ini", "[pgbouncer]\ndns_max_ttl = never\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2: dns_max_ttl: invalid duration 'never'$"):
        load_config(core_registry(), path, [], {})


def test_planned_key_from_env_warns():
    config = load_config(core_registry(), None, [], {"PGRELAY_SERVER_FAST_CLOSE": "1"})
    assert config.warnings == (
        "PGRELAY_SERVER_FAST_CLOSE: setting 'server_fast_close' is not implemented by pgrelay yet and is ignored",)


def test_unknown_section_fails(tmp_path):
    path = write(tmp_path / "p.ini", "[pgbouncer]\nlisten_port = 1\n[dtabases]\nx = host=y\n")
    with pytest.raises(ConfigError) as exc:
        load_config(registry_with_plugins(), path, [], {})
    assert str(exc.value) == f"{path}:4: unknown section [dtabases]"


def test_plugin_sections_kept_raw(tmp_path):
    path = write(tmp_path / "p.ini", "[databases]\nd1 = host=a\n[pgbouncer]\n[users]\nbob = pool_mode=session\n")
    config = load_config(registry_with_plugins(), path, [], {})
    assert [(e.key, e.value, e.line) for e in config.section("databases")] == [("d1", "host=a", 2)]
    assert [(e.key, e.value) for e in config.section("users")] == [("bob", "pool_mode=session")]
    assert config.section("nothing") == ()
    # Without the plugins that claim them, [databases] is an unknown section.
    with pytest.raises(ConfigError, match=r":2: unknown section \[databases\]"):
        load_config(core_registry(), path, [], {})


def test_peers_section_is_read_without_a_warning(tmp_path):
    path = write(tmp_path / "p.ini", "[pgbouncer]\nlisten_port = 1\n[peers]\n1 = host=/tmp\n")
    config = load_config(registry_with_plugins(), path, [], {})
    assert config.warnings == ()
    assert [(e.key, e.value) for e in config.section("peers")] == [("1", "host=/tmp")]


def test_changed_reports_settings_and_sections(tmp_path):
    registry = registry_with_plugins()
    a = write(tmp_path / "a.ini", "[databases]\nd = host=a\n[users]\nu = pool_mode=session\n"
                                  "[pgbouncer]\nlisten_port = 1\npool_mode = session\n")
    b = write(tmp_path / "b.ini", "; moved down by a comment line: positions differ, contents do not\n"
                                  "[databases]\nd = host=b\n[users]\nu = pool_mode=session\n"
                                  "[pgbouncer]\nlisten_port = 1\npool_mode = transaction\n")
    ca, cb = load_config(registry, a, [], {}), load_config(registry, b, [], {})
    assert cb.changed(ca) == frozenset({"pool_mode", "[databases]"})
    assert ca.changed(cb) == frozenset({"pool_mode", "[databases]"})
    assert ca.changed(load_config(registry, a, [], {})) == frozenset()
    c = write(tmp_path / "c.ini", "[databases]\nd = host=a\n[pgbouncer]\nlisten_port = 1\npool_mode = session\n")
    assert load_config(registry, c, [], {}).changed(ca) == frozenset({"[users]"})


def test_entry_repr_hides_value():
    entry = Entry("db", "password=secret", "f.ini", 3)
    assert "secret" not in repr(entry)
    assert entry.where == "f.ini:3"


# -- parse_connstr ---------------------------------------------------------------------------

def test_connstr_plain():
    assert parse_connstr("host=localhost port=5433  dbname=app") == {"host": "localhost", "port": "5433", "dbname": "app"}
    assert parse_connstr("") == {}
    assert parse_connstr("   ") == {}
    assert parse_connstr("host = h  port= 1") == {"host": "h", "port": "1"}


def test_connstr_quoted_values():
    assert parse_connstr("password='a b c' user=x") == {"password": "a b c", "user": "x"}
    assert parse_connstr("password='it''s'") == {"password": "it's"}
    assert parse_connstr(r"password='back\\slash\'quote'") == {"password": "back\\slash'quote"}
    assert parse_connstr("application_name='' host=h") == {"application_name": "", "host": "h"}
    assert parse_connstr("connect_query='SET x = 1; SELECT ''y'''") == {"connect_query": "SET x = 1; SELECT 'y'"}


def test_connstr_errors():
    with pytest.raises(ConfigError, match=r"^f\.ini:3: unterminated quoted value for password$"):
        parse_connstr("host=h password='abc", "f.ini:3")
    with pytest.raises(ConfigError, match=r"^f\.ini:3: unterminated quoted value for password$"):
        parse_connstr("password='abc''", "f.ini:3")
    with pytest.raises(ConfigError, match=r"^f\.ini:4: expected key=value in 'dbname'$"):
        parse_connstr("host=h dbname", "f.ini:4")
    with pytest.raises(ConfigError, match=r"^f\.ini:5: bad key ''$"):
        parse_connstr("=value", "f.ini:5")
