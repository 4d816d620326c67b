"""Authentication through pgrelay: every client auth_type, auth_file formats, server auth methods, SCRAM pass-through, reload, bad auth input and malicious servers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field

import psycopg
import psycopg2
import pytest

from pgrelay.tempdb import TempPostgres

from ..support import RawClient, RelayProcess, error_fields, message, startup_packet, wait_until

# -- the PostgreSQL these tests log in to ----------------------------------------------------------

PASSWORDS = {
    "alice": "alice-Pw-3f9c1",       # stored as SCRAM; server pg_hba method scram-sha-256
    "bob": "bob-Pw-71ad2",           # stored as md5;   server method md5
    "carol": "carol-Pw-c2e83",       # stored as SCRAM; server method password (cleartext)
    "dave": "dave-Pw-9b044",         # stored as SCRAM; used for SCRAM pass-through
    "erin": "erin-Pw-old-515",       # password changed by the reload test
    "relay_auth": "relayauth-Pw-e6a6",  # auth_user (superuser, so it can read pg_authid)
    "quinn": "quinn-Pw-0d7a7",       # looked up with auth_query only
    "olda": "olda-Pw-88a18",         # VALID UNTIL 2000-01-01
}
WRONG = "wrong-Pw-0000x"
SERVER_METHOD = {"alice": "scram-sha-256", "bob": "md5", "carol": "password"}

PG_HBA = """\
local all all trust
host all alice 127.0.0.1/32 scram-sha-256
host all bob 127.0.0.1/32 md5
host all carol 127.0.0.1/32 password
host all all 127.0.0.1/32 scram-sha-256
"""


def _roles_sql() -> str:
    p = PASSWORDS
    return (
        "SET password_encryption = 'scram-sha-256';"
        + "".join(f"CREATE ROLE {r} LOGIN PASSWORD '{p[r]}';" for r in ("alice", "carol", "dave", "erin", "quinn"))
        + f"CREATE ROLE relay_auth LOGIN SUPERUSER PASSWORD '{p['relay_auth']}';"
        + f"CREATE ROLE olda LOGIN PASSWORD '{p['olda']}' VALID UNTIL '2000-01-01';"
        + "SET password_encryption = 'md5';"
        + f"CREATE ROLE bob LOGIN PASSWORD '{p['bob']}';"
    )


def start_auth_pg() -> TempPostgres:
    """A PostgreSQL whose pg_hba.conf asks for scram-sha-256, md5 or password per role."""
    server = TempPostgres(settings={"log_connections": "on"}, name="authpg")
    server.initdb()
    with open(os.path.join(server.datadir, "pg_hba.conf"), "w") as f:
        f.write(PG_HBA)
    server.start()
    try:
        server.psql(_roles_sql())
        server.psql("CREATE DATABASE authdb_real")
    except BaseException:
        server.cleanup()
        raise
    return server


@pytest.fixture(scope="module")
def auth_pg():
    server = start_auth_pg()
    yield server
    server.cleanup()


def stored_secret(pg, role: str) -> str:
    """The role's rolpassword as PostgreSQL stores it (SCRAM verifier or md5 hash)."""
    return pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'")


def server_logins(pg, user: str, method: str) -> int:
    """How many logins as `user` PostgreSQL authenticated with pg_hba method `method` (from its log)."""
    with open(pg.logfile, encoding="utf-8", errors="replace") as f:
        return f.read().count(f'connection authenticated: identity="{user}" method={method} ')


# -- pgrelay processes ------------------------------------------------------------------------------

def write_auth_file(path, users: dict[str, str]) -> str:
    with open(path, "w") as f:
        for user, secret in users.items():
            f.write('"%s" "%s"\n' % (user.replace('"', '""'), secret.replace('"', '""')))
    return str(path)


def start_relay(make_relay, tmp_path, pg, settings=None, users=None, databases=None, name=None):
    """A pgrelay in front of `pg`; `users` becomes its auth_file (tmp_path/<name>-users.txt)."""
    conf = {"server_login_retry": "1"}
    if users is not None:
        conf["auth_file"] = write_auth_file(tmp_path / f"{name or 'relay'}-users.txt", users)
    conf.update(settings or {})
    dbs = {"postgres": f"host=127.0.0.1 port={pg.port} dbname=postgres"}
    dbs.update(databases or {})
    kw = {"name": name} if name else {}
    return make_relay(settings=conf, databases=dbs, **kw)


# -- clients ----------------------------------------------------------------------------------------

def pg3(relay, user: str, password: str | None = None, dbname: str = "postgres", **kw) -> psycopg.Connection:
    extra = dict(kw, connect_timeout=10)
    if password is not None:
        extra["password"] = password
    return psycopg.connect(relay.dsn(user=user, dbname=dbname, **extra), autocommit=True)


def pg3_value(relay, user, password=None, sql="SELECT current_user", **kw):
    with pg3(relay, user, password, **kw) as conn:
        return conn.execute(sql).fetchone()[0]


