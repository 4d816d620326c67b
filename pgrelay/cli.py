"""The `pgrelay` command: PgBouncer's command line (-d -q -v -u -V -h) plus --SETTING VALUE overrides,
--list-plugins, and the `demo` and `check` subcommands."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

PROG = "pgrelay"

USAGE = """pgrelay [CONFIG_FILE | -c CONFIG_FILE] [OPTION]... [--SETTING VALUE ...]
       pgrelay demo [--pool_mode MODE] [--listen_port PORT]
       pgrelay check CONFIG_FILE [--live] [--processes N] [--max-connections N] ...
       pgrelay --list-plugins [CONFIG_FILE]
       pgrelay -V | -h
"""

# PgBouncer's switches, with its help text (src/main.c usage()). -R (online restart) is gone
# since PgBouncer 1.26, and so it is refused here as PgBouncer's getopt refuses it.
OPTIONS_HELP = """pgrelay is a connection pooler for PostgreSQL that runs PgBouncer configurations.

Options:
  -d, --daemon         run in background (as a daemon); needs pidfile
  -q, --quiet          run quietly (no log to stderr)
  -u, --user=USERNAME  assume identity of USERNAME (after binding; the `user` setting)
  -v, --verbose        increase verbosity (repeatable: -vv)
  -V, --version        show version, then exit
  -h, --help           show this help, then exit
  -c, --config FILE    configuration file, instead of the CONFIG_FILE argument
  --list-plugins       list the plugins loaded and the hooks each implements, then exit
  --SETTING VALUE      override a [pgbouncer] setting (below), e.g. --listen_port 6433
