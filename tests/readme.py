"""README.rst as test data: its literal blocks (each with its kind), its connection strings, and the
files its configurations name, made real in a directory so that the configurations can be loaded.

tests/test_readme_examples.py loads every configuration block; tests/integration/test_readme_connections.py
runs every connection string against the configuration it belongs to.
"""

from __future__ import annotations

import os
import re
import textwrap
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# PGRELAY_TEST_README points the README tests at another copy (to see them fail on a broken one).
README = os.environ.get("PGRELAY_TEST_README") or os.path.join(ROOT, "README.rst")
# The sections whose connection strings tests/integration/test_readme_connections.py runs.
RUN_SECTIONS = ("Quick start", "Connection options", "Authentication", "TLS")

TITLE_UNDERLINES = "=-^"
SHELL_COMMANDS = ("pip ", "pgrelay ", "PGRELAY_", "python ")
HBA_TYPES = ("local", "host", "hostssl", "hostnossl")
# A log line in PgBouncer's format, as pgrelay.logs writes it.
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC \[\d+\] (LOG|WARNING|ERROR|FATAL|DEBUG) \S")


@dataclass(frozen=True)
class Block:
    """One literal block: its text (dedented), the README line of its first line, and where it is."""

    text: str
    line: int
    section: str      # the enclosing "----" section title
    intro: str        # the paragraph line ending in "::" that introduces it
    kind: str

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.kind}"


@dataclass(frozen=True)
class ConnString:
    """A `psql "..."` connection string, wherever it is (a literal block or running text)."""

    conninfo: str     # white space normalised (a string may be wrapped over two README lines)
    line: int
    section: str
    comment: str      # the `# ...` after it on its line, if any

    @property
    def id(self) -> str:
        return f"line{self.line}-" + re.sub(r"\W+", "-", self.comment or self.section).strip("-")


def read(path: str = README) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _sections(lines: list[str]) -> list[str]:
    """The "----"-level section title in force at each line."""
    out, current = [], ""
    for i, line in enumerate(lines):
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if (line.strip() and following and len(set(following.strip())) == 1 and following[0] == "-"
                and len(following.strip()) >= len(line.strip()) and not line.startswith(" ")):
            current = line.strip()
        out.append(current)
    return out


def classify(text: str) -> str:
    """What a literal block is: ini, userlist, hba, sql, psql, console (psql ... pgbouncer -c "CMD"), curl,
    neon (a Node program using @neondatabase/serverless), log, json, shell, python, toml or haproxy
    (an haproxy.cfg section in TCP mode) ("unknown" otherwise)."""
    lines = [line for line in text.splitlines() if line.strip()]
    first = lines[0].strip()
    if re.match(r"(global|defaults|frontend|backend|listen)\b", first) and "mode tcp" in text:
        return "haproxy"
    if first.startswith("# ") and first.endswith(".toml"):
        return "toml"
    if "@neondatabase/serverless" in text:
        return "neon"
    if (first.startswith("# ") and first.endswith(".py") or "@hookimpl" in text
            or re.search(r"^import |^from \S+ import", text, re.M)):
        return "python"
    if all(line.startswith("psql ") and " pgbouncer -c " in line for line in lines):
        return "console"
    if all(line.startswith("psql ") for line in lines):
        return "psql"
    if all(line.startswith("curl ") for line in lines):
        return "curl"
    if all(LOG_LINE.match(line) for line in lines):
        return "log"
    if all(line.startswith("{") and line.rstrip().endswith("}") for line in lines):
        return "json"
    if all(line.startswith(SHELL_COMMANDS) for line in lines):
        return "shell"
    if re.match(r"\[[^\]]+\]", next((x.strip() for x in lines if x.strip()[0] not in ";#"), "")):
        return "ini"
    if all(re.fullmatch(r'"[^"]*"\s+"[^"]*"', line.strip()) for line in lines):
        return "userlist"
    if all(line.split()[0] in HBA_TYPES for line in lines):
        return "hba"
    if first.upper().startswith(("SELECT ", "WITH ")):
        return "sql"
    return "unknown"


def blocks(text: str | None = None) -> list[Block]:
    """Every literal block: after a paragraph ending in "::", or a ``.. code-block::`` directive."""
    text = read() if text is None else text
    lines = text.splitlines()
    sections = _sections(lines)
    out = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        directive = stripped.startswith(".. ")
        if not (stripped.endswith("::") and not directive) and not stripped.startswith(".. code-block::"):
            continue
        indent = len(line) - len(line.lstrip())
        j = i + 1
        if directive:  # skip the directive's :options:
            while j < len(lines) and lines[j].strip().startswith(":"):
                j += 1
        body = []
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
            body.append((j, lines[j]))
            j += 1
        while body and not body[-1][1].strip():
            body.pop()
        while body and not body[0][1].strip():
            body.pop(0)
        if not body:
            continue
        block_text = textwrap.dedent("\n".join(b for _, b in body)) + "\n"
        out.append(Block(block_text, body[0][0] + 1, sections[i], stripped, classify(block_text)))
    return out