def pg2_value(relay, user, password=None, sql="SELECT current_user", dbname="postgres"):
    extra = {"password": password} if password is not None else {}
    conn = psycopg2.connect(relay.dsn(user=user, dbname=dbname, **extra), connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]
    finally:
        conn.close()


def run_psql(port, user: str, password: str | None, sql: str = "SELECT current_user", dbname: str = "postgres",
             host: str = "127.0.0.1") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGCONNECT_TIMEOUT="10", PGPASSFILE="/nonexistent")
    if password is not None:
        env["PGPASSWORD"] = password
    return subprocess.run(["psql", "-X", "-w", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", host, "-p", str(port),
                           "-U", user, "-d", dbname, "-c", sql], env=env, capture_output=True, text=True, timeout=30)


def failed_text(user: str) -> str:
    return f'FATAL:  password authentication failed for user "{user}"'


def assert_real_clients_refused(relay, user: str, password: str) -> None:
    """psycopg 3, psycopg2 and psql all get pgrelay's FATAL 'password authentication failed'."""
    with pytest.raises(psycopg.OperationalError) as e3:
        pg3(relay, user, password)
    assert failed_text(user) in str(e3.value)
    with pytest.raises(psycopg2.OperationalError) as e2:
        pg2_value(relay, user, password)
    assert failed_text(user) in str(e2.value)
    result = run_psql(relay.port, user, password)
    assert result.returncode == 2, result
    assert failed_text(user) in result.stderr


def assert_serves(relay, user="alice", password=None) -> None:
    """A fresh psycopg 3 client logs in (with the user's password) and runs a query."""
    password = PASSWORDS[user] if password is None else password
    assert pg3_value(relay, user, password, "SELECT 6 * 7") == 42


# -- a raw client that speaks the authentication exchanges itself -----------------------------------

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


class Scram:
    """A SCRAM-SHA-256 client (RFC 5802/7677), written here independently of pgrelay.auth."""

    def __init__(self, password: str, nonce: str | None = None):
        self.password = password
        self.nonce = nonce or b64(os.urandom(18))
        self.first_bare = f"n=,r={self.nonce}"
        self.server_signature = b""
        self.server_nonce = ""

    def initial(self, mechanism: str = "SCRAM-SHA-256") -> bytes:
        return sasl_initial(mechanism, ("n,," + self.first_bare).encode())

    def final(self, server_first: str, nonce: str | None = None) -> bytes:
        attrs = dict(part.split("=", 1) for part in server_first.split(","))
        self.server_nonce = attrs["r"]
        without_proof = f"c={b64(b'n,,')},r={nonce or attrs['r']}"
        auth_message = f"{self.first_bare},{server_first},{without_proof}".encode()
        salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
        client_key = _hmac(salted, b"Client Key")
        signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self.server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return message(b"p", f"{without_proof},p={b64(proof)}".encode())


def sasl_initial(mechanism: str, data: bytes, length: int | None = None) -> bytes:
    """SASLInitialResponse; `length` may lie about the size of `data`."""
    size = len(data) if length is None else length
    return message(b"p", mechanism.encode() + b"\0" + struct.pack("!I", size) + data)


def md5_response(password: str, user: str, salt: bytes) -> bytes:
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()


def raw_client(port: int, source: str | None = None) -> RawClient:
    """RawClient, optionally connecting from another loopback address (for hba address rules)."""
    client = RawClient.__new__(RawClient)
    client.sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                           source_address=(source, 0) if source else None)
    client.buf = b""
    return client


@dataclass
class Outcome:
    client: RawClient
    codes: list[int] = field(default_factory=list)   # authentication requests pgrelay sent (not AuthOk)
    mechanisms: list[bytes] = field(default_factory=list)
    server_first: str = ""
    error: dict | None = None

    def value(self, sql: str) -> str:
        for kind, body in self.client.query(sql):
            if kind == b"D":
                size = struct.unpack("!i", body[2:6])[0]
                return body[6:6 + size].decode()
            assert kind != b"E", error_fields(body)
        raise AssertionError(f"no row for {sql}")


def raw_login(port: int, user: str, password: str, database: str = "postgres", source: str | None = None,
              **params) -> Outcome:
    """Log in answering whatever pgrelay asks (cleartext, md5, SCRAM); stop at ReadyForQuery or an error."""
    out = Outcome(raw_client(port, source))
    out.client.send(startup_packet(user, database, **params))
    scram = None
    while True:
        kind, body = out.client.read_message()
        if kind == b"E":
            out.error = error_fields(body)
            return out
        if kind == b"Z":
            return out
        if kind != b"R":
            continue
        code = struct.unpack("!I", body[:4])[0]
        if code == 0:
            continue
        out.codes.append(code)
        if code == 3:
            out.client.send(message(b"p", password.encode() + b"\0"))
        elif code == 5:
            out.client.send(message(b"p", md5_response(password, user, body[4:8]) + b"\0"))
        elif code == 10:
            out.mechanisms = [m for m in body[4:].split(b"\0") if m]
            scram = Scram(password)
            out.client.send(scram.initial())
        elif code == 11:
            out.server_first = body[4:].decode()
            out.client.send(scram.final(out.server_first))
        elif code == 12:
            assert body[4:] == f"v={b64(scram.server_signature)}".encode(), "pgrelay's server signature is wrong"
        else:
            raise AssertionError(f"unexpected authentication request {code}")