"""

# Flags that take no value; every --setting takes one (split_args, also used by `pgrelay check`).
_FLAGS = {"-h", "--help", "--version", "--list-plugins", "-V"}

_SHORT_FLAGS = {"d": "daemon", "q": "quiet", "v": "verbose", "V": "version", "h": "help"}
_LONG_FLAGS = {"--daemon": "d", "--quiet": "q", "--verbose": "v", "--version": "V", "--help": "h"}


class UsageError(Exception):
    """A command line getopt would refuse; the message is getopt's (and PgBouncer's)."""


@dataclass
class Options:
    """The main command line, taken apart."""

    path: str | None = None
    settings: list[str] = field(default_factory=list)  # --setting value arguments, for Relay
    daemon: bool = False
    quiet: bool = False
    verbose: int = 0                                    # how many -v
    user: str | None = None
    action: str | None = None                           # "version", "help" or "list-plugins"


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


def parse_command_line(argv: list[str]) -> Options:
    """PgBouncer's getopt_long("qvhdVu:") switches, in order (-V and -h act when reached), mixed
    with pgrelay's -c FILE, --list-plugins and --SETTING VALUE arguments.

    `--verbose` and `--user` are also settings: `--verbose=N` (with `=`) sets verbose to N, a bare
    `--verbose` raises it by one like -v; `--user NAME` and `--user=NAME` are the same as -u NAME.
    """
    opts = Options()
    rest: list[str] = []
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in _LONG_FLAGS:
            arg = "-" + _LONG_FLAGS[arg]
        if arg == "--user" or arg.startswith("--user="):
            if arg == "--user":
                if i >= len(argv):
                    raise UsageError(f"{PROG}: option '--user' requires an argument")
                opts.user, i = argv[i], i + 1
            else:
                opts.user = arg.split("=", 1)[1]
        elif arg == "--list-plugins":
            opts.action = opts.action or "list-plugins"
        elif arg == "--":  # the end of the switches, as for getopt: the config file follows
            positional = argv[i:]
            break
        elif arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            if name == "reboot" or not re.fullmatch(r"\w+(-\w+)*", name):  # --reboot: gone in 1.26
                raise UsageError(f"{PROG}: unrecognized option '{arg}'")
            rest.append(arg)
            if "=" not in arg:
                if i < len(argv):
                    rest.append(argv[i])  # a setting's value, even one that starts with '-'
                    i += 1
                elif name == "config":
                    raise UsageError(f"{PROG}: option '--config' requires an argument")
        elif arg == "-c":
            if i >= len(argv):
                raise UsageError(f"{PROG}: option requires an argument -- 'c'")
            rest += ["-c", argv[i]]
            i += 1
        elif arg.startswith("-") and len(arg) > 1:
            j = 1
            while j < len(arg):  # bundled short switches: -dv, -vvv, -uNAME, -du NAME
                ch = arg[j]
                j += 1
                if ch == "u":
                    if j < len(arg):
                        opts.user = arg[j:]
                    elif i < len(argv):
                        opts.user, i = argv[i], i + 1
                    else:
                        raise UsageError(f"{PROG}: option requires an argument -- 'u'")
                    break
                if ch not in _SHORT_FLAGS:
                    raise UsageError(f"{PROG}: invalid option -- '{ch}'")
                flag = _SHORT_FLAGS[ch]
                if flag in ("version", "help"):
                    opts.action = flag
                    return opts  # as getopt's loop in PgBouncer: printed and exit when reached
                if flag == "verbose":
                    opts.verbose += 1
                else:
                    setattr(opts, flag, True)
        else:
            rest.append(arg)
    opts.path, opts.settings, _ = split_args(rest, known_flags=frozenset(), error=_raise_usage)
    for arg in positional:
        if opts.path is not None:
            raise UsageError(f"{PROG}: unexpected argument {arg!r}")
        opts.path = arg
    return opts


def _raise_usage(message: str):
    raise UsageError(f"{PROG}: {message}")


def version_lines() -> list[str]:
    """`pgrelay -V`: the version string (also SHOW VERSION's answer), then the libraries, as
    PgBouncer prints PgBouncer 1.26.0, libevent, adns and tls lines."""
    import platform
    import ssl

    import gevent

    from . import version_string
    return [version_string(), f"gevent {gevent.__version__}", f"python {platform.python_version()}",
            f"tls: {ssl.OPENSSL_VERSION}"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main
        return demo_main(argv[1:])
    if argv and argv[0] == "check":
        from .budget.command import main as check_main
        return check_main(argv[1:])
    try:
        opts = parse_command_line(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        print(f'Try "{PROG} --help" for more information.', file=sys.stderr)
        return 1
    if opts.action == "version":
        print("\n".join(version_lines()))
        return 0
    if opts.action == "help":
        return _help()
    return _run(opts)


def _error(message: str) -> int:
    print(f"pgrelay: error: {message}", file=sys.stderr)
    return 1


def _run(opts: Options) -> int:
    from . import logs, process
    from .config import load_config
    from .errors import ConfigError
    from .relay import Relay
    from .settings import core_registry
    args = list(opts.settings)
    if opts.user is not None:
        args += ["--user", opts.user]
    try:
        if opts.verbose:  # -v raises the configured verbose by one each, for the process's life
            configured = load_config(core_registry(), opts.path, args, lenient=True).verbose
            args.append(f"--verbose={configured + opts.verbose}")
        relay = Relay(opts.path, args)
    except ConfigError as exc:
        return _error(str(exc))
    worker = _worker_link(relay)
    if opts.action == "list-plugins":
        from .plugins import describe_plugins
        for name, origin, hooks in describe_plugins(relay.pm):
            print(f"{name:<24} {origin}")
            print(f"{'':<24} hooks: {', '.join(hooks) or '(none)'}")
        return 0
    if opts.daemon and not relay.config.pidfile:
        return _error("daemon needs pidfile configured")
    logs.quiet = opts.quiet or opts.daemon  # PgBouncer: -d means -q as well
    try:
        logs.setup(relay.config)
        process.check_pidfile(relay.config.pidfile)
    except ConfigError as exc:
        return _error(str(exc))
    except OSError as exc:
        return _error(f"cannot open logfile {relay.config.logfile}: {exc.strerror or exc}")
    if worker is None and relay.config.workers > 1:
        from .workers import supervisor
        started = process.daemonize() if opts.daemon else None
        return supervisor.run(relay, opts.path, args, logs.quiet, started)
    started = process.daemonize() if opts.daemon else None
    try:
        relay.start()
    except (ConfigError, OSError) as exc:
        message = str(exc) if isinstance(exc, ConfigError) else _os_error(exc)
        if started is not None:
            logs.log.critical("%s", message)
            process.report_started(started, f"pgrelay: error: {message}\n")
            return 1
        return _error(message)
    process.report_started(started)
    relay.install_signal_handlers()
    if worker is not None:
        worker.start(relay)
    relay.serve_forever()
    return 0


def _worker_link(relay):
    """In a worker started by the workers' parent (pgrelay.workers): its link, set on the relay."""
    import os
    from .workers import WORKER_ENV
    value = os.environ.pop(WORKER_ENV, None)
    if not value:
        return None
    from . import client
    from .workers.link import WorkerLink
    link = WorkerLink.from_env(value)
    relay.worker = link
    client.number_clients(link.index + 1, link.count)
    return link


def _os_error(exc: OSError) -> str:
    if exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return exc.strerror or str(exc)


def _help() -> int:
    from .config import build_parser
    from .plugins import make_plugin_manager
    from .relay import Relay
    registry = Relay.declared_settings(make_plugin_manager())
    parser = build_parser(registry)
    parser.usage = USAGE
    parser.description = OPTIONS_HELP
    sections = []
    for section, keys in registry.section_keys.items():
        sections.append(f"[{section}] keys ({registry.sections.get(section, '')}):")
        for setting in keys.values():
            default = f" (default: {setting.default})" if setting.default else ""
            sections.append(f"  {setting.name:<22} {setting.doc}{default}")
    parser.epilog = ("\n".join(sections) + "\n\n"
                     "Settings are read from the config file's [pgbouncer] (or [pgrelay]) section, then from\n"
                     "PGRELAY_<NAME> environment variables, then from --<name> flags, each overriding the last.\n"
                     "`pgrelay demo` runs a throwaway setup; `pgrelay check FILE` prints the connection budget\n"
                     "(pgrelay check --help).")
    parser.print_help()
    return 0