def conn_strings(text: str | None = None) -> list[ConnString]:
    """Every `psql "..."` in the README, in literal blocks and in running text."""
    text = read() if text is None else text
    lines = text.splitlines()
    sections = _sections(lines)
    out = []
    for match in re.finditer(r'psql "([^"]*)"', text):
        line = text.count("\n", 0, match.start()) + 1
        rest = text[match.end():text.find("\n", match.end())]
        comment = rest.split("#", 1)[1].strip() if "#" in rest else ""
        out.append(ConnString(" ".join(match.group(1).split()), line, sections[line - 1], comment))
    return out


def ini_blocks(text: str | None = None, section: str | None = None) -> list[Block]:
    return [b for b in blocks(text) if b.kind == "ini" and (section is None or b.section == section)]


def one_block(kind: str, section: str, text: str | None = None) -> Block:
    found = [b for b in blocks(text) if b.kind == kind and b.section == section]
    assert len(found) == 1, f"expected one {kind} block in README section {section!r}, found {len(found)}"
    return found[0]


def userlist_passwords(text: str | None = None) -> dict[str, str]:
    """The passwords README.rst says its userlist.txt secrets are for, by user."""
    text = read() if text is None else text
    named = re.search(r"``app``'s\s+verifier and ``legacy``'s md5 secret are those of the passwords\s+"
                      r"``([^`]+)`` and\s+``([^`]+)``", text)
    assert named, "README no longer says which passwords its userlist.txt secrets are for"
    return {"app": named.group(1), "legacy": named.group(2)}


# -- the files README configurations name ------------------------------------------------------

# Settings whose value is a file name; the loaders read these files.
FILE_SETTINGS = ("auth_file", "auth_hba_file", "client_tls_cert_file", "client_tls_key_file", "client_tls_ca_file",
                 "server_tls_cert_file", "server_tls_key_file", "server_tls_ca_file")


@dataclass
class Files:
    """Real files for the paths the README names: its userlist.txt and hba rules as written, and
    certificates made with trustme (pgrelay's for db.example.com, a CA for clients, app's client
    certificate). `paths` maps each README path (and base name) to the real file."""

    directory: str
    paths: dict[str, str]


SERVER_NAMES = ("db.example.com", "localhost", "127.0.0.1")


def make_files(directory: str, text: str | None = None) -> Files:
    import trustme

    text = read() if text is None else text
    os.makedirs(directory, exist_ok=True)
    server_ca, clients_ca = trustme.CA(), trustme.CA()
    server = server_ca.issue_cert(*SERVER_NAMES)
    app = clients_ca.issue_cert("client.example.com", common_name="app")
    contents = {
        "userlist.txt": one_block("userlist", "Authentication", text).text,
        "hba.conf": one_block("hba", "Authentication", text).text,
        "server.crt": server.cert_chain_pems[0].bytes(),
        "server.key": server.private_key_pem.bytes(),
        "clients-ca.crt": clients_ca.cert_pem.bytes(),
        "ca.pem": server_ca.cert_pem.bytes(),       # what clients verify pgrelay's certificate with
        "app.crt": app.cert_chain_pems[0].bytes(),
        "app.key": app.private_key_pem.bytes(),
    }
    paths = {}
    for name, data in contents.items():
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(path, 0o600 if name.endswith(".key") else 0o644)
        paths[name] = path
    return Files(directory, paths)


def localize(ini_text: str, files: Files) -> str:
    """The block with each file setting's path replaced by the real file of the same base name.

    Only the path itself is replaced, so whatever else the README line holds (such as a `; comment`
    after the value) stays in the line and is loaded as written."""
    out = []
    for line in ini_text.splitlines():
        match = re.match(r"\s*(\w+)\s*=\s*(\S+)", line)
        if match and match.group(1).lower() in FILE_SETTINGS:
            path = match.group(2)
            base = os.path.basename(path)
            assert base in files.paths, f"README names {path}; tests/readme.py has no file for {base}"
            line = line[:match.start(2)] + files.paths[base] + line[match.end(2):]
        out.append(line)
    return "\n".join(out) + "\n"