def assert_auth_failed(outcome: Outcome, user: str) -> None:
    """FATAL 28P01 'password authentication failed for user "x"', then pgrelay closes the connection."""
    assert outcome.error is not None, "login succeeded"
    assert (outcome.error["S"], outcome.error["C"], outcome.error["M"]) == \
        ("FATAL", "28P01", f'password authentication failed for user "{user}"'), outcome.error
    assert outcome.client.closed(), "pgrelay kept the connection open after FATAL"
    outcome.client.close()


def assert_logged_in(outcome: Outcome, user: str, codes: list[int]) -> None:
    assert outcome.error is None, outcome.error
    assert outcome.codes == codes
    assert outcome.value("SELECT current_user") == user
    outcome.client.close()


SCRAM_CODES, MD5_CODES, PLAIN_CODES = [10, 11, 12], [5], [3]
CODES = {"scram-sha-256": SCRAM_CODES, "md5": MD5_CODES, "plain": PLAIN_CODES}
FAIL_CODES = {"scram-sha-256": [10, 11], "md5": MD5_CODES, "plain": PLAIN_CODES}
LIBPQ_METHOD = {"scram-sha-256": "scram-sha-256", "md5": "md5", "plain": "password"}


# == 1. client auth_type ============================================================================

@pytest.mark.parametrize("auth_type", ["scram-sha-256", "md5", "plain"])
def test_password_auth_types_with_real_clients(auth_pg, make_relay, tmp_path, auth_type):
    relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": auth_type}, {"alice": PASSWORDS["alice"]})
    # The exchange is the one the method calls for, and libpq agrees (require_auth).
    assert_logged_in(raw_login(relay.port, "alice", PASSWORDS["alice"]), "alice", CODES[auth_type])
    assert pg3_value(relay, "alice", PASSWORDS["alice"], require_auth=LIBPQ_METHOD[auth_type]) == "alice"
    assert pg2_value(relay, "alice", PASSWORDS["alice"]) == "alice"
    result = run_psql(relay.port, "alice", PASSWORDS["alice"])
    assert (result.returncode, result.stdout.strip()) == (0, "alice"), result.stderr
    # A wrong password: FATAL 28P01 after the same exchange, for every client.
    bad = raw_login(relay.port, "alice", WRONG)
    assert bad.codes == FAIL_CODES[auth_type]
    assert_auth_failed(bad, "alice")
    assert_real_clients_refused(relay, "alice", WRONG)
    assert_serves(relay)


def test_default_auth_type_is_scram(auth_pg, tmp_path):
    """Without an auth_type line pgrelay asks for SCRAM-SHA-256."""
    auth_file = write_auth_file(tmp_path / "u.txt", {"alice": PASSWORDS["alice"]})
    relay = RelayProcess(str(tmp_path), auth_pg, {"auth_file": auth_file},
                         {"postgres": f"host=127.0.0.1 port={auth_pg.port}"}, name="default")
    del relay.settings["auth_type"]
    relay.start()
    try:
        assert not [line for line in open(relay.ini_path) if line.startswith("auth_type")]
        ok = raw_login(relay.port, "alice", PASSWORDS["alice"])
        assert ok.mechanisms == [b"SCRAM-SHA-256"]
        assert_logged_in(ok, "alice", SCRAM_CODES)
        assert_auth_failed(raw_login(relay.port, "alice", WRONG), "alice")
    finally:
        relay.stop()
    assert relay.bugs() == []


def test_trust_asks_no_password_but_needs_auth_file_entry(auth_pg, make_relay, tmp_path):
    relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": "trust"}, {"alice": PASSWORDS["alice"]})
    assert_logged_in(raw_login(relay.port, "alice", "ignored"), "alice", [])
    assert pg3_value(relay, "alice", require_auth="none") == "alice"
    assert pg3_value(relay, "alice", WRONG) == "alice"  # never asked, so a wrong one does not matter
    assert pg2_value(relay, "alice") == "alice"
    result = run_psql(relay.port, "alice", None)
    assert (result.returncode, result.stdout.strip()) == (0, "alice"), result.stderr
    # With trust, a user missing from auth_file is refused like a wrong password.
    assert_auth_failed(raw_login(relay.port, "zed", "whatever"), "zed")
    assert_real_clients_refused(relay, "zed", WRONG)
    assert_serves(relay)


def test_any_ignores_the_user_and_uses_the_forced_server_user(auth_pg, make_relay, tmp_path):
    relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": "any"}, databases={
        "anydb": f"host=127.0.0.1 port={auth_pg.port} dbname=postgres user=alice password={PASSWORDS['alice']}"})
    assert_logged_in(raw_login(relay.port, "nobody_known", "x", "anydb"), "alice", [])
    assert pg3_value(relay, "someone", dbname="anydb", require_auth="none") == "alice"
    assert pg2_value(relay, "someone_else", WRONG, dbname="anydb") == "alice"
    result = run_psql(relay.port, "whoever", None, dbname="anydb")
    assert (result.returncode, result.stdout.strip()) == (0, "alice"), result.stderr


