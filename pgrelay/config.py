"""Loads a Config from a pgbouncer.ini-style file, PGRELAY_* variables and --flags (configargparse)."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import configargparse

from .errors import ConfigError
from .settings import SettingsRegistry

MAX_INCLUDE_DEPTH = 10


@dataclass(frozen=True)
class Entry:
    """One `key = value` line of an INI section, with where it came from."""

    key: str
    value: str = field(repr=False)  # may hold a password
    file: str = ""
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class IniFile:
    sections: dict[str, list[Entry]] = field(default_factory=dict)


_SECTION = re.compile(r"^\[\s*([^\]]+?)\s*\](.*)$")
COMMENT_CHARS = ";#"
# What an inline comment would look like: a ; or # after white space. PgBouncer keeps it in the
# value (and so does pgrelay); it is only used to explain the error or warning that follows.
_LOOKS_LIKE_COMMENT = re.compile(r"\s[;#]")
INLINE_COMMENT_HINT = ("';' and '#' start a comment only at the beginning of a line: as in PgBouncer, a value "
                       "runs to the end of its line, so put the comment on a line of its own")


def read_ini(text: str, filename: str, ini: IniFile | None = None, depth: int = 0,
             section: str | None = None) -> IniFile:
    """Parse PgBouncer's INI dialect (libusual's cfparser.c) the way PgBouncer does.

    [section] headers, `key = value` lines and %include FILE. A line whose first non-blank
    character is ; or # is a comment. There are no inline comments: a value runs to the end of
    its line (trailing blanks removed), ; and # included, in every section. What follows a
    [section] header on its line is read as a line of its own, so a comment may follow a header.
    """
    ini = ini or IniFile()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        match = _SECTION.match(line)
        if match:
            section = match.group(1).lower()
            ini.sections.setdefault(section, [])
            line = match.group(2).strip()
        if not line or line[0] in COMMENT_CHARS:
            continue
        if line.lower().startswith("%include"):
            target = line[len("%include"):].strip()
            if not target:
                raise ConfigError(f"{filename}:{number}: %include needs a file name")
            if depth >= MAX_INCLUDE_DEPTH:
                raise ConfigError(f"{filename}:{number}: %include nested too deeply")
            path = os.path.join(os.path.dirname(filename), target)
            try:
                with open(path, encoding="utf-8") as f:
                    included = f.read()
            except (OSError, ValueError) as exc:  # ValueError: a NUL in the name, or the file is not UTF-8
                reason = exc.strerror if isinstance(exc, OSError) else exc
                raise ConfigError(f"{filename}:{number}: cannot read included file {path}: {reason}") from None
            read_ini(included, path, ini, depth + 1, section)
            continue
        if line.startswith("["):
            raise ConfigError(f"{filename}:{number}: syntax error, expected '[section]': {line[:80]!r}")
        if "=" not in line:
            raise ConfigError(f"{filename}:{number}: syntax error, expected 'key = value': {line[:80]!r}")
        if section is None:
            raise ConfigError(f"{filename}:{number}: setting outside of any [section]")
        key, _, value = line.partition("=")
        ini.sections[section].append(Entry(key.strip(), value.strip(), filename, number))
    return ini


class _IniFileParser(configargparse.ConfigFileParser):
    """Hands configargparse the [pgbouncer]/[pgrelay] keys and keeps the other sections."""

    def __init__(self, registry: SettingsRegistry, lenient: bool = False):
        super().__init__()
        self.registry = registry
        self.lenient = lenient
        self.ini = IniFile()
        self.warnings: list[str] = []
        self.path: str | None = None

    def get_syntax_description(self) -> str:
        return "PgBouncer INI: [pgbouncer] (or [pgrelay]) key = value lines, [databases], [users]."

    def parse(self, stream) -> dict[str, str]:
        self.path = getattr(stream, "name", "<config>")
        self.ini = read_ini(stream.read(), self.path)
        values: dict[str, str] = {}
        for name in ("pgbouncer", "pgrelay"):
            for entry in self.ini.sections.get(name, []):
                key = entry.key.lower()
                setting = self.registry.settings.get(key)
                if setting is None:
                    if self.lenient:
                        continue
                    raise ConfigError(f"{entry.where}: unknown setting '{entry.key}'")
                looks_commented = _LOOKS_LIKE_COMMENT.search(entry.value) is not None
                try:
                    setting.parse(entry.value)
                except ValueError as exc:
                    hint = f"; {INLINE_COMMENT_HINT}" if looks_commented else ""
                    raise ConfigError(f"{entry.where}: {key}: {exc}{hint}") from None
                if looks_commented:
                    self.warnings.append(f"{entry.where}: the value of '{key}' includes what looks like a "
                                         f"comment: {INLINE_COMMENT_HINT}")
                if setting.planned:
                    self.warnings.append(
                        f"{entry.where}: setting '{key}' is not implemented by pgrelay yet and is ignored")
                values[key] = entry.value
        for name, entries in self.ini.sections.items():
            if name in ("pgbouncer", "pgrelay") or name in self.registry.sections:
                continue
            where = entries[0].where if entries else self.path
            if self.lenient:
                continue
            raise ConfigError(f"{where}: unknown section [{name}]")
        return values


class _ArgumentParser(configargparse.ArgumentParser):
    def error(self, message: str):  # argparse would sys.exit(); we want a ConfigError
        raise ConfigError(message)


@dataclass(frozen=True)
class Config:
    """Loaded setting values (attribute access) plus the raw lines of plugin-owned sections."""

    values: dict[str, Any]
    sections: dict[str, tuple[Entry, ...]]
    path: str | None
    warnings: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def section(self, name: str) -> tuple[Entry, ...]:
        return self.sections.get(name, ())

    def changed(self, other: "Config") -> frozenset[str]:
        """Names of settings and sections whose value differs between two configs."""
        names = {k for k in self.values.keys() | other.values.keys()
                 if self.values.get(k) != other.values.get(k)}
        strip = lambda entries: [(e.key, e.value) for e in entries]  # noqa: E731
        names |= {f"[{s}]" for s in self.sections.keys() | other.sections.keys()
                  if strip(self.sections.get(s, ())) != strip(other.sections.get(s, ()))}
        return frozenset(names)


def build_parser(registry: SettingsRegistry, ini_parser: configargparse.ConfigFileParser | None = None,
                 prog: str = "pgrelay") -> configargparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=prog,
        description="pgrelay: a PostgreSQL connection pooler that reads PgBouncer's configuration.",
        config_file_parser_class=ini_parser or _IniFileParser(registry),
        args_for_setting_config_path=["-c", "--config"],
        config_arg_help_message="configuration file (pgbouncer.ini format); may also be given as the first argument",
        auto_env_var_prefix="PGRELAY_",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    for setting in registry:
        note = " [planned: accepted and ignored]" if setting.planned else ""
        reload = "" if setting.reload else " Needs a restart to change."
        default = setting.default if setting.default != "" else "empty"
        parser.add_argument(
            f"--{setting.name}", dest=setting.name, type=_typed(setting), default=None,
            metavar=setting.type.name.upper() if "|" not in setting.type.name else "{" + setting.type.name + "}",
            help=f"{setting.doc}{reload} (default: {default}){note}",
        )
    return parser


def _typed(setting):
    def parse(text: str):
        try:
            return setting.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{setting.name}: {exc}") from None
    parse.__name__ = setting.name
    return parse


def load_config(registry: SettingsRegistry, config_path: str | None, args: Iterable[str] = (),
                env: dict[str, str] | None = None, lenient: bool = False) -> Config:
    """Read the file, then PGRELAY_<NAME> variables, then --name flags, each overriding the one before.

    `lenient` skips unknown keys and flags: the bootstrap read that finds which plugins to load.
    """
    ini_parser = _IniFileParser(registry, lenient)
    parser = build_parser(registry, ini_parser)
    argv = list(args)
    if config_path:
        if not os.path.isfile(config_path):
            raise ConfigError(f"cannot read configuration file {config_path}: no such file")
        argv = ["-c", config_path] + argv
    env = dict(os.environ if env is None else env)
    if lenient:
        namespace, _ = parser.parse_known_args(argv, env_vars=env)
    else:
        namespace = parser.parse_args(argv, env_vars=env)
    values = {}
    for setting in registry:
        value = getattr(namespace, setting.name, None)
        values[setting.name] = setting.default_value if value is None else value
    sections = {name: tuple(entries) for name, entries in ini_parser.ini.sections.items()
                if name not in ("pgbouncer", "pgrelay")}
    warnings = list(ini_parser.warnings)
    for setting in registry:
        if setting.planned and f"PGRELAY_{setting.name.upper()}" in env:
            warnings.append(f"PGRELAY_{setting.name.upper()}: setting '{setting.name}' is not implemented by pgrelay yet and is ignored")
    path = os.path.abspath(config_path) if config_path else None
    return Config(values=values, sections=sections, path=path, warnings=tuple(warnings))


def parse_options(entry: Entry, keys, section: str, kind: str = "", planned: frozenset = frozenset(),
                  warnings: list[str] | None = None, defaults: bool = True) -> dict[str, Any]:
    """Parse a `name = key=value ...` line against declared keys (Settings of one section).

    Unknown keys are a ConfigError naming the file and line; keys in `planned` are skipped with a
    warning. With `defaults`, keys the line does not set get their declared default.
    """
    declared = {k.name: k for k in keys}
    values = {name: k.default_value for name, k in declared.items()} if defaults else {}
    label = f"{kind} option" if kind else "option"
    for key, text in parse_connstr(entry.value, entry.where).items():
        if key in planned:
            if warnings is not None:
                warnings.append(f"{entry.where}: {label} '{key}' is not implemented by pgrelay yet and is ignored")
            continue
        if key not in declared:
            raise ConfigError(f"{entry.where}: unknown {label} '{key}' in [{section}] entry {entry.key!r}")
        try:
            values[key] = declared[key].parse(text)
        except ValueError as exc:
            raise ConfigError(f"{entry.where}: {key}: {exc}") from None
    return values


def parse_connstr(text: str, where: str = "") -> dict[str, str]:
    """libpq-style `key=value key2='quoted value'` pairs, as used in [databases] lines."""
    out: dict[str, str] = {}
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos].isspace():
            pos += 1
        if pos >= end:
            return out
        if text[pos] in COMMENT_CHARS:
            raise ConfigError(f"{where}: expected key=value in {text[pos:pos + 40]!r}; {INLINE_COMMENT_HINT}")
        eq = text.find("=", pos)
        if eq < 0:
            raise ConfigError(f"{where}: expected key=value in {text[pos:pos + 40]!r}")
        key = text[pos:eq].strip()
        if not key or any(c.isspace() for c in key):
            raise ConfigError(f"{where}: bad key {key!r}")
        pos = eq + 1
        while pos < end and text[pos] in " \t":
            pos += 1
        if pos < end and text[pos] == "'":
            pos += 1
            value = []
            while True:
                if pos >= end:
                    raise ConfigError(f"{where}: unterminated quoted value for {key}")
                ch = text[pos]
                if ch == "\\" and pos + 1 < end:
                    value.append(text[pos + 1])
                    pos += 2
                elif ch == "'":
                    if pos + 1 < end and text[pos + 1] == "'":
                        value.append("'")
                        pos += 2
                    else:
                        pos += 1
                        break
                else:
                    value.append(ch)
                    pos += 1
            out[key] = "".join(value)
        else:
            start = pos
            while pos < end and not text[pos].isspace():
                pos += 1
            out[key] = text[start:pos]
