"""pgrelay/plugins.py: fresh plugin managers, built-in order, entry points, extra and disabled plugins."""

import importlib.metadata
import sys
import textwrap

import pytest

from pgrelay import Listener, Login, Reject, Route
from pgrelay.errors import ConfigError
from pgrelay.plugins import BUILTIN_PLUGINS, ENTRY_POINT_GROUP, describe_plugins, make_plugin_manager
from pgrelay.relay import Relay

BUILTIN_HOOKS = {
    "databases": ["pgrelay_add_settings", "pgrelay_configure", "pgrelay_find_database"],
    "local_pooler": ["pgrelay_add_settings", "pgrelay_route_client"],
    "limits": ["pgrelay_check_client_limits", "pgrelay_client_disconnected"],
    "errors": ["pgrelay_translate_error"],
    "auth": ["pgrelay_add_settings", "pgrelay_choose_auth_method", "pgrelay_configure", "pgrelay_get_credentials"],
    "usernames": ["pgrelay_add_settings", "pgrelay_parse_username"],
    "hosts": ["pgrelay_add_settings", "pgrelay_choose_host", "pgrelay_configure"],
    "direct": ["pgrelay_add_settings", "pgrelay_route_client"],
    "dedicated_poolers": ["pgrelay_add_settings", "pgrelay_configure", "pgrelay_route_client"],
    "admin": ["pgrelay_add_settings", "pgrelay_configure", "pgrelay_report_stats", "pgrelay_virtual_database"],
    "metrics": ["pgrelay_add_settings", "pgrelay_auth_failed", "pgrelay_configure", "pgrelay_reload",
                "pgrelay_shutdown", "pgrelay_startup"],
    "sentry": ["pgrelay_add_settings", "pgrelay_auth_failed", "pgrelay_client_disconnected", "pgrelay_configure",
               "pgrelay_host_changed", "pgrelay_internal_error", "pgrelay_reload", "pgrelay_server_disconnected",
               "pgrelay_server_login_failed", "pgrelay_startup"],
    "systemd": ["pgrelay_reload", "pgrelay_reload_failed", "pgrelay_reloading", "pgrelay_shutdown",
                "pgrelay_startup"],
    "serverless": ["pgrelay_add_listener_kinds", "pgrelay_add_settings"],
}
# The module of each built-in plugin: the admin console and the serverless endpoint are
# subpackages of pgrelay (wings), the others live in plugins/ (installed as pgrelay_plugins).
WINGS = {"admin": "pgrelay.admin", "serverless": "pgrelay.serverless.plugin"}
BUILTIN_MODULES = {name: WINGS.get(name, f"pgrelay_plugins.{name}") for name in BUILTIN_HOOKS}

ROUTING_PLUGIN = '''
from pgrelay import hookimpl, Reject, Route, HostAddr

@hookimpl
def pgrelay_route_client(relay, login):
    if login.database == "blocked":
        return Reject("routed away by {tag}", "42000")
    if login.database == "elsewhere":
        return Route(pool_key=("{tag}", login.user), name="{tag}", hosts=(HostAddr("/{tag}", 1),),
                     dbname="{tag}db", server_user=login.user)
    return None
'''


def plugin_source(tag):
    return textwrap.dedent(ROUTING_PLUGIN.format(tag=tag))


def login(database, user="alice"):
    return Login(client_id=1, listener=Listener("test", "127.0.0.1", 6432), peer="127.0.0.1:5000",
                 user=user, database=database)


def write_config(tmp_path, extra_lines=""):
    path = tmp_path / "relay.ini"
    path.write_text("[databases]\nappdb = host=127.0.0.1 port=5432\n"
                    "[pgbouncer]\nlisten_addr = 127.0.0.1\nauth_type = trust\n" + extra_lines)
    return str(path)


def names(pm):
    """Registered plugins in registration order (pluggy lists blocked names with plugin None)."""
    return [name for name, plugin in pm.list_name_plugin() if plugin is not None]


def test_fresh_manager_each_call():
    a, b = make_plugin_manager(), make_plugin_manager()
    assert a is not b and a.hook is not b.hook

    class Probe:
        pass

    a.register(Probe(), name="probe")
    assert a.get_plugin("probe") is not None
    assert b.get_plugin("probe") is None
    assert "probe" not in names(b)
    assert names(b) == list(BUILTIN_PLUGINS)


def test_builtins_registered_in_order():
    pm = make_plugin_manager()
    assert names(pm) == list(BUILTIN_PLUGINS)
    assert BUILTIN_PLUGINS == ("databases", "local_pooler", "limits", "errors", "auth", "usernames", "hosts",
                               "direct", "dedicated_poolers", "admin", "metrics", "sentry", "systemd", "serverless")
    for name in BUILTIN_PLUGINS:
        assert pm.get_plugin(name).__name__ == BUILTIN_MODULES[name]


def test_entry_points_are_exactly_the_builtins():
    """Packaging check: setup.cfg's [options.entry_points] pgrelay group as installed."""
    dist = importlib.metadata.distribution("pgrelay")
    eps = {ep.name: ep.value for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP}
    assert eps == {name: BUILTIN_MODULES[name] for name in BUILTIN_PLUGINS}
    for ep in dist.entry_points:
        if ep.group == ENTRY_POINT_GROUP:
            assert ep.load().__name__ == BUILTIN_MODULES[ep.name]
    console = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert console == {"pgrelay": "pgrelay.cli:main"}