HBA_FILE = """\
# pgrelay's own pg_hba-style rules
local   all     all                     trust
host    hbadb2  alice   127.0.0.1/32    password
host    all     alice   127.0.0.1/32    scram-sha-256
host    all     bob     127.0.0.1/32    md5
host    all     carol   127.0.0.1/32    password
host    all     erin    127.0.0.1/32    reject
host    all     erin    127.0.0.1/32    trust
host    all     dave    127.0.0.3/32    trust
host    all     dave    127.0.0.1/32    scram-sha-256
host    all     quinn   10.0.0.0/8      scram-sha-256
"""


def test_hba_mixes_methods_by_user_database_and_address(auth_pg, make_relay, tmp_path):
    hba = tmp_path / "hba.conf"
    hba.write_text(HBA_FILE)
    users = {u: PASSWORDS[u] for u in ("alice", "bob", "carol", "dave", "erin", "quinn")}
    relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": "hba", "auth_hba_file": str(hba)}, users,
                        databases={"hbadb2": f"host=127.0.0.1 port={auth_pg.port} dbname=postgres"})
    # By user.
    for user, codes in (("alice", SCRAM_CODES), ("bob", MD5_CODES), ("carol", PLAIN_CODES)):
        assert_logged_in(raw_login(relay.port, user, PASSWORDS[user]), user, codes)
        bad = raw_login(relay.port, user, WRONG)
        assert bad.codes == {3: PLAIN_CODES, 5: MD5_CODES, 10: [10, 11]}[codes[0]]
        assert_auth_failed(bad, user)
    assert pg3_value(relay, "bob", PASSWORDS["bob"], require_auth="md5") == "bob"
    assert pg2_value(relay, "carol", PASSWORDS["carol"]) == "carol"
    # By database: alice gets cleartext on hbadb2 only.
    assert_logged_in(raw_login(relay.port, "alice", PASSWORDS["alice"], "hbadb2"), "alice", PLAIN_CODES)
    assert_auth_failed(raw_login(relay.port, "alice", WRONG, "hbadb2"), "alice")
    # By address: dave is trusted from 127.0.0.3, asked for SCRAM from 127.0.0.1.
    assert_logged_in(raw_login(relay.port, "dave", "not-asked", source="127.0.0.3"), "dave", [])
    assert_logged_in(raw_login(relay.port, "dave", PASSWORDS["dave"]), "dave", SCRAM_CODES)
    assert_auth_failed(raw_login(relay.port, "dave", WRONG), "dave")
    # Unix socket: the `local` rule.
    result = run_psql(relay.port, "alice", None, host=str(tmp_path))
    assert (result.returncode, result.stdout.strip()) == (0, "alice"), result.stderr
    # No matching rule (quinn's rule is for 10/8), and `reject` (the trust rule after it is never reached).
    for user, text in (("quinn", "no pg_hba.conf entry for"), ("erin", "pg_hba.conf rejects connection for")):
        refused = raw_login(relay.port, user, PASSWORDS[user])
        assert refused.codes == []
        assert (refused.error["S"], refused.error["C"], refused.error["M"]) == (
            "FATAL", "28000", f'{text} host "127.0.0.1", user "{user}", database "postgres", no encryption')
        assert refused.client.closed()
    with pytest.raises(psycopg.OperationalError, match='no pg_hba.conf entry for host "127.0.0.1", user "quinn"'):
        pg3(relay, "quinn", PASSWORDS["quinn"])
    assert_serves(relay)


# == 2. auth_file formats x client methods ===========================================================

def format_users(pg) -> dict[str, str]:
    """alice: plaintext; bob: md5 + md5(password + user); dave: the SCRAM verifier from pg_authid."""
    md5_secret = "md5" + hashlib.md5((PASSWORDS["bob"] + "bob").encode()).hexdigest()
    assert stored_secret(pg, "bob") == md5_secret
    return {"alice": PASSWORDS["alice"], "bob": md5_secret, "dave": stored_secret(pg, "dave")}


@pytest.mark.parametrize("auth_type,user,codes", [
    ("scram-sha-256", "alice", SCRAM_CODES),   # plaintext secret
    ("scram-sha-256", "dave", SCRAM_CODES),    # SCRAM verifier (server login by pass-through)
    ("md5", "alice", MD5_CODES),               # plaintext secret
    ("md5", "bob", MD5_CODES),                 # md5 secret (server login: md5 pass-the-hash)
    ("md5", "dave", SCRAM_CODES),              # SCRAM verifier: md5 switches to SCRAM, as PostgreSQL does
    ("plain", "alice", PLAIN_CODES),
    ("plain", "bob", PLAIN_CODES),
])
def test_auth_file_formats(auth_pg, make_relay, tmp_path, auth_type, user, codes):
    relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": auth_type}, format_users(auth_pg))
    method = {"alice": "scram-sha-256", "bob": "md5", "dave": "scram-sha-256"}[user]
    before = server_logins(auth_pg, user, method)
    assert_logged_in(raw_login(relay.port, user, PASSWORDS[user]), user, codes)
    assert server_logins(auth_pg, user, method) == before + 1
    libpq = "scram-sha-256" if codes == SCRAM_CODES else LIBPQ_METHOD[auth_type]
    assert pg3_value(relay, user, PASSWORDS[user], require_auth=libpq) == user
    bad = raw_login(relay.port, user, WRONG)
    assert bad.codes == (codes[:2] if codes == SCRAM_CODES else codes)
    assert_auth_failed(bad, user)


