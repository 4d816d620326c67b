"""pgrelay/cli.py: argument splitting, --help/--version/--list-plugins, config errors and starting from a file."""

import os
import re
import signal
import subprocess
import sys
import time

import psycopg2
import pytest

from pgrelay import __version__, version_string
from pgrelay.cli import Options, UsageError, parse_command_line, split_args
from pgrelay.plugins import BUILTIN_PLUGINS
from pgrelay.plugins import make_plugin_manager
from pgrelay.settings import core_registry
from pgrelay.tempdb import free_port

from .test_plugins import BUILTIN_HOOKS as PLUGIN_HOOKS

# What --list-plugins prints for each built-in plugin (the table is tests/unit/test_plugins.py's).
BUILTIN_HOOKS = {name: ", ".join(hooks) for name, hooks in PLUGIN_HOOKS.items()}


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGRELAY_")}
    env.update(extra)
    return env


def pgrelay(*args, timeout=30, **env):
    return subprocess.run([sys.executable, "-m", "pgrelay", *args], capture_output=True, text=True,
                          timeout=timeout, env=clean_env(**env))


def write_config(tmp_path, pg, extra="", name="relay.ini"):
    port = free_port()
    path = tmp_path / name
    path.write_text(f"[databases]\n* = host=127.0.0.1 port={pg.port}\n"
                    f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir = {tmp_path}\n"
                    f"auth_type = trust\npool_mode = transaction\nstats_period = 3600\n{extra}")
    return str(path), port


# -- split_args ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,expected", [
    ([], (None, [], set())),
    (["p.ini"], ("p.ini", [], set())),
    (["-c", "p.ini"], ("p.ini", [], set())),
    (["--config", "p.ini"], ("p.ini", [], set())),
    (["--config=p.ini"], ("p.ini", [], set())),
    (["p.ini", "--listen_port", "7000"], ("p.ini", ["--listen_port", "7000"], set())),
    (["--listen_port=7000", "p.ini"], ("p.ini", ["--listen_port=7000"], set())),
    (["--pool_mode", "session", "-c", "p.ini", "--verbose=2"],
     ("p.ini", ["--pool_mode", "session", "--verbose=2"], set())),
    (["--list-plugins", "p.ini"], ("p.ini", [], {"--list-plugins"})),
    (["-h"], (None, [], {"-h"})),
    (["--help", "--version", "-V"], (None, [], {"--help", "--version", "-V"})),
    (["--listen_port"], (None, ["--listen_port"], set())),
])
def test_split_args(argv, expected):
    assert split_args(argv) == expected


def test_split_args_errors():
    with pytest.raises(SystemExit, match="-c needs a file name"):
        split_args(["-c"])
    with pytest.raises(SystemExit, match="unexpected argument 'b.ini'"):
        split_args(["a.ini", "b.ini"])


# -- PgBouncer's switches ----------------------------------------------------------------------

@pytest.mark.parametrize("argv,expected", [
    (["p.ini"], Options(path="p.ini")),
    (["-d", "p.ini"], Options(path="p.ini", daemon=True)),
    (["--daemon", "--quiet", "p.ini"], Options(path="p.ini", daemon=True, quiet=True)),
    (["-dq", "p.ini", "-v"], Options(path="p.ini", daemon=True, quiet=True, verbose=1)),
    (["-vvv", "p.ini"], Options(path="p.ini", verbose=3)),
    (["-v", "--verbose", "-v", "p.ini"], Options(path="p.ini", verbose=3)),
    (["--verbose=2", "p.ini"], Options(path="p.ini", settings=["--verbose=2"])),
    (["-u", "nobody", "p.ini"], Options(path="p.ini", user="nobody")),
    (["-unobody", "p.ini"], Options(path="p.ini", user="nobody")),
    (["-du", "nobody", "p.ini"], Options(path="p.ini", daemon=True, user="nobody")),
    (["--user=nobody", "p.ini"], Options(path="p.ini", user="nobody")),
    (["--user", "nobody", "-c", "p.ini"], Options(path="p.ini", user="nobody")),
    (["p.ini", "--listen_port", "-1"], Options(path="p.ini", settings=["--listen_port", "-1"])),
    (["--config=p.ini", "--pool_mode=session"], Options(path="p.ini", settings=["--pool_mode=session"])),
    (["--list-plugins", "p.ini"], Options(path="p.ini", action="list-plugins")),
    (["-V"], Options(action="version")),
    (["--help", "-R"], Options(action="help")),
    (["-d", "-h", "p.ini"], Options(daemon=True, action="help")),
    (["--", "-p.ini"], Options(path="-p.ini")),
])
def test_parse_command_line(argv, expected):
    assert parse_command_line(argv) == expected


