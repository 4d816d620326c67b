"""Every configuration block in README.rst loads in pgrelay as written, and the examples around
them agree with it (as datasette tests its documentation). The connection strings are run
against these configurations in tests/integration/test_readme_connections.py."""

from __future__ import annotations

import re
import tomllib

import pytest

from pgrelay.auth import ScramSecret, verify_plain
from pgrelay.config import parse_connstr, read_ini
from pgrelay.docs import full_registry
from pgrelay.plugins import ENTRY_POINT_GROUP
from pgrelay.relay import Relay
from pgrelay_plugins.auth import DEFAULT_AUTH_QUERY, parse_auth_file

from . import readme

BLOCKS = readme.blocks()
INI_BLOCKS = [b for b in BLOCKS if b.kind == "ini"]

# Where the README must have a block of that kind; finding fewer means the extraction broke.
EXPECTED = {("Connection options", "psql"), ("Connection options", "ini"), ("Authentication", "ini"),
            ("Authentication", "userlist"), ("Authentication", "hba"), ("Authentication", "sql"),
            ("TLS", "ini"), ("TLS", "psql"), ("Database and user definitions", "ini"), ("Plugins", "python"),
            ("Plugins", "toml"), ("Running pgrelay", "shell"), ("Connection options", "curl"),
            ("Connection options", "neon"), ("Running pgrelay", "haproxy")}


def load(tmp_path, text: str, name: str = "readme.ini") -> Relay:
    """What `pgrelay FILE` does before it binds its ports: read the file, validate every section."""
    path = tmp_path / name
    path.write_text(text)
    return Relay(str(path), env={})


def test_every_readme_block_is_of_a_tested_kind():
    unknown = [(b.line, b.text.splitlines()[0]) for b in BLOCKS if b.kind == "unknown"]
    assert not unknown, f"README blocks no test knows how to check (teach tests/readme.py.classify): {unknown}"
    assert EXPECTED <= {(b.section, b.kind) for b in BLOCKS}


@pytest.mark.parametrize("block", INI_BLOCKS, ids=[b.id for b in INI_BLOCKS])
def test_readme_configuration_loads_as_written(tmp_path, block):
    """The block, with only the paths of the files it names made real, is a configuration pgrelay
    accepts without a warning. A `; comment` at the end of a line fails here: pgrelay (like PgBouncer)
    keeps it in the value, which then is refused, or warned about for a text setting."""
    files = readme.make_files(str(tmp_path / "files"))
    relay = load(tmp_path, readme.localize(block.text, files))
    assert relay.config.warnings == ()
    written = read_ini(block.text, "README.rst")
    for entry in written.sections.get("pgbouncer", []):
        assert entry.key in relay.registry.settings, entry.key
    assert set(relay.config.sections) == set(written.sections) - {"pgbouncer", "pgrelay"}


def test_connection_options_configuration_is_what_pgrelay_builds(tmp_path):
    """The layout behind the connection strings gives pgrelay those listeners and poolers."""
    block = readme.one_block("ini", "Connection options")
    relay = load(tmp_path, block.text)
    from pgrelay.listener import listener_specs
    listeners = {spec.name: spec for spec, _ in listener_specs(relay.config)}
    assert {name: (s.port, s.role, s.pool_mode) for name, s in listeners.items()} == {
        "main": (6432, "pooled", None), "direct": (5432, "direct", None), "session": (5433, "pooled", "session"),
        "serverless": (4444, "pooled", None)}
    assert listeners["serverless"].kind == "serverless"
    poolers = relay.plugin_data["poolers"]
    assert {name: (p.target, p.default_pool_size) for name, p in poolers.items()} == {
        "read-bouncer": ("replica", 20), "write-bouncer": ("primary", 10)}
    assert relay.config.cluster_usernames is True


def test_readme_connection_strings_match_their_configuration():
    """Each connection-options string uses a port, pooler, cluster and database the configuration has."""
    from psycopg.conninfo import conninfo_to_dict
    config = read_ini(readme.one_block("ini", "Connection options").text, "README.rst")
    ports = {int(e.value) for e in config.sections["pgbouncer"] if e.key == "listen_port"}
    ports |= {int(parse_connstr(e.value)["port"]) for e in config.sections["listeners"]}
    poolers = {e.key for e in config.sections["poolers"]}
    clusters = {e.key for e in config.sections["clusters"]}
    databases = {e.key for e in config.sections["databases"]}
    strings = [s for s in readme.conn_strings() if s.section == "Connection options"]
    assert len(strings) >= 9
    for string in strings:
        params = conninfo_to_dict(string.conninfo)
        role, _, suffix = params["user"].partition("|")
        _, dot, cluster = role.partition(".")
        assert int(params["port"]) in ports, string
        assert not suffix or suffix == "replica" or suffix in poolers, string
        assert not dot or cluster in clusters, string
        assert dot or params["dbname"] in databases or "*" in databases, string