def test_scram_client_with_md5_secret_fails_like_a_wrong_password(auth_pg, make_relay, tmp_path):
    relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": "scram-sha-256"}, format_users(auth_pg))
    right = raw_login(relay.port, "bob", PASSWORDS["bob"])
    wrong = raw_login(relay.port, "bob", WRONG)
    assert right.codes == wrong.codes == [10, 11]
    assert right.error == wrong.error
    assert_auth_failed(right, "bob")
    assert_auth_failed(wrong, "bob")
    assert_real_clients_refused(relay, "bob", PASSWORDS["bob"])
    assert_serves(relay)


# == 3. server auth methods ===========================================================================

@pytest.mark.parametrize("source", ["databases_password", "auth_file"])
def test_server_auth_methods(auth_pg, make_relay, tmp_path, source):
    """pgrelay logs in to servers asking for scram-sha-256, md5 and password (cleartext)."""
    if source == "databases_password":
        databases = {f"srv_{u}": f"host=127.0.0.1 port={auth_pg.port} dbname=postgres user={u} password={PASSWORDS[u]}"
                     for u in SERVER_METHOD}
        relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": "any"}, databases=databases)
    else:
        relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": "trust"},
                            {u: PASSWORDS[u] for u in SERVER_METHOD})
    for user, method in SERVER_METHOD.items():
        before = server_logins(auth_pg, user, method)
        if source == "databases_password":
            value = pg3_value(relay, "client_x", dbname=f"srv_{user}")
        else:
            value = pg3_value(relay, user)
        assert value == user
        assert server_logins(auth_pg, user, method) == before + 1, f"{user} was not authenticated with {method}"


# == 4. SCRAM pass-through ===========================================================================

def test_scram_pass_through_across_new_server_connections(auth_pg, make_relay, tmp_path):
    """auth_file holds only dave's verifier; every server login is done with the client's SCRAM keys."""
    relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": "scram-sha-256", "pool_mode": "session"},
                        {"dave": stored_secret(auth_pg, "dave")})
    before = server_logins(auth_pg, "dave", "scram-sha-256")
    a = pg3(relay, "dave", PASSWORDS["dave"])
    pid1 = a.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert a.execute("SELECT current_user").fetchone()[0] == "dave"
    assert auth_pg.psql(f"SELECT pg_terminate_backend({pid1})") == "t"
    with pytest.raises(psycopg.OperationalError):
        a.execute("SELECT 1")
    a.close()
    # Reconnect: new server connections, logged in by pass-through, several at once.
    held = [pg3(relay, "dave", PASSWORDS["dave"]) for _ in range(3)]
    pids = {c.execute("SELECT pg_backend_pid()").fetchone()[0] for c in held}
    assert len(pids) == 3 and pid1 not in pids
    assert {c.execute("SELECT current_user").fetchone()[0] for c in held} == {"dave"}
    for pid in pids:
        assert auth_pg.psql(f"SELECT pg_terminate_backend({pid})") == "t"
    for c in held:
        c.close()
    again = pg3(relay, "dave", PASSWORDS["dave"])
    pid5 = again.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert pid5 not in pids | {pid1}
    again.close()
    # Kill the backend while it sits idle in the pool (after server_reset_query), then reconnect.
    wait_until(lambda: auth_pg.psql(f"SELECT query FROM pg_stat_activity WHERE pid = {pid5}") == "DISCARD ALL",
               message="server reset after the client left")
    closed = lambda: len(re.findall(r"S-\d+: postgres/dave@\S+ closing because", relay.log()))  # noqa: E731
    noticed = closed()
    assert auth_pg.psql(f"SELECT pg_terminate_backend({pid5})") == "t"
    wait_until(lambda: closed() > noticed,
               message="pgrelay noticing the pooled server's death")
    last = pg3(relay, "dave", PASSWORDS["dave"])
    assert last.execute("SELECT pg_backend_pid(), current_user").fetchone()[1] == "dave"
    assert last.execute("SELECT pg_backend_pid()").fetchone()[0] not in pids | {pid1, pid5}
    last.close()
    assert server_logins(auth_pg, "dave", "scram-sha-256") == before + 6
    bad = raw_login(relay.port, "dave", WRONG)
    assert_auth_failed(bad, "dave")


