"""Every connection string in README.rst, run against the README configuration it belongs to, on a
real primary and streaming standby: the connection-options layout (psql), the Authentication and
TLS configuration (psycopg 3: sslnegotiation=direct and sslrootcert=system need libpq 17), and the
Quick start's `pgrelay demo` configuration. Only what cannot be copied is rewritten: the README's
addresses and ports become the test servers and free ports, and HOST becomes 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgrelay.config import parse_connstr, read_ini
from pgrelay.tempdb import free_port

from .. import readme
from ..drivers import node_driver  # noqa: F401  (session fixture)
from ..support import RelayProcess, stop_relays

# -- helpers ----------------------------------------------------------------------------------------


class IniRelay(RelayProcess):
    """pgrelay started from a configuration text; `make(port)` writes it for the port it listens on."""

    def __init__(self, workdir: str, make, name: str, env: dict | None = None):
        super().__init__(workdir, None, databases={}, name=name, env=env)
        self.text = make(self.port)

    def write_ini(self) -> None:
        with open(self.ini_path, "w") as f:
            f.write(self.text)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """Start IniRelays for this module; stop them at the end and fail on logged internal errors."""
    workdir = str(tmp_path_factory.mktemp("readme"))
    started: list[IniRelay] = []

    def factory(make, name: str, env: dict | None = None) -> IniRelay:
        relay = IniRelay(workdir, make, name, env)
        started.append(relay)
        return relay.start()

    factory.workdir = workdir
    yield factory
    stop_relays(started)


@pytest.fixture(scope="module")
def servers(replicated):
    """The primary and standby, with the README's role and database `app` on them."""
    replicated.primary.psql("CREATE ROLE app LOGIN")
    replicated.primary.psql("CREATE DATABASE app OWNER app")
    replicated.wait_caught_up()
    return replicated


QUERY = "SELECT 1, pg_is_in_recovery(), current_setting('port'), current_user, current_database()"


def psql(conninfo: str, **env) -> str:
    out = subprocess.run(["psql", "-X", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-c", QUERY, conninfo],
                         capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PGCONNECT_TIMEOUT="10", **env))
    assert out.returncode == 0, f"psql {conninfo!r} failed:\n{out.stderr}"
    return out.stdout.strip()


def with_ports(conninfo: str, ports: dict[int, int], host: str = "127.0.0.1") -> str:
    """The string with HOST replaced and each README port (port=N, HOST:N) replaced by its test port."""
    def port(match):
        assert int(match.group()) in ports, f"{conninfo}: port {match.group()} is not in the configuration"
        return str(ports[int(match.group())])
    return re.sub(r"(?<=\bport=)\d+|(?<=HOST:)\d+", port, conninfo).replace("HOST", host)


def expected(string: readme.ConnString, poolers: dict[str, str], servers) -> str:
    """What QUERY returns where the README says the string goes: the standby for |replica and
    replica poolers, else the primary; as the role before the "." and "|"; in the string's database."""
    params = conninfo_to_dict(string.conninfo)
    user, _, suffix = params["user"].partition("|")
    role = user.partition(".")[0]
    replica = suffix == "replica" or poolers.get(suffix) == "replica"
    server = servers.standby if replica else servers.primary
    return f"1|{'t' if replica else 'f'}|{server.port}|{role}|{params['dbname']}"


# -- Connection options: the layout and its strings -------------------------------------------------

LAYOUT = readme.one_block("ini", "Connection options")
LAYOUT_STRINGS = [s for s in readme.conn_strings() if s.section == "Connection options"]


def layout_ini(text: str, ports: dict[int, int], addresses: dict, workdir: str) -> str:
    """The README layout with its hosts and ports replaced; auth_type = trust (the README leaves
    authentication to its own section)."""
    ini = read_ini(text, "README.rst")
    out = []
    for section, entries in ini.sections.items():
        out.append(f"[{section}]")
        for entry in entries:
            value = entry.value
            if section in ("databases", "clusters"):
                value = _with_servers(value, addresses)
            elif section == "listeners":
                value = re.sub(r"\bport=(\d+)", lambda m: f"port={ports[int(m.group(1))]}", value)
            elif section == "pgbouncer" and entry.key == "listen_port":
                value = str(ports[int(value)])
            elif section == "poolers":
                assert "upstream" not in parse_connstr(value), "an upstream= needs rewriting here"
            out.append(f"{entry.key} = {value}")
    out += ["[pgbouncer]", "listen_addr = 127.0.0.1", f"unix_socket_dir = {workdir}", "auth_type = trust",
            "stats_period = 3600"]
    return "\n".join(out) + "\n"


