"""The `pgrelay` command: run a relay from a config file, list plugins, show help, run the demo, or check the budget."""

from __future__ import annotations

import sys

USAGE = """pgrelay [CONFIG_FILE | -c CONFIG_FILE] [--SETTING VALUE ...]
       pgrelay demo [--pool_mode MODE] [--listen_port PORT]
       pgrelay check CONFIG_FILE [--live] [--processes N] [--max-connections N] ...
       pgrelay --list-plugins [CONFIG_FILE]
       pgrelay --help | --version
"""

# Flags that take no value; every --setting takes one.
_FLAGS = {"-h", "--help", "--version", "--list-plugins", "-V"}


def _usage_error(message: str):
    raise SystemExit(f"pgrelay: error: {message}")


def split_args(argv: list[str], known_flags=frozenset(_FLAGS),
               error=_usage_error) -> tuple[str | None, list[str], set[str]]:
    """(config path, remaining --setting arguments, flags) from a command line; `error(message)`
    raises for a bad one (pgrelay check passes its own flags and error)."""
    path = None
    rest: list[str] = []
    flags: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in known_flags:
            flags.add(arg)
            i += 1
        elif arg in ("-c", "--config"):
            if i + 1 >= len(argv):
                error(f"{arg} needs a file name")
            path = argv[i + 1]
            i += 2
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
            i += 1
        elif arg.startswith("-"):
            rest.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                rest.append(argv[i + 1])
                i += 2
            else:
                i += 1
        elif path is None:
            path = arg
            i += 1
        else:
            error(f"unexpected argument {arg!r}")
    return path, rest, flags


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main
        return demo_main(argv[1:])
    if argv and argv[0] == "check":
        from .budget.command import main as check_main
        return check_main(argv[1:])
    from .errors import ConfigError
    path, rest, flags = split_args(argv)
    if "--version" in flags or "-V" in flags:
        from . import __version__
        print(f"pgrelay {__version__}")
        return 0
    if "-h" in flags or "--help" in flags:
        return _help()
    from .relay import Relay
    try:
        relay = Relay(path, rest)
    except ConfigError as exc:
        print(f"pgrelay: error: {exc}", file=sys.stderr)
        return 1
    if "--list-plugins" in flags:
        from .plugins import describe_plugins
        for name, origin, hooks in describe_plugins(relay.pm):
            print(f"{name:<24} {origin}")
            print(f"{'':<24} hooks: {', '.join(hooks) or '(none)'}")
        return 0
    try:
        relay.start()
    except ConfigError as exc:
        print(f"pgrelay: error: {exc}", file=sys.stderr)
        return 1
    relay.install_signal_handlers()
    relay.serve_forever()
    return 0


def _help() -> int:
    from .config import build_parser
    from .plugins import make_plugin_manager
    from .relay import Relay
    registry = Relay.declared_settings(make_plugin_manager())
    parser = build_parser(registry)
    parser.usage = USAGE
    sections = []
    for section, keys in registry.section_keys.items():
        sections.append(f"[{section}] keys ({registry.sections.get(section, '')}):")
        for setting in keys.values():
            default = f" (default: {setting.default})" if setting.default else ""
            sections.append(f"  {setting.name:<22} {setting.doc}{default}")
    parser.epilog = ("\n".join(sections) + "\n\n"
                     "Settings are read from the config file's [pgbouncer] (or [pgrelay]) section, then from\n"
                     "PGRELAY_<NAME> environment variables, then from --<name> flags, each overriding the last.\n"
                     "Other flags: --list-plugins, --version, -h/--help. `pgrelay demo` runs a throwaway setup;\n"
                     "`pgrelay check FILE` prints the connection budget (pgrelay check --help).")
    parser.print_help()
    return 0