def test_pass_through_without_a_client_scram_login_fails_cleanly(auth_pg, make_relay, tmp_path):
    """trust: no client SCRAM login, so there are no keys and no plaintext for dave's SCRAM server."""
    relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": "trust"},
                        {"dave": stored_secret(auth_pg, "dave"), "alice": PASSWORDS["alice"]})
    started = time.monotonic()
    out = raw_login(relay.port, "dave", "unused")
    assert time.monotonic() - started < 5
    assert (out.error["S"], out.error["C"], out.error["M"]) == (
        "FATAL", "08006", "server asked for SCRAM and there is no password, and no SCRAM keys from a client "
        "login to pass through"), out.error
    assert out.client.closed()
    with pytest.raises(psycopg.OperationalError, match="no SCRAM keys from a client login to pass through"):
        pg3(relay, "dave")
    assert pg3_value(relay, "alice") == "alice"


# == 5. password change + reload ======================================================================

@pytest.mark.parametrize("secret_format", ["plaintext", "scram_verifier"])
def test_password_change_then_reload(auth_pg, make_relay, tmp_path, secret_format):
    old, new = PASSWORDS["erin"], f"erin-Pw-new-{secret_format}"
    auth_pg.psql(f"ALTER ROLE erin PASSWORD '{old}'")
    secret = (lambda pw: pw) if secret_format == "plaintext" else (lambda pw: stored_secret(auth_pg, "erin"))
    relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": "scram-sha-256", "pool_mode": "session"},
                        {"erin": secret(old)}, name="reload")
    a = pg3(relay, "erin", old)
    pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]
    try:
        auth_pg.psql(f"ALTER ROLE erin PASSWORD '{new}'")
        write_auth_file(tmp_path / "reload-users.txt", {"erin": secret(new)})
        relay.reload()
        b = pg3(relay, "erin", new)
        assert b.execute("SELECT current_user").fetchone()[0] == "erin"
        assert b.execute("SELECT pg_backend_pid()").fetchone()[0] != pid_a
        b.close()
        assert_logged_in(raw_login(relay.port, "erin", new), "erin", SCRAM_CODES)
        assert_auth_failed(raw_login(relay.port, "erin", old), "erin")
        assert_real_clients_refused(relay, "erin", old)
        # The client that logged in before the change keeps its server.
        assert a.execute("SELECT pg_backend_pid(), current_user").fetchone() == (pid_a, "erin")
    finally:
        a.close()
        auth_pg.psql(f"ALTER ROLE erin PASSWORD '{old}'")


# == 7. bad input during authentication ================================================================

def scram_started(relay, user="alice") -> tuple[RawClient, Scram]:
    """A raw client whose StartupMessage got AuthenticationSASL (SCRAM-SHA-256 only, no TLS)."""
    client = RawClient(relay.port)
    client.send(startup_packet(user, "postgres"))
    kind, body = client.read_message()
    assert (kind, body) == (b"R", struct.pack("!I", 10) + b"SCRAM-SHA-256\0\0")
    return client, Scram(PASSWORDS.get(user, WRONG))


def scram_continued(relay, user="alice") -> tuple[RawClient, Scram, str]:
    client, scram = scram_started(relay, user)
    client.send(scram.initial())
    kind, body = client.read_message()
    assert kind == b"R" and body[:4] == struct.pack("!I", 11)
    return client, scram, body[4:].decode()


def assert_refused(client: RawClient, sqlstate: str, fragment: str) -> None:
    client.sock.settimeout(5)
    try:
        kind, body = client.read_message()
    except TimeoutError:
        pytest.fail("pgrelay sent nothing within 5 s (still waiting for more input)")
    assert kind == b"E", (kind, body)
    fields = error_fields(body)
    assert (fields["S"], fields["C"]) == ("FATAL", sqlstate), fields
    assert fragment in fields["M"], fields
    assert client.closed(), "pgrelay kept the connection open after FATAL"
    client.close()


GOOD_FIRST = b"n,,n=,r=fyko+d2lbbFgONRv9qkxdawL"
INITIAL_CASES = {
    "missing_nonce": (sasl_initial("SCRAM-SHA-256", b"n,,n=,"), "malformed SCRAM message"),
    "empty_nonce": (sasl_initial("SCRAM-SHA-256", b"n,,n=,r="), "malformed SCRAM message"),
    "no_nonce_attribute": (sasl_initial("SCRAM-SHA-256", b"n,,n="), "malformed SCRAM message"),
    "length_bigger": (sasl_initial("SCRAM-SHA-256", GOOD_FIRST, len(GOOD_FIRST) + 16),
                      "SASLInitialResponse length does not match its data"),
    "length_smaller": (sasl_initial("SCRAM-SHA-256", GOOD_FIRST, len(GOOD_FIRST) - 5),
                       "SASLInitialResponse length does not match its data"),
    "length_ffffffff": (sasl_initial("SCRAM-SHA-256", GOOD_FIRST, 0xFFFFFFFF),
                        "SASLInitialResponse length does not match its data"),
    "unknown_mechanism": (sasl_initial("SCRAM-SHA-1", GOOD_FIRST), "invalid SASL authentication mechanism"),
    "plus_without_tls": (sasl_initial("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=fyko+d2lbbFgONRv9"),
                         "invalid SASL authentication mechanism"),
    "no_mechanism_terminator": (message(b"p", b"SCRAM-SHA-256"), "malformed SASLInitialResponse"),
    "huge_70kb": (sasl_initial("SCRAM-SHA-256", b"n,,n=,r=" + b"A" * 70 * 1024), "invalid message length"),
}