def _with_servers(value: str, addresses: dict) -> str:
    options = parse_connstr(value, "README.rst")
    hosts = options["host"].split(",")
    ports = options.get("port", "5432").split(",")
    for host in hosts + [r.rsplit(":", 1)[0] for r in options.get("replicas", "").split(",") if r]:
        assert host in addresses, f"README address {host} has no test server: add it to the addresses"
    options["host"] = ",".join("127.0.0.1" for _ in hosts)
    options["port"] = ",".join(str(addresses[h].port) for h in hosts)
    assert len(ports) in (1, len(hosts))
    if options.get("replicas"):
        options["replicas"] = ",".join(f"127.0.0.1:{addresses[r.rsplit(':', 1)[0]].port}"
                                       for r in options["replicas"].split(","))
    return " ".join(f"{k}={v}" for k, v in options.items())


@pytest.fixture(scope="module")
def layout(start, servers):
    ini = read_ini(LAYOUT.text, "README.rst")
    readme_ports = [int(e.value) for e in ini.sections["pgbouncer"] if e.key == "listen_port"]
    readme_ports += [int(parse_connstr(e.value)["port"]) for e in ini.sections["listeners"]]
    primary, standby = servers.primary, servers.standby
    # br_dev lists a standby first: "several hosts: pgrelay finds the primary" is then tested.
    addresses = {"10.0.0.1": primary, "10.0.0.2": standby, "10.0.0.3": standby,
                 "10.1.0.1": standby, "10.1.0.2": primary}
    ports: dict[int, int] = {}

    def make(main_port: int) -> str:
        ports[readme_ports[0]] = main_port
        for port in readme_ports[1:]:
            new = free_port()
            while new in ports.values():
                new = free_port()
            ports[port] = new
        return layout_ini(LAYOUT.text, ports, addresses, start.workdir)

    relay = start(make, "readme-layout")
    relay.readme_ports = ports
    relay.poolers = {e.key: parse_connstr(e.value).get("target", "primary") for e in ini.sections["poolers"]}
    return relay


@pytest.mark.parametrize("string", LAYOUT_STRINGS, ids=[s.id for s in LAYOUT_STRINGS])
def test_connection_option_string(layout, servers, string):
    conninfo = with_ports(string.conninfo, layout.readme_ports)
    assert psql(conninfo) == expected(string, layout.poolers, servers)


def test_connection_option_strings_cover_every_route():
    """The table's options all have a string: direct, |replica, local pooler, both dedicated poolers,
    the session port, and cluster user names."""
    users = {conninfo_to_dict(s.conninfo)["user"] for s in LAYOUT_STRINGS}
    assert {"postgres", "postgres|replica", "app", "app|read-bouncer", "app|write-bouncer", "app.br_main",
            "postgres.br_main|replica"} <= users


def test_cluster_with_several_hosts_finds_the_primary(layout, servers):
    """[clusters] br_dev = host=10.1.0.1,10.1.0.2 (here: the standby first, then the primary)."""
    port = layout.readme_ports[6432]
    assert psql(f"host=127.0.0.1 port={port} user=app.br_dev dbname=app") == \
        f"1|f|{servers.primary.port}|app|app"


# -- Authentication and TLS: their configuration and strings ---------------------------------------

AUTH_TLS_STRINGS = [s for s in readme.conn_strings() if s.section in ("Authentication", "TLS")]


@pytest.fixture(scope="module")
def files(start):
    return readme.make_files(os.path.join(start.workdir, "files"))


def auth_tls_ini(files, primary_port: int, workdir: str):
    """The Authentication block then the TLS block, as written but for the paths of their files, in
    front of the primary."""
    blocks = readme.one_block("ini", "Authentication").text + readme.one_block("ini", "TLS").text
    local = readme.localize(blocks, files)

    def make(port: int) -> str:
        return (local + f"[databases]\n* = host=127.0.0.1 port={primary_port}\n"
                f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir = {workdir}\n"
                "stats_period = 3600\n")
    return make


@pytest.fixture(scope="module")
def scram_relay(start, servers, files):
    """auth_type = scram-sha-256 as the README's Authentication block sets it."""
    return start(auth_tls_ini(files, servers.primary.port, start.workdir), "readme-tls")


@pytest.fixture(scope="module")
def cert_relay(start, servers, files):
    """The same file with auth_type = cert (PGRELAY_AUTH_TYPE), for the ``cert`` method's string."""
    return start(auth_tls_ini(files, servers.primary.port, start.workdir), "readme-tls-cert",
                 env={"PGRELAY_AUTH_TYPE": "cert"})


