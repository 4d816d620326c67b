"""Renders README.rst's reference sections from the declarations: settings, section keys and hooks.

`python -m pgrelay.docs` rewrites the generated blocks of README.rst in place; the tests check
that README.rst matches what this module renders.
"""

from __future__ import annotations

import inspect
import re
import sys

from . import hookspecs
from .plugins import make_plugin_manager
from .settings import Setting, SettingsRegistry

MARKERS = {
    "settings": (".. begin generated: settings", ".. end generated: settings"),
    "sections": (".. begin generated: sections", ".. end generated: sections"),
    "hooks": (".. begin generated: hooks", ".. end generated: hooks"),
}


def full_registry() -> SettingsRegistry:
    from .relay import Relay
    return Relay.declared_settings(make_plugin_manager())


def _rst(text: str) -> str:
    """Plain text made safe for reStructuredText (a bare | starts a substitution, a * emphasis)."""
    return text.replace("|", "\\|").replace("*", "\\*")


def _entry(setting: Setting) -> list[str]:
    default = f"``{setting.default}``" if setting.default != "" else "empty"
    flags = [_rst(setting.type.name), f"default {default}"]
    if not setting.reload:
        flags.append("restart to change")
    if setting.planned:
        flags.append("planned: accepted with a warning, not yet implemented")
    return [f"``{setting.name}`` ({', '.join(flags)})", f"    {_rst(setting.doc)}", ""]


def render_settings(registry: SettingsRegistry) -> list[str]:
    built = [s for s in registry if not s.planned]
    planned = [s for s in registry if s.planned]
    lines = []
    for setting in sorted(built, key=lambda s: s.name):
        lines += _entry(setting)
    lines += ["PgBouncer settings that pgrelay accepts but does not implement yet (each logs a warning",
              "naming it when set):", ""]
    lines += ["    " + ", ".join(f"``{s.name}``" for s in sorted(planned, key=lambda s: s.name)), ""]
    return lines


def render_sections(registry: SettingsRegistry) -> list[str]:
    lines = []
    for section, keys in registry.section_keys.items():
        lines += [f"``[{section}]`` keys", "^" * (len(section) + 11), ""]
        doc = registry.sections.get(section)
        if doc:
            lines += [_rst(doc), ""]
        for setting in keys.values():
            lines += _entry(setting)
    return lines


def render_hooks() -> list[str]:
    lines = []
    for name, func in inspect.getmembers(hookspecs, inspect.isfunction):
        if not name.startswith("pgrelay_"):
            continue
        opts = getattr(func, "pgrelay_spec", {}) or {}
        signature = str(inspect.signature(func)).replace("'", "").replace('"', "")
        kind = "first result" if opts.get("firstresult") else "all implementations"
        doc = inspect.cleandoc(func.__doc__ or "")
        lines += [f"``{name}{signature}``", f"    *{kind}*.", ""]
        lines += ["    " + line if line else "" for line in doc.splitlines()]
        lines.append("")
    return lines


def render(block: str) -> list[str]:
    if block == "settings":
        return render_settings(full_registry())
    if block == "sections":
        return render_sections(full_registry())
    return render_hooks()


def rewrite(text: str) -> str:
    for block, (begin, end) in MARKERS.items():
        pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.rst lacks the markers for the {block} block")
        replacement = f"{begin}\n\n" + "\n".join(render(block)) + f"\n{end}"
        text = pattern.sub(lambda _m, r=replacement: r, text)
    return text


def main(argv: list[str] | None = None) -> int:
    path = (argv or sys.argv[1:] or ["README.rst"])[0]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new = rewrite(text)
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
        print(f"{path}: reference sections updated")
    else:
        print(f"{path}: up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