@pytest.mark.parametrize("case", sorted(INITIAL_CASES))
def test_bad_sasl_initial_response(auth_pg, make_relay, tmp_path, case):
    relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": "scram-sha-256"}, {"alice": PASSWORDS["alice"]})
    data, fragment = INITIAL_CASES[case]
    client, _ = scram_started(relay)
    client.send(data)
    assert_refused(client, "08P01", fragment)
    assert_serves(relay)


def _final_with(server_first: str, scram: Scram, proof: str) -> bytes:
    nonce = dict(p.split("=", 1) for p in server_first.split(","))["r"]
    return message(b"p", f"c={b64(b'n,,')},r={nonce},p={proof}".encode())


FINAL_CASES = {
    "wrong_nonce": (lambda sf, s: s.final(sf, nonce=s.nonce + "forged"), "nonce does not match"),
    "proof_bad_base64": (lambda sf, s: _final_with(sf, s, "!!not*base64!!"), "malformed base64"),
    "proof_wrong_length": (lambda sf, s: _final_with(sf, s, b64(os.urandom(16))), "malformed SCRAM proof"),
    "proof_missing": (lambda sf, s: message(b"p", f"c=biws,r={s.nonce}".encode()), "lacks a proof"),
}


@pytest.mark.parametrize("case", sorted(FINAL_CASES))
def test_bad_sasl_response(auth_pg, make_relay, tmp_path, case):
    relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": "scram-sha-256"}, {"alice": PASSWORDS["alice"]})
    build, fragment = FINAL_CASES[case]
    client, scram, server_first = scram_continued(relay)
    client.send(build(server_first, scram))
    assert_refused(client, "08P01", fragment)
    assert_serves(relay)


@pytest.mark.parametrize("auth_type", ["scram-sha-256", "plain"])
def test_second_startup_message_while_waiting_for_password(auth_pg, make_relay, tmp_path, auth_type):
    """PostgreSQL answers at once: 'expected password response, got message type 0' (08P01)."""
    relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": auth_type}, {"alice": PASSWORDS["alice"]})
    client = RawClient(relay.port)
    client.send(startup_packet("alice", "postgres"))
    assert client.read_message()[0] == b"R"
    client.send(startup_packet("alice", "postgres"))
    assert_refused(client, "08P01", "startup")
    assert_serves(relay)


def test_password_message_before_startup(auth_pg, make_relay, tmp_path):
    relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": "plain"}, {"alice": PASSWORDS["alice"]})
    client = RawClient(relay.port)
    client.send(message(b"p", PASSWORDS["alice"].encode() + b"\0"))
    assert_refused(client, "08P01", "bad packet header")
    assert_serves(relay)


@pytest.mark.parametrize("auth_type", ["plain", "md5"])
def test_empty_password(auth_pg, make_relay, tmp_path, auth_type):
    relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": auth_type}, {"alice": PASSWORDS["alice"]})
    client = RawClient(relay.port)
    client.send(startup_packet("alice", "postgres"))
    assert client.read_message()[1][:4] == struct.pack("!I", 3 if auth_type == "plain" else 5)
    client.send(message(b"p", b"\0"))
    assert_refused(client, "28P01", 'password authentication failed for user "alice"')
    assert_serves(relay)


@pytest.mark.parametrize("size", [70 * 1024, 1024 * 1024])
def test_oversized_password_message(auth_pg, make_relay, tmp_path, size):
    relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": "plain"}, {"alice": PASSWORDS["alice"]})
    client = RawClient(relay.port)
    client.send(startup_packet("alice", "postgres"))
    assert client.read_message() == (b"R", struct.pack("!I", 3))
    try:
        client.send(message(b"p", b"x" * size + b"\0"))
    except (BrokenPipeError, ConnectionResetError):
        pass  # pgrelay may close before reading it all; its error is already in our receive buffer
    assert_refused(client, "08P01", f"invalid message length {size + 5}")
    assert_serves(relay)


# == 8. a malicious server =============================================================================