@pytest.mark.parametrize("argv,message", [
    (["-R", "p.ini"], "pgrelay: invalid option -- 'R'"),
    (["-dR", "p.ini"], "pgrelay: invalid option -- 'R'"),
    (["--reboot", "p.ini"], "pgrelay: unrecognized option '--reboot'"),
    (["-x"], "pgrelay: invalid option -- 'x'"),
    (["p.ini", "-u"], "pgrelay: option requires an argument -- 'u'"),
    (["p.ini", "--user"], "pgrelay: option '--user' requires an argument"),
    (["--config"], "pgrelay: option '--config' requires an argument"),
    (["-c"], "pgrelay: option requires an argument -- 'c'"),
    (["a.ini", "b.ini"], "pgrelay: unexpected argument 'b.ini'"),
])
def test_parse_command_line_refusals(argv, message):
    with pytest.raises(UsageError) as info:
        parse_command_line(argv)
    assert str(info.value) == message


# -- --help, --version -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def help_text():
    result = pgrelay("--help", COLUMNS="2000")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def option_blocks(text):
    """{setting name: its help text} from argparse's option listing."""
    blocks = {}
    for match in re.finditer(r"^  --(\w+) .*?(?=^  -|^\S|\Z)", text, re.M | re.S):
        blocks[match.group(1)] = " ".join(match.group(0).split())
    return blocks


def test_help_mentions_every_setting_and_default(help_text):
    registry = core_registry()
    make_plugin_manager().hook.pgrelay_add_settings(settings=registry)
    blocks = option_blocks(help_text)
    assert len(list(registry)) > 60
    for setting in registry:
        assert setting.name in blocks, f"--{setting.name} missing from --help"
        default = setting.default if setting.default != "" else "empty"
        assert f"(default: {default})" in blocks[setting.name], (setting.name, blocks[setting.name])
        assert " ".join(setting.doc.split()) in blocks[setting.name]
        assert ("[planned: accepted and ignored]" in blocks[setting.name]) == setting.planned
    assert "(default: session)" in blocks["pool_mode"]
    assert "(default: DISCARD ALL)" in blocks["server_reset_query"]
    assert "PGRELAY_<NAME>" in help_text


def test_help_mentions_section_keys_declared_by_plugins(help_text):
    """The built-in plugins declare [databases] and [users] keys; --help documents them with their defaults."""
    registry = core_registry()
    make_plugin_manager().hook.pgrelay_add_settings(settings=registry)
    flat = " ".join(help_text.split())
    missing = []
    for section, keys in registry.section_keys.items():
        for setting in keys.values():
            if not re.search(rf"(?<![\w-]){setting.name}(?!\w)", flat) or " ".join(setting.doc.split()) not in flat:
                missing.append(f"[{section}] {setting.name}")
            elif setting.default and f"{setting.default}" not in flat:
                missing.append(f"[{section}] {setting.name} default {setting.default}")
    assert registry.section_keys.keys() == {"databases", "users", "clusters", "listeners", "poolers", "peers"}
    assert missing == [], f"--help does not document: {missing}"


def fake_installed_plugin(tmp_path):
    """A third-party plugin 'installed' with a dist-info entry point, found through PYTHONPATH."""
    site = tmp_path / "site"
    (site / "myplug-1.2.dist-info").mkdir(parents=True)
    (site / "myplug-1.2.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 1.2\n")
    (site / "myplug-1.2.dist-info" / "entry_points.txt").write_text("[pgrelay]\nmyplug = myplug_mod\n")
    (site / "myplug_mod.py").write_text(
        "from pgrelay import hookimpl\n"
        "from pgrelay.settings import Setting, Int\n\n"
        "@hookimpl\n"
        "def pgrelay_add_settings(settings):\n"
        "    settings.add(Setting('myplug_threshold', Int(1), '17', True, 'Threshold of the myplug plugin.'))\n")
    return str(site)


def test_help_and_list_plugins_include_installed_plugin(tmp_path, pg):
    site = fake_installed_plugin(tmp_path)
    result = pgrelay("--help", COLUMNS="2000", PYTHONPATH=site)
    assert result.returncode == 0, result.stderr
    block = option_blocks(result.stdout)["myplug_threshold"]
    assert block == "--myplug_threshold INT Threshold of the myplug plugin. (default: 17)"
    path, _ = write_config(tmp_path, pg, "myplug_threshold = 3\n")
    result = pgrelay("--list-plugins", path, PYTHONPATH=site)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["myplug", "myplug", "1.2"]
    assert lines[1].split() == ["hooks:", "pgrelay_add_settings"]
    # Without the plugin installed, its setting is an unknown key.
    result = pgrelay("--list-plugins", path)
    assert result.returncode == 1
    assert result.stderr == f"pgrelay: error: {path}:10: unknown setting 'myplug_threshold'\n"