def test_extra_plugin_from_module_name(tmp_path, monkeypatch):
    module = "pgrelay_t_extra_mod_" + tmp_path.name.replace("-", "_")
    (tmp_path / f"{module}.py").write_text(plugin_source("modplug"))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        pm = make_plugin_manager(extra=[module])
        assert names(pm) == list(BUILTIN_PLUGINS) + [module]
        assert pm.get_plugin(module).__name__ == module
        # Called before the built-in local pooler.
        impls = pm.hook.pgrelay_route_client.get_hookimpls()
        assert [i.plugin_name for i in reversed(impls)] == [module, "local_pooler", "direct", "dedicated_poolers"]
    finally:
        sys.modules.pop(module, None)


def test_extra_plugin_from_file_wins_over_local_pooler(tmp_path):
    plugin = tmp_path / "myrouting.py"
    plugin.write_text(plugin_source("fileplug"))
    relay = Relay(write_config(tmp_path, f"plugins = {plugin}\n"), env={})
    assert names(relay.pm) == list(BUILTIN_PLUGINS) + [str(plugin)]
    assert relay.route_client(login("blocked")) == Reject("routed away by fileplug", "42000")
    route = relay.route_client(login("elsewhere"))
    assert (route.name, route.dbname, route.pool_key) == ("fileplug", "fileplugdb", ("fileplug", "alice"))
    # The plugin returns None for other databases: the local pooler decides.
    route = relay.route_client(login("appdb"))
    assert isinstance(route, Route) and route.name == "appdb/alice" and route.dbname == "appdb"
    assert relay.route_client(login("nodb")) == Reject("no such database: nodb", "3D000")


def test_extra_plugin_module_via_relay_flag(tmp_path, monkeypatch):
    module = "pgrelay_t_extra_flag_" + tmp_path.name.replace("-", "_")
    (tmp_path / f"{module}.py").write_text(plugin_source("flagplug"))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        relay = Relay(write_config(tmp_path), ["--plugins", module], env={})
        assert relay.route_client(login("blocked")) == Reject("routed away by flagplug", "42000")
        relay = Relay(write_config(tmp_path), env={"PGRELAY_PLUGINS": module})
        assert relay.route_client(login("blocked")) == Reject("routed away by flagplug", "42000")
    finally:
        sys.modules.pop(module, None)


def test_disabled_plugins_not_loaded(tmp_path):
    pm = make_plugin_manager(disabled=["limits", "errors"])
    assert names(pm) == [n for n in BUILTIN_PLUGINS if n not in ("limits", "errors")]
    assert pm.get_plugin("limits") is None
    assert pm.is_blocked("limits") and pm.is_blocked("errors")
    assert pm.hook.pgrelay_check_client_limits.get_hookimpls() == []
    plugin = tmp_path / "skipme.py"
    plugin.write_text("raise RuntimeError('must not be imported')\n")
    pm = make_plugin_manager(extra=[str(plugin)], disabled=[str(plugin)])
    assert names(pm) == list(BUILTIN_PLUGINS)
    relay = Relay(write_config(tmp_path, "disable_plugins = local_pooler\n"), env={})
    assert names(relay.pm) == [n for n in BUILTIN_PLUGINS if n != "local_pooler"]
    # With no routing plugin the core refuses every client.
    assert relay.route_client(login("appdb")).message == "no such database: appdb"


@pytest.mark.parametrize("spec", ["/nonexistent/dir/plugin.py", "pgrelay_t_no_such_module", "BADFILE"],
                         ids=["missing-file", "missing-module", "file-with-error"])
def test_bad_extra_raises_config_error(tmp_path, spec):
    if spec == "BADFILE":
        spec = str(tmp_path / "broken.py")
        (tmp_path / "broken.py").write_text("def pgrelay_route_client(:\n")
    with pytest.raises(ConfigError) as exc:
        make_plugin_manager(extra=[spec])
    assert str(exc.value).startswith(f"cannot load plugin {spec!r}: ")


def test_bad_extra_via_config_file(tmp_path):
    path = write_config(tmp_path, "plugins = /nonexistent/x.py\n")
    with pytest.raises(ConfigError, match=r"cannot load plugin '/nonexistent/x\.py': FileNotFoundError"):
        Relay(path, env={})


@pytest.mark.parametrize("body,problem", [
    ("def pgrelay_route_clinet(relay, login):\n    return None\n", "pgrelay_route_clinet"),
    ("def pgrelay_route_client(relay, logn):\n    return None\n", "logn"),
], ids=["unknown-hook", "unknown-argument"])
def test_invalid_plugin_is_a_config_error(tmp_path, body, problem):
    """A plugin that does not match the hookspecs is refused like any other bad plugin: a ConfigError naming it."""
    plugin = tmp_path / "typo.py"
    plugin.write_text("from pgrelay import hookimpl\n\n@hookimpl\n" + body)
    with pytest.raises(ConfigError) as exc:
        make_plugin_manager(extra=[str(plugin)])
    assert str(plugin) in str(exc.value) and problem in str(exc.value)


def test_describe_plugins(tmp_path):
    plugin = tmp_path / "described.py"
    plugin.write_text(plugin_source("described"))
    rows = describe_plugins(make_plugin_manager(extra=[str(plugin)]))
    assert [name for name, _, _ in rows] == [str(plugin)] + list(reversed(BUILTIN_PLUGINS))
    assert rows[0][2] == ["pgrelay_route_client"]
    assert rows[0][1] == str(plugin)
    version = importlib.metadata.version("pgrelay")
    for name, origin, hooks in rows[1:]:
        assert hooks == BUILTIN_HOOKS[name], name
        assert origin == f"pgrelay {version}"


def test_describe_plugins_leaves_out_disabled():
    """describe_plugins lists registered plugins only; a disabled one is not loaded, so not listed."""
    rows = describe_plugins(make_plugin_manager(disabled=["limits"]))
    assert [name for name, _, _ in rows] == [n for n in reversed(BUILTIN_PLUGINS) if n != "limits"]