class FakeServer:
    """A tiny 'PostgreSQL' whose behaviour depends on the database name in the StartupMessage."""

    SALT = b64(b"0123456789abcdef")

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.events: list[tuple] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _recv(conn, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        scenario = "?"
        try:
            length, code = struct.unpack("!II", self._recv(conn, 8))
            if (length, code) == (8, 80877103):
                self.events.append(("sslrequest",))
                conn.sendall(b"N")
                length, code = struct.unpack("!II", self._recv(conn, 8))
            items = self._recv(conn, length - 8).split(b"\0")
            params = dict(zip(items[0::2], items[1::2]))
            scenario = params.get(b"database", b"").decode()
            if scenario == "cleartext":
                conn.sendall(message(b"R", struct.pack("!I", 3)))
                try:
                    header = self._recv(conn, 5)
                    body = self._recv(conn, struct.unpack("!I", header[1:])[0] - 4)
                    self.events.append((scenario, "password", body))
                except EOFError:
                    self.events.append((scenario, "closed"))
                    return
                conn.sendall(message(b"E", b'SFATAL\0C28P01\0Mpassword authentication failed for user "alice"\0\0'))
                return
            if scenario == "nosqlstate":
                conn.sendall(message(b"E", b"SFATAL\0Mfake server says no\0\0"))
                self.events.append((scenario, "error sent"))
                return
            conn.sendall(message(b"R", struct.pack("!I", 10) + b"SCRAM-SHA-256\0\0"))
            header = self._recv(conn, 5)
            body = self._recv(conn, struct.unpack("!I", header[1:])[0] - 4)
            client_nonce = body.split(b"r=", 1)[1].decode()
            if scenario == "iterations":
                first = f"r={client_nonce}FAKE,s={self.SALT},i=1000000000"
            else:  # "nonce": a nonce that does not extend pgrelay's
                first = f"r=AAAAnotyournonceAAAA,s={self.SALT},i=4096"
            conn.sendall(message(b"R", struct.pack("!I", 11) + first.encode()))
            try:
                self._recv(conn, 5)
                self.events.append((scenario, "pgrelay answered the server-first-message"))
            except EOFError:
                self.events.append((scenario, "closed"))
        except (EOFError, OSError) as exc:
            self.events.append((scenario, f"connection ended: {exc!r}"))
        finally:
            conn.close()

    def close(self) -> None:
        self.stopping = True
        self.thread.join(2)
        self.listener.close()


@pytest.fixture
def fake_server():
    server = FakeServer()
    yield server
    server.close()


@pytest.mark.parametrize("scenario,sqlstate,text", [
    ("iterations", "08006", "server login failed: unacceptable SCRAM iteration count 1000000000: over pgrelay's limit of "
     "100000, refused as a CPU denial of service"),
    ("nonce", "08006", "server login failed: server nonce does not extend the client nonce"),
    ("nosqlstate", "XX000", "fake server says no"),
])
def test_malicious_server(auth_pg, make_relay, tmp_path, fake_server, scenario, sqlstate, text):
    relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": "trust"}, {"alice": PASSWORDS["alice"]},
                        databases={"fake": f"host=127.0.0.1 port={fake_server.port} dbname={scenario}"})
    started = time.monotonic()
    out = raw_login(relay.port, "alice", "unused", "fake")
    elapsed = time.monotonic() - started
    assert elapsed < 2, f"refusing the fake server took {elapsed:.1f}s"
    assert out.error is not None
    assert (out.error["S"], out.error["C"], out.error["M"]) == ("FATAL", sqlstate, text), out.error
    assert out.client.closed()
    assert ("sslrequest",) in fake_server.events
    if scenario == "nosqlstate":
        assert (scenario, "error sent") in fake_server.events
    else:
        # pgrelay dropped the server without computing or sending a proof.
        assert (scenario, "closed") in fake_server.events, fake_server.events
        assert not any("answered" in e[-1] for e in fake_server.events)
    with pytest.raises(psycopg.OperationalError, match=text.replace("(", r"\(").replace("'", "'")):
        pg3(relay, "alice", dbname="fake")
    # Other databases are still served.
    assert pg3_value(relay, "alice") == "alice"
    assert pg2_value(relay, "alice") == "alice"


@pytest.mark.parametrize("stored", ["plaintext", "md5", "scram_verifier"])
def test_server_asking_for_cleartext_never_gets_a_stored_hash(auth_pg, make_relay, tmp_path, fake_server, stored):
    """A stored md5 secret is a login credential (pass-the-hash); a server asking for a cleartext
    password (or anyone in the middle, server_tls_sslmode defaults to prefer) must not receive it."""
    secret = {"plaintext": PASSWORDS["alice"],
              "md5": "md5" + hashlib.md5((PASSWORDS["alice"] + "alice").encode()).hexdigest(),
              "scram_verifier": stored_secret(auth_pg, "alice")}[stored]
    relay = start_relay(make_relay, tmp_path, auth_pg, {"auth_type": "trust"},
                        {"alice": secret, "carol": PASSWORDS["carol"]},
                        databases={"fake": f"host=127.0.0.1 port={fake_server.port} dbname=cleartext"})
    out = raw_login(relay.port, "alice", "unused", "fake")
    assert out.error is not None and out.error["S"] == "FATAL", out.error
    assert out.client.closed()
    sent = [event[2] for event in fake_server.events if event[:2] == ("cleartext", "password")]
    if stored == "plaintext":
        assert sent == [secret.encode() + b"\0"]   # control: the scenario does ask and receive
        assert (out.error["C"], out.error["M"]) == ("28P01", 'password authentication failed for user "alice"')
    else:
        assert sent == [], f"pgrelay sent its stored {stored} secret as a cleartext password: {sent}"
        assert out.error["C"] == "08006", out.error
        assert "only a hashed secret is known" in out.error["M"], out.error
    # pgrelay still serves other clients (carol's plaintext password logs in to her real server).
    assert pg3_value(relay, "carol") == "carol"
