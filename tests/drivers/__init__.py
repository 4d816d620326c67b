"""Real non-Python drivers for the acceptance tests: node-postgres (npm ci of a pinned lock file) and
pgjdbc (Debian's jar, javac once per session), run as subprocesses that print JSON lines.

Each driver program lives next to this file (node/*.js, java/*.java), takes its settings on the
command line, prints one JSON object per line on stdout, and exits 0 once it has said everything
it wanted to say (errors it saw are data in its output, not a failing exit). Every run is bounded:
the program has its own watchdog and the subprocess a timeout on top.

Missing tools are a failure, not a skip: CI must install them (see REQUIREMENTS).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
NODE_SOURCES = HERE / "node"
JAVA_SOURCES = HERE / "java"

# Where Debian's libpostgresql-jdbc-java puts the driver; PGRELAY_TEST_JDBC_JAR overrides it.
JDBC_JARS = ("/usr/share/java/postgresql.jar",)

REQUIREMENTS = (
    "The real-driver tests need node (>= 18) with npm, and Java (javac, java) with pgjdbc:\n"
    "    apt-get install -y nodejs npm default-jdk-headless libpostgresql-jdbc-java\n"
    "npm must reach its registry once per test session (npm ci of tests/drivers/node/package-lock.json);\n"
    "PGRELAY_TEST_JDBC_JAR may name another pgjdbc jar."
)


def _missing(what: str) -> None:
    pytest.fail(f"{what}\n{REQUIREMENTS}", pytrace=False)


@dataclass
class DriverRun:
    """One finished driver program: its exit code, raw output and the JSON records it printed."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    records: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        def tail(text: str, n: int = 40) -> str:
            return "\n".join(text.splitlines()[-n:])
        return (f"{' '.join(self.argv[:3])}... exited {self.returncode}\n--- stdout (tail)\n{tail(self.stdout)}"
                f"\n--- stderr (tail)\n{tail(self.stderr)}")

    def of(self, event: str) -> list[dict]:
        """The records whose "event" is `event`, in order."""
        return [r for r in self.records if r.get("event") == event]

    def one(self, event: str) -> dict:
        found = self.of(event)
        assert len(found) == 1, f"expected one {event!r} record, got {len(found)}\n{self.describe()}"
        return found[0]

    def check(self) -> "DriverRun":
        """Fail unless the program exited 0 and printed its final "done" record."""
        assert self.returncode == 0 and self.of("done"), f"driver program failed\n{self.describe()}"
        return self


def _run(argv: list[str], cwd: str, timeout: float, env: dict | None = None) -> DriverRun:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, **(env or {})))
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        run = DriverRun(argv, -9, out, err)
        raise AssertionError(f"driver program did not finish within {timeout}s\n{run.describe()}") from None
    records = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                pass  # a partial line from a killed program: describe() shows it
    return DriverRun(argv, proc.returncode, proc.stdout, proc.stderr, records)


class NodeDriver:
    """node-postgres from tests/drivers/node/package-lock.json, installed by npm ci into a session
    directory (the source tree stays clean; npm's own cache makes later sessions offline-capable)."""

    def __init__(self, workdir: Path):
        self.node = shutil.which("node")
        npm = shutil.which("npm")
        if not self.node or not npm:
            _missing("node or npm is not on PATH.")
        version = subprocess.run([self.node, "--version"], capture_output=True, text=True, timeout=30).stdout
        if int(version.strip().lstrip("v").split(".")[0]) < 18:
            _missing(f"node {version.strip()} is too old.")
        self.dir = workdir
        for source in NODE_SOURCES.iterdir():
            if source.is_file():
                shutil.copy(source, workdir / source.name)
        try:
            proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"], cwd=workdir,
                                  capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            _missing("npm ci did not finish within 300s (is the npm registry reachable?).")
        if proc.returncode != 0:
            _missing(f"npm ci failed in {workdir}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        self.pg_version = json.loads((workdir / "node_modules" / "pg" / "package.json").read_text())["version"]

    def run(self, script: str, config: dict, timeout: float = 120) -> DriverRun:
        """Run node/<script> with `config` as its JSON argument; the script's watchdog fires first."""
        config = dict(config, deadline_ms=int((timeout - 10) * 1000))
        return _run([self.node, str(self.dir / script), json.dumps(config)], str(self.dir), timeout)


class JdbcDriver:
    """pgjdbc from Debian's jar; java/*.java compiled once per session."""

    def __init__(self, workdir: Path):
        self.java = shutil.which("java")
        javac = shutil.which("javac")
        if not self.java or not javac:
            _missing("java or javac is not on PATH.")
        candidates = [os.environ["PGRELAY_TEST_JDBC_JAR"]] if os.environ.get("PGRELAY_TEST_JDBC_JAR") else []
        jars = [j for j in candidates + list(JDBC_JARS) if os.path.isfile(j)]
        if not jars:
            _missing(f"no pgjdbc jar at {', '.join(candidates + list(JDBC_JARS))}.")
        self.jar = os.path.realpath(jars[0])
        sources = sorted(str(p) for p in JAVA_SOURCES.glob("*.java"))
        digest = hashlib.sha256(b"".join(Path(s).read_bytes() for s in sources)).hexdigest()[:12]
        self.classes = workdir / f"classes-{digest}"
        self.classes.mkdir()
        try:
            proc = subprocess.run([javac, "-encoding", "UTF-8", "-cp", self.jar, "-d", str(self.classes)] + sources,
                                  capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            _missing("javac did not finish within 180s.")
        if proc.returncode != 0:
            pytest.fail(f"javac failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
        self.version = os.path.basename(self.jar)

    def run(self, main_class: str, args: dict, timeout: float = 120) -> DriverRun:
        """Run `main_class` with key=value arguments; it bounds itself by deadline_ms."""
        args = dict(args, deadline_ms=int((timeout - 10) * 1000))
        argv = [self.java, "-Xss512k", "-cp", f"{self.classes}{os.pathsep}{self.jar}", main_class]
        argv += [f"{k}={v}" for k, v in args.items()]
        return _run(argv, str(self.classes), timeout)


# -- fixtures (session-scoped: one npm ci and one javac per test session) ---------------------------

@pytest.fixture(scope="session")
def node_driver(tmp_path_factory) -> NodeDriver:
    return NodeDriver(tmp_path_factory.mktemp("node-postgres"))


@pytest.fixture(scope="session")
def jdbc_driver(tmp_path_factory) -> JdbcDriver:
    return JdbcDriver(tmp_path_factory.mktemp("pgjdbc"))


def listeners(**ports_and_options: tuple[int, str]) -> str:
    """A [listeners] section: listeners(session=(port, "pool_mode=session"))."""
    lines = ["[listeners]"]
    lines += [f"{name} = port={port} {options}" for name, (port, options) in ports_and_options.items()]
    return "\n".join(lines) + "\n"