def test_every_readme_connection_string_is_run_by_a_test():
    strings = readme.conn_strings()
    assert len(strings) >= 14
    assert [s for s in strings if s.section not in readme.RUN_SECTIONS] == []


def test_readme_userlist_holds_the_secrets_of_the_passwords_it_names(tmp_path):
    files = readme.make_files(str(tmp_path))
    users = parse_auth_file(files.paths["userlist.txt"])
    assert set(users) == {"app", "legacy", "pgrelay_auth"}
    passwords = readme.userlist_passwords()
    app_password, legacy_password = passwords["app"], passwords["legacy"]
    assert ScramSecret.parse(users["app"]) is not None, "app's secret is not a SCRAM verifier"
    assert verify_plain(app_password, users["app"], "app")
    assert not verify_plain(app_password + "x", users["app"], "app")
    assert users["legacy"].startswith("md5") and verify_plain(legacy_password, users["legacy"], "legacy")


def test_readme_hba_rules_load(tmp_path):
    files = readme.make_files(str(tmp_path / "files"))
    relay = load(tmp_path, f"[pgbouncer]\nauth_type = hba\nauth_hba_file = {files.paths['hba.conf']}\n")
    rules = relay.plugin_data["auth"].rules
    assert len(rules) == len(readme.one_block("hba", "Authentication").text.strip().splitlines()) == 3


def test_readme_auth_query_is_the_default():
    block = readme.one_block("sql", "Authentication")
    assert " ".join(block.text.split()) == DEFAULT_AUTH_QUERY
    assert full_registry().settings["auth_query"].default == DEFAULT_AUTH_QUERY


def test_readme_python_examples_compile():
    examples = [b for b in BLOCKS if b.kind == "python"]
    assert len(examples) >= 4
    for block in examples:
        compile(block.text, f"README.rst:{block.line}", "exec")


def test_readme_pyproject_uses_pgrelays_entry_point_group():
    data = tomllib.loads(readme.one_block("toml", "Plugins").text)
    assert list(data["project"]["entry-points"]) == [ENTRY_POINT_GROUP]


def test_readme_commands_name_real_settings():
    settings = full_registry().settings
    commands = "\n".join(line.split(" #")[0] for b in BLOCKS if b.kind == "shell" for line in b.text.splitlines())
    flags = set(re.findall(r"(?<!\S)--([a-z_-]+)", commands)) - {"help", "list-plugins", "config"}
    variables = {name.lower() for name in re.findall(r"\bPGRELAY_([A-Z_]+)=", commands)}
    assert flags and variables
    assert flags <= set(settings) and variables <= set(settings), (flags, variables)


def test_readme_console_commands_are_console_commands():
    """Each `psql ... pgbouncer -c "CMD"` names a command the admin console has, in its grammar."""
    import shlex

    import pgrelay.admin  # noqa: F401  (registers the built-in commands)
    from pgrelay.admin import console
    from pgrelay.admin.commands import COMMANDS
    commands = [shlex.split(line.split("  #")[0])[-1] for b in BLOCKS if b.kind == "console"
                for line in b.text.splitlines() if line.strip()]
    assert len(commands) >= 2
    for text in commands:
        assert console.parse(text).name in COMMANDS, text


def test_readme_log_lines_are_what_pgrelay_writes():
    """The README's log examples have the format pgrelay.logs produces (a record formatted now)."""
    import logging

    from pgrelay import logs
    lines = [line for b in BLOCKS if b.kind == "log" for line in b.text.splitlines() if line.strip()]
    assert lines
    record = logging.LogRecord("pgrelay", logging.INFO, __file__, 1, "C-1: db/user@127.0.0.1:5000 login attempt",
                               None, None)
    assert readme.LOG_LINE.match(logs.TextFormatter().format(record))
    for line in lines:
        assert readme.LOG_LINE.match(line), line


def test_readme_json_log_lines_parse():
    import json
    lines = [line for b in BLOCKS if b.kind == "json" for line in b.text.splitlines() if line.strip()]
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert {"time", "level", "pid", "message"} <= set(entry), line


def test_readme_haproxy_configuration_is_valid(tmp_path):
    """`haproxy -c` accepts the README's HAProxy sections as written (the installed haproxy; .ci/run
    installs it, and the PROXY protocol integration test runs one)."""
    import shutil
    import subprocess
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    blocks = [b for b in BLOCKS if b.kind == "haproxy"]
    assert blocks
    for block in blocks:
        cfg = tmp_path / f"haproxy-{block.line}.cfg"
        cfg.write_text("defaults\n    timeout connect 5s\n    timeout client 1m\n    timeout server 1m\n\n" + block.text)
        done = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, (block.line, done.stdout, done.stderr)
