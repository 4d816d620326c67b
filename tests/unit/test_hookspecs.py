"""pgrelay/hookspecs.py: every hook is annotated and documented, and has exactly one call site, in the Relay method its docstring names."""

import ast
import inspect
import pathlib
import re

import pytest

from pgrelay import hookspecs
from pgrelay.relay import Relay

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "pgrelay").rglob("*.py")) + sorted((ROOT / "plugins").rglob("*.py"))

HOOKS = {name: fn for name, fn in vars(hookspecs).items()
         if name.startswith("pgrelay_") and hasattr(fn, "pgrelay_spec")}
FIRSTRESULT = {name for name, fn in HOOKS.items() if fn.pgrelay_spec.get("firstresult")}


KNOWN_FIRSTRESULT = {
    "pgrelay_choose_auth_method", "pgrelay_get_credentials", "pgrelay_check_password", "pgrelay_find_database",
    "pgrelay_route_client", "pgrelay_choose_host", "pgrelay_check_client_limits", "pgrelay_translate_error",
    "pgrelay_virtual_database", "pgrelay_sentry_event",
}
KNOWN_NOTIFICATIONS = {
    "pgrelay_add_settings", "pgrelay_configure", "pgrelay_reload", "pgrelay_startup", "pgrelay_shutdown",
    "pgrelay_client_connected", "pgrelay_client_disconnected", "pgrelay_server_connected",
    "pgrelay_server_disconnected", "pgrelay_report_stats", "pgrelay_reloading", "pgrelay_reload_failed",
    "pgrelay_admin_commands",
    "pgrelay_server_login_failed", "pgrelay_auth_failed", "pgrelay_host_changed",
    "pgrelay_internal_error",
}


def test_hook_list():
    """The documented plugin API is present (new hooks may be added; none may vanish or change kind)."""
    assert KNOWN_FIRSTRESULT | KNOWN_NOTIFICATIONS <= set(HOOKS)
    assert KNOWN_FIRSTRESULT <= FIRSTRESULT
    assert not KNOWN_NOTIFICATIONS & FIRSTRESULT
    # Every function in the module that looks like a hook is a hookspec (no forgotten marker).
    assert {n for n, f in vars(hookspecs).items() if n.startswith("pgrelay_") and callable(f)} == set(HOOKS)


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hookspec_annotated(name):
    sig = inspect.signature(HOOKS[name])
    assert sig.parameters, name
    for param in sig.parameters.values():
        assert param.annotation is not inspect.Parameter.empty, f"{name}({param.name}) has no annotation"
        assert param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, (name, param.name)
        assert param.default is inspect.Parameter.empty, (name, param.name)
    assert sig.return_annotation is not inspect.Signature.empty, f"{name} has no return annotation"
    if name not in FIRSTRESULT:
        assert str(sig.return_annotation) == "None", f"notification hook {name} should return None"
    else:
        assert "None" in str(sig.return_annotation), f"firstresult hook {name} must allow None"


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hookspec_docstring(name):
    doc = inspect.getdoc(HOOKS[name])
    assert doc, name
    assert "Called from:" in doc, name
    if name in FIRSTRESULT:
        returns = doc.split(":returns:", 1)
        assert len(returns) == 2, f"{name}: firstresult hook without a :returns: section"
        section = returns[1].split("Called from:")[0]
        assert re.search(r"\bNone\b", section), f"{name}: :returns: does not say what None means"


def relay_methods_named(doc):
    return re.findall(r"``Relay\.(\w+)``", doc)


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_called_from_names_existing_relay_method(name):
    doc = inspect.getdoc(HOOKS[name])
    called_from = doc.split("Called from:", 1)[1]
    methods = relay_methods_named(called_from)
    assert methods, f"{name}: 'Called from:' names no ``Relay.<method>``"
    for method in methods:
        assert callable(getattr(Relay, method, None)), f"{name}: Relay.{method} does not exist"


# -- call sites, by reading the source --------------------------------------------------------

def call_sites():
    """{hook name: [(file, line, enclosing class.function)]} for `<x>.hook.pgrelay_x(...)` and `_notify("pgrelay_x", ...)`."""
    sites = {}
    for path in SOURCES:
        if path.name == "hookspecs.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        stack = []

        def visit(node):
            is_scope = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if is_scope:
                stack.append(node.name)
            if isinstance(node, ast.Call):
                hook = None
                func = node.func
                if (isinstance(func, ast.Attribute) and func.attr.startswith("pgrelay_")
                        and isinstance(func.value, ast.Attribute) and func.value.attr == "hook"):
                    hook = func.attr
                elif (isinstance(func, ast.Attribute) and func.attr == "_notify" and node.args
                      and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                    hook = node.args[0].value
                if hook is not None:
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    sites.setdefault(hook, []).append((where, ".".join(stack)))
            for child in ast.iter_child_nodes(node):
                visit(child)
            if is_scope:
                stack.pop()

        visit(tree)
    return sites


def test_call_site_scan_finds_text_matches():
    """The AST scan agrees with a plain text search of the same files."""
    pattern = re.compile(r"\.hook\.(pgrelay_\w+)\(|_notify\(\"(pgrelay_\w+)\"")
    text_hits = sorted(m.group(1) or m.group(2) for path in SOURCES if path.name != "hookspecs.py"
                       for m in pattern.finditer(path.read_text()))
    ast_hits = sorted(h for h, sites in call_sites().items() for _ in sites)
    assert ast_hits == text_hits
    assert len(text_hits) >= len(HOOKS)


def test_every_called_hook_exists():
    assert set(call_sites()) - set(HOOKS) == set()


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_one_call_site_per_hook(name):
    sites = call_sites().get(name, [])
    assert len(sites) == 1, f"{name} is called from {len(sites)} places: {sites}"


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_call_site_is_the_documented_relay_method(name):
    doc = inspect.getdoc(HOOKS[name])
    documented = {f"Relay.{m}" for m in relay_methods_named(doc.split("Called from:", 1)[1])}
    sites = call_sites().get(name, [])
    assert sites, f"{name} is never called"
    for where, scope in sites:
        assert where.startswith("pgrelay/relay.py:") and scope in documented, \
            f"{name} called at {where} in {scope or 'module level'}, documented: {sorted(documented)}"