def test_help_usage_line_not_doubled(help_text):
    assert help_text.startswith("usage: pgrelay [CONFIG_FILE | -c CONFIG_FILE]"), help_text[:80]
    assert help_text.count("usage:") == 1


def test_help_lists_pgbouncer_switches(help_text):
    """PgBouncer's usage() lines, pgrelay's wording where it does more; -R is gone since 1.26."""
    for line in ("  -d, --daemon         run in background (as a daemon); needs pidfile",
                 "  -q, --quiet          run quietly (no log to stderr)",
                 "  -u, --user=USERNAME  assume identity of USERNAME (after binding; the `user` setting)",
                 "  -v, --verbose        increase verbosity (repeatable: -vv)",
                 "  -V, --version        show version, then exit",
                 "  -h, --help           show this help, then exit"):
        assert line in help_text.splitlines(), line
    assert "-R" not in help_text and "--reboot" not in help_text
    assert pgrelay("-h", COLUMNS="2000").stdout == help_text


def test_version():
    """PgBouncer's -V: the version string first (SHOW VERSION's answer too), then the libraries."""
    import platform
    import ssl

    import gevent
    expected = (f"pgrelay {__version__}\ngevent {gevent.__version__}\npython {platform.python_version()}\n"
                f"tls: {ssl.OPENSSL_VERSION}\n")
    assert version_string() == f"pgrelay {__version__}"
    for flag in ("--version", "-V", "-qV"):
        result = pgrelay(flag)
        assert (result.returncode, result.stdout, result.stderr) == (0, expected, "")
    # As getopt in PgBouncer: -V acts when reached, before a later bad switch or a missing file.
    result = pgrelay("-V", "-R", "/nonexistent.ini")
    assert (result.returncode, result.stdout) == (0, expected)


# -- --list-plugins ----------------------------------------------------------------------------

def test_list_plugins(tmp_path, pg):
    path, _ = write_config(tmp_path, pg)
    result = pgrelay("--list-plugins", path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 * len(BUILTIN_HOOKS)
    listed = {}
    for name_line, hooks_line in zip(lines[::2], lines[1::2]):
        name, origin = name_line.split(None, 1)
        assert origin == f"pgrelay {__version__}"
        assert hooks_line.strip().startswith("hooks: ")
        listed[name] = hooks_line.strip()[len("hooks: "):]
    assert listed == BUILTIN_HOOKS
    assert [line.split()[0] for line in lines[::2]] == list(reversed(BUILTIN_PLUGINS))


# -- configuration errors ----------------------------------------------------------------------

def test_unknown_key_exits_with_file_line(tmp_path, pg):
    path, _ = write_config(tmp_path, pg, "max_cleint_conn = 10\n")
    result = pgrelay(path)
    assert result.returncode == 1
    assert result.stderr == f"pgrelay: error: {path}:10: unknown setting 'max_cleint_conn'\n"
    assert result.stdout == ""


def test_bad_value_exits_with_file_line(tmp_path, pg):
    path, _ = write_config(tmp_path, pg, "listen_port = abc\n")
    result = pgrelay("-c", path)
    assert result.returncode == 1
    assert result.stderr == f"pgrelay: error: {path}:10: listen_port: invalid integer 'abc'\n"


def test_invalid_plugin_exits_without_traceback(tmp_path, pg):
    plugin = tmp_path / "typo.py"
    plugin.write_text("from pgrelay import hookimpl\n\n@hookimpl\ndef pgrelay_route_clinet(relay, login):\n    return None\n")
    path, _ = write_config(tmp_path, pg, f"plugins = {plugin}\n")
    result = pgrelay(path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("pgrelay: error: ") and "pgrelay_route_clinet" in result.stderr


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "nope.ini")
    result = pgrelay(path)
    assert result.returncode == 1
    assert result.stderr == f"pgrelay: error: cannot read configuration file {path}: no such file\n"


# -- starting from a file -----------------------------------------------------------------------

@pytest.mark.parametrize("how", ["positional", "-c", "--config="])
def test_starts_from_config_file(tmp_path, pg, how):
    path, port = write_config(tmp_path, pg)
    args = {"positional": [path], "-c": ["-c", path], "--config=": [f"--config={path}"]}[how]
    log_path = tmp_path / "relay.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pgrelay", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=clean_env())
    try:
        deadline = time.monotonic() + 20
        while "process up" not in log_path.read_text():
            assert proc.poll() is None, f"pgrelay exited with {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"pgrelay did not start:\n{log_path.read_text()}"
            time.sleep(0.05)
        with psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres") as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT current_setting('port')::int")
                assert cur.fetchone() == (pg.port,)
        conn.close()
    finally:
        proc.send_signal(signal.SIGQUIT)
        rc = proc.wait(15)
    assert rc == 0
    log = log_path.read_text()
    assert "shutdown complete" in log
    assert "Traceback" not in log and "internal error" not in log
