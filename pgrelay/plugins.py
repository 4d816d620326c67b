"""Builds one relay's plugin manager: hook specs, built-ins, third-party entry points, extra modules."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from importlib.metadata import entry_points
from typing import Sequence

import pluggy

from . import hookspecs
from .errors import ConfigError

ENTRY_POINT_GROUP = "pgrelay"
# Built-in plugins, registered first in this order (so third-party plugins are called before them).
BUILTIN_PLUGINS = ("databases", "local_pooler", "limits", "errors", "auth", "usernames", "hosts", "direct",
                   "dedicated_poolers", "admin", "metrics", "sentry", "systemd", "serverless")


def make_plugin_manager(extra: Sequence[str] = (), disabled: Sequence[str] = ()) -> pluggy.PluginManager:
    """A fresh manager: nothing is global, so tests and embedders may build many relays."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for name in disabled:
        pm.set_blocked(name)
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    missing = [name for name in BUILTIN_PLUGINS if name not in found and not pm.is_blocked(name)]
    if missing:
        raise ConfigError(f"built-in plugins {', '.join(missing)} are not installed as entry points; "
                          "install pgrelay with pip (pip install -e . in a checkout)")
    try:
        for name in BUILTIN_PLUGINS:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for spec in extra:
            if pm.is_blocked(spec):
                continue
            pm.register(_import_plugin(spec), name=spec)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigError(f"cannot load plugin: {exc}") from None
    return pm


def _import_plugin(spec: str):
    """A module name (mypkg.routing) or a path to a .py file."""
    try:
        if spec.endswith(".py") or os.sep in spec:
            name = "pgrelay_extra_" + os.path.splitext(os.path.basename(spec))[0]
            loader_spec = importlib.util.spec_from_file_location(name, spec)
            if loader_spec is None or loader_spec.loader is None:
                raise ImportError(f"cannot load {spec}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
            return module
        return importlib.import_module(spec)
    except Exception as exc:
        raise ConfigError(f"cannot load plugin {spec!r}: {type(exc).__name__}: {exc}") from None


def describe_plugins(pm: pluggy.PluginManager) -> list[tuple[str, str, list[str]]]:
    """(name, origin, hooks) for each registered plugin, in call order (first called first)."""
    dists = {id(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in pm.list_plugin_distinfo()}
    rows = []
    for name, plugin in reversed(list(pm.list_name_plugin())):
        if plugin is None:  # blocked (disable_plugins)
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or ())
        origin = dists.get(id(plugin), getattr(plugin, "__file__", None) or getattr(plugin, "__name__", "?"))
        rows.append((name, origin, hooks))
    return rows