def run_tls_string(string: readme.ConnString, relay, files, monkeypatch, password: str | None):
    """Connect as the README says (HOST is db.example.com, reached at 127.0.0.1 with hostaddr; a
    string without port= gets it from PGPORT; absolute paths become the test's files of that name;
    relative ones are found in the current directory; sslrootcert=system is SSL_CERT_FILE)."""
    conninfo = with_ports(string.conninfo, {6432: relay.port}, host="db.example.com")
    conninfo = re.sub(r"(?<==)(/\S+)", lambda m: files.paths[os.path.basename(m.group(1))], conninfo)
    conninfo += " hostaddr=127.0.0.1"
    monkeypatch.chdir(files.directory)
    monkeypatch.setenv("PGPORT", str(relay.port))
    monkeypatch.setenv("SSL_CERT_FILE", files.paths["ca.pem"])
    if password is None:
        monkeypatch.delenv("PGPASSWORD", raising=False)
    else:
        monkeypatch.setenv("PGPASSWORD", password)
    with psycopg.connect(conninfo, connect_timeout=10, autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        return conn.execute("SELECT current_user, current_database(), pg_is_in_recovery()").fetchone()


@pytest.mark.parametrize("string", AUTH_TLS_STRINGS, ids=[s.id for s in AUTH_TLS_STRINGS])
def test_authentication_and_tls_string(request, files, servers, monkeypatch, string):
    params = conninfo_to_dict(string.conninfo)
    if "sslcert" in params:  # the ``cert`` method: the certificate is the credential
        relay, password = request.getfixturevalue("cert_relay"), None
    else:
        relay, password = request.getfixturevalue("scram_relay"), readme.userlist_passwords()[params["user"]]
    assert run_tls_string(string, relay, files, monkeypatch, password) == \
        (params["user"], params.get("dbname", params["user"]), False)


def test_authentication_really_checks_the_secret(scram_relay, cert_relay, files, monkeypatch):
    """The strings above pass because of the README's secrets and certificates, not despite them."""
    scram = next(s for s in AUTH_TLS_STRINGS if "sslcert" not in s.conninfo)
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "app"'):
        run_tls_string(scram, scram_relay, files, monkeypatch, "not-" + readme.userlist_passwords()["app"])
    cert = next(s for s in AUTH_TLS_STRINGS if "sslcert" in s.conninfo)
    without = readme.ConnString(re.sub(r" ssl(cert|key)=\S+", "", cert.conninfo), cert.line, cert.section, "")
    with pytest.raises(psycopg.OperationalError, match='certificate authentication failed for user "app"'):
        run_tls_string(without, cert_relay, files, monkeypatch, None)


# -- Quick start: the string `pgrelay demo` prints ---------------------------------------------------

QUICK_START = [s for s in readme.conn_strings() if s.section == "Quick start"]


def test_quick_start_string_against_the_demo_configuration(start, servers, tmp_path):
    from pgrelay.demo import write_demo_config

    def make(port: int) -> str:
        path = tmp_path / "demo.ini"
        write_demo_config(str(path), servers.primary.port, port, str(tmp_path), "transaction",
                          free_port(), free_port())
        return path.read_text()

    relay = start(make, "readme-demo")
    assert len(QUICK_START) == 1
    # The demo's main port is 6432 when it is free; the README shows that one.
    conninfo = with_ports(QUICK_START[0].conninfo, {6432: relay.port})
    assert psql(conninfo) == f"1|f|{servers.primary.port}|postgres|postgres"


# -- Connection options: the serverless endpoint's curl and Node examples ---------------------------

def _serverless_text(text: str, layout) -> str:
    return text.replace("HOST", "127.0.0.1").replace(":4444", f":{layout.readme_ports[4444]}")


def test_serverless_curl_examples(layout, servers):
    lines = [line for line in readme.one_block("curl", "Connection options").text.splitlines() if line.strip()]
    replies = []
    for line in lines:
        out = subprocess.run(shlex.split(_serverless_text(line, layout)), capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out
        replies.append(json.loads(out.stdout))
    # JSON-typed rows as objects: curl sends neither Neon-Raw-Text-Output nor Neon-Array-Mode.
    assert replies[0]["rows"] == [{"n": 42}] and replies[0]["fields"][0]["dataTypeID"] == 23
    assert replies[1]["rows"] == [{"pg_is_in_recovery": True}]  # app|read-bouncer: the replica pooler


def test_serverless_node_example(layout, servers, node_driver):
    node, edge = [b for b in readme.blocks() if b.kind == "neon" and b.section == "Connection options"]
    # The edge-runtime example needs TLS on port 443 and a runtime's fetch handler: it must parse.
    (node_driver.dir / "readme_edge.mjs").write_text(edge.text)
    checked = subprocess.run([node_driver.node, "--check", str(node_driver.dir / "readme_edge.mjs")],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    program = node_driver.dir / "readme_app.mjs"
    program.write_text(_serverless_text(node.text, layout))
    out = subprocess.run([node_driver.node, str(program)], cwd=str(node_driver.dir), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"answer": 42, "a": 1, "b": 2, "greeting": "hello"}
