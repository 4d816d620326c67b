"""pgrelay/auth.py: md5 and SCRAM-SHA-256 mechanics, checked against a real PostgreSQL's verifiers and logins."""

import base64
import hashlib
import hmac
import os
import socket
import struct

import pytest

from pgrelay import protocol
from pgrelay.auth import (
    MAX_SCRAM_ITERATIONS, ScramClient, ScramError, ScramSecret, md5_from_secret, md5_password,
)

SCRAM_ROLE = "pgrelay_t_scram"
MD5_ROLE = "pgrelay_t_md5"
PASSWORD = "s3cret pa'ss"


# -- helpers ---------------------------------------------------------------------------------

class PgWire:
    """A bare socket to PostgreSQL, to run an authentication exchange by hand."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def read(self):
        while True:
            if len(self.buf) >= 5:
                (length,) = struct.unpack("!I", self.buf[1:5])
                if len(self.buf) >= length + 1:
                    kind, body = self.buf[:1], self.buf[5:length + 1]
                    self.buf = self.buf[length + 1:]
                    return kind, body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("PostgreSQL closed the connection")
            self.buf += chunk

    def read_auth(self):
        kind, body = self.read()
        if kind == b"E":
            return "error", protocol.parse_fields(body)
        assert kind == b"R", (kind, body)
        return struct.unpack("!I", body[:4])[0], body[4:]

    def finish_login(self):
        """After AuthenticationOk: collect until ReadyForQuery, then ask who we are."""
        while self.read()[0] != b"Z":
            pass
        self.send(protocol.query("SELECT current_user"))
        rows = []
        while True:
            kind, body = self.read()
            if kind == b"D":
                (n,) = struct.unpack("!I", body[2:6])
                rows.append(body[6:6 + n].decode())
            if kind == b"Z":
                return rows

    def close(self):
        self.sock.close()


def scram_login(port, user, client):
    """A full SCRAM-SHA-256 login driven by `client`; returns current_user, or the ErrorResponse fields."""
    wire = PgWire(port)
    try:
        wire.send(protocol.startup_message({"user": user, "database": "postgres"}))
        code, data = wire.read_auth()
        assert code == 10, (code, data)  # AuthenticationSASL
        assert "SCRAM-SHA-256" in protocol.parse_cstrings(data[:-1])
        wire.send(protocol.sasl_initial_response("SCRAM-SHA-256", client.first_message()))
        code, server_first = wire.read_auth()
        assert code == 11, (code, server_first)  # AuthenticationSASLContinue
        wire.send(protocol.password_message(client.final_message(server_first)))
        code, server_final = wire.read_auth()
        if code == "error":
            return server_final
        assert code == 12, (code, server_final)  # AuthenticationSASLFinal
        client.verify_final(server_final)
        assert wire.read_auth() == (0, b"")
        return wire.finish_login()
    finally:
        wire.close()


def stored_password(pg, role):
    return pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'")


def create_role(pg, role, password, encryption):
    literal = password.replace("'", "''")
    pg.psql(f"SET password_encryption = '{encryption}'; DROP ROLE IF EXISTS {role}; "
            f"CREATE ROLE {role} LOGIN PASSWORD '{literal}'")


@pytest.fixture(scope="module")
def pw_roles(pg):
    """Two roles that must log in with scram-sha-256 and md5 over TCP (pg_hba lines put first)."""
    create_role(pg, SCRAM_ROLE, PASSWORD, "scram-sha-256")
    create_role(pg, MD5_ROLE, PASSWORD, "md5")
    hba = os.path.join(pg.datadir, "pg_hba.conf")
    with open(hba) as f:
        original = f.read()
    lines = (f"host all {SCRAM_ROLE} 127.0.0.1/32 scram-sha-256\n"
             f"host all {MD5_ROLE} 127.0.0.1/32 md5\n")
    with open(hba, "w") as f:  # rewritten in place: keeps the owner PostgreSQL needs
        f.write(lines + original)
    pg.reload()
    try:
        _wait_for_password_request(pg)
        yield pg
    finally:
        with open(hba, "w") as f:
            f.write(original)
        pg.reload()
        pg.psql(f"DROP ROLE IF EXISTS {SCRAM_ROLE}; DROP ROLE IF EXISTS {MD5_ROLE}")


def _wait_for_password_request(pg, timeout=10.0):
    import time
    deadline = time.monotonic() + timeout
    while True:
        wire = PgWire(pg.port)
        try:
            wire.send(protocol.startup_message({"user": MD5_ROLE, "database": "postgres"}))
            code, _ = wire.read_auth()
        finally:
            wire.close()
        if code == 5:
            return
        assert time.monotonic() < deadline, "PostgreSQL did not apply the pg_hba.conf change"
        time.sleep(0.05)


# -- md5 -------------------------------------------------------------------------------------

def test_md5_password_known_value():
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(b"postgrespostgres").hexdigest()
    assert inner == "3175bce1d3201d16594cebf9d7eb3f9d"
    expected = b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()
    assert md5_password("postgres", "postgres", salt) == expected
    assert md5_from_secret("md5" + inner, salt) == expected
    assert md5_password("postgres", "postgres", b"\x01\x02\x03\x05") != expected


def test_md5_against_postgresql(pw_roles):
    pg = pw_roles
    secret = stored_password(pg, MD5_ROLE)
    assert secret == "md5" + hashlib.md5((PASSWORD + MD5_ROLE).encode()).hexdigest()
    for make in (lambda salt: md5_password(PASSWORD, MD5_ROLE, salt),
                 lambda salt: md5_from_secret(secret, salt)):
        wire = PgWire(pg.port)
        try:
            wire.send(protocol.startup_message({"user": MD5_ROLE, "database": "postgres"}))
            code, salt = wire.read_auth()
            assert code == 5 and len(salt) == 4  # AuthenticationMD5Password
            wire.send(protocol.password_message(make(salt) + b"\x00"))
            assert wire.read_auth() == (0, b"")
            assert wire.finish_login() == [MD5_ROLE]
        finally:
            wire.close()


# -- ScramSecret -----------------------------------------------------------------------------

def test_scram_secret_round_trip():
    secret = ScramSecret.from_password("pw", iterations=4096, salt=b"0123456789abcdef")
    salted = hashlib.pbkdf2_hmac("sha256", b"pw", b"0123456789abcdef", 4096)
    assert secret.stored_key == hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    assert secret.server_key == hmac.new(salted, b"Server Key", "sha256").digest()
    text = secret.encode()
    assert text == ("SCRAM-SHA-256$4096:" + base64.b64encode(b"0123456789abcdef").decode() + "$"
                    + base64.b64encode(secret.stored_key).decode() + ":" + base64.b64encode(secret.server_key).decode())
    assert ScramSecret.parse(text) == secret
    random_salt = ScramSecret.from_password("pw")
    assert len(random_salt.salt) == 16 and random_salt.iterations == 4096
    assert ScramSecret.parse(random_salt.encode()) == random_salt
    assert "stored_key" not in repr(secret) and "server_key" not in repr(secret)


KEY = base64.b64encode(b"k" * 32).decode()


@pytest.mark.parametrize("text", [
    "",
    "md5" + "0" * 32,
    "plaintext password",
    f"SCRAM-SHA-1$4096:c2FsdA==${KEY}:{KEY}",
    f"SCRAM-SHA-256$:c2FsdA==${KEY}:{KEY}",
    f"SCRAM-SHA-256$x4096:c2FsdA==${KEY}:{KEY}",
    f"SCRAM-SHA-256$4096:c2FsdA==${KEY}",
    f"SCRAM-SHA-256$4096${KEY}:{KEY}",
    f"SCRAM-SHA-256$4096:c2FsdA=={KEY}:{KEY}",
    f"SCRAM-SHA-256$4096:c2F!dA==${KEY}:{KEY}",
    f"SCRAM-SHA-256$4096:c2FsdA${KEY}:{KEY}",  # salt without its padding
    f"SCRAM-SHA-256$4096:c2FsdA==${KEY}:{KEY} ",
    f" SCRAM-SHA-256$4096:c2FsdA==${KEY}:{KEY}",
], ids=["empty", "md5", "plain", "sha1", "no-iterations", "bad-iterations", "no-server-key", "no-salt",
        "no-dollar", "bad-salt-char", "bad-padding", "trailing-space", "leading-space"])
def test_scram_secret_parse_rejects_malformed(text):
    assert ScramSecret.parse(text) is None


def test_scram_secret_parse_rejects_wrong_key_length():
    """PostgreSQL refuses a verifier whose StoredKey/ServerKey are not 32 bytes (SCRAM_KEY_LEN)."""
    short = base64.b64encode(b"k" * 16).decode()
    assert ScramSecret.parse(f"SCRAM-SHA-256$4096:c2FsdA==${short}:{KEY}") is None
    assert ScramSecret.parse(f"SCRAM-SHA-256$4096:c2FsdA==${KEY}:{short}") is None


@pytest.mark.parametrize("password", [PASSWORD, "pässwörd ünïcode", "x" * 100])
def test_scram_secret_matches_postgresql(pg, password):
    """ScramSecret.from_password with PostgreSQL's salt and iterations gives PostgreSQL's verifier."""
    role = "pgrelay_t_verifier"
    create_role(pg, role, password, "scram-sha-256")
    try:
        stored = stored_password(pg, role)
    finally:
        pg.psql(f"DROP ROLE {role}")
    parsed = ScramSecret.parse(stored)
    assert parsed is not None and parsed.iterations == 4096 and len(parsed.salt) == 16
    assert ScramSecret.from_password(password, parsed.iterations, parsed.salt).encode() == stored
    assert parsed.encode() == stored


def test_scram_secret_matches_postgresql_saslprep(pg):
    """PostgreSQL SASLprep-normalises passwords (NFKC, non-ASCII space to space, soft hyphen removed)."""
    role = "pgrelay_t_saslprep"
    password = "\ufb01sh\u00a0pie\u00ad"  # 'fi' ligature, no-break space, soft hyphen: prepped to 'fish pie'
    create_role(pg, role, password, "scram-sha-256")
    try:
        stored = stored_password(pg, role)
    finally:
        pg.psql(f"DROP ROLE {role}")
    parsed = ScramSecret.parse(stored)
    assert ScramSecret.from_password("fish pie", parsed.iterations, parsed.salt).encode() == stored
    assert ScramSecret.from_password(password, parsed.iterations, parsed.salt).encode() == stored


# -- ScramClient against PostgreSQL ------------------------------------------------------------

def test_scram_client_logs_in_to_postgresql(pw_roles):
    pg = pw_roles
    client = ScramClient(password=PASSWORD)
    assert client.mechanism == "SCRAM-SHA-256"
    assert client.first_message() == f"n,,n=,r={client.nonce}".encode()
    assert scram_login(pg.port, SCRAM_ROLE, client) == [SCRAM_ROLE]


def test_scram_client_with_keys_logs_in_to_postgresql(pw_roles):
    """Pass-through: ClientKey and ServerKey instead of the password."""
    pg = pw_roles
    secret = ScramSecret.parse(stored_password(pg, SCRAM_ROLE))
    salted = hashlib.pbkdf2_hmac("sha256", PASSWORD.encode(), secret.salt, secret.iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    assert hashlib.sha256(client_key).digest() == secret.stored_key
    client = ScramClient(client_key=client_key, server_key=secret.server_key)
    assert scram_login(pg.port, SCRAM_ROLE, client) == [SCRAM_ROLE]


def test_scram_client_wrong_password_refused_by_postgresql(pw_roles):
    fields = scram_login(pw_roles.port, SCRAM_ROLE, ScramClient(password="wrong"))
    assert fields["C"] == "28P01"
    assert fields["M"] == f'password authentication failed for user "{SCRAM_ROLE}"'


def test_scram_client_without_credentials():
    client = ScramClient()
    with pytest.raises(ScramError, match="no password or SCRAM keys"):
        client.final_message(f"r={client.nonce}srv,s=c2FsdA==,i=4096".encode())


def test_scram_client_channel_binding_header():
    client = ScramClient(password="pw", channel_binding=b"\x01\x02")
    assert client.mechanism == "SCRAM-SHA-256-PLUS"
    assert client.first_message().startswith(b"p=tls-server-end-point,,n=,r=")
    final = client.final_message(f"r={client.nonce}srv,s=c2FsdA==,i=4096".encode()).decode()
    cbind = base64.b64decode(final.split(",")[0][2:])
    assert cbind == b"p=tls-server-end-point,," + b"\x01\x02"


# -- ScramClient refusing bad server messages --------------------------------------------------

def server_first(client, nonce=None, salt="c2FsdA==", iterations="4096"):
    parts = [f"r={client.nonce + 'srv' if nonce is None else nonce}"]
    if salt is not None:
        parts.append(f"s={salt}")
    if iterations is not None:
        parts.append(f"i={iterations}")
    return ",".join(parts).encode()


def test_final_message_accepts_good_server_first():
    client = ScramClient(password="pw")
    final = client.final_message(server_first(client)).decode()
    assert final.startswith(f"c=biws,r={client.nonce}srv,p=")
    assert client.expected_signature is not None and len(client.expected_signature) == 32


@pytest.mark.parametrize("kind", ["other-nonce", "same-nonce", "prefix-of-nonce", "empty-nonce", "huge-nonce"])
def test_final_message_refuses_wrong_nonce(kind):
    client = ScramClient(password="pw")
    nonce = {"other-nonce": "AAAAAAAAAAAAAAAAAAAAAAAAserver", "same-nonce": client.nonce,
             "prefix-of-nonce": client.nonce[:-2], "empty-nonce": "",
             "huge-nonce": client.nonce + "x" * 2000}[kind]
    with pytest.raises(ScramError):
        client.final_message(server_first(client, nonce=nonce))
    assert client.expected_signature is None


def test_final_message_refuses_missing_salt():
    client = ScramClient(password="pw")
    with pytest.raises(ScramError, match="lacks nonce, salt or iteration count"):
        client.final_message(server_first(client, salt=None))
    with pytest.raises(ScramError, match="lacks nonce, salt or iteration count"):
        client.final_message(server_first(client, iterations=None))


def test_final_message_refuses_bad_salt():
    client = ScramClient(password="pw")
    with pytest.raises(ScramError, match="bad SCRAM salt"):
        client.final_message(server_first(client, salt="c2F*dA=="))


@pytest.mark.parametrize("iterations", ["0", str(10 ** 9), str(MAX_SCRAM_ITERATIONS + 1), "-1", "4k", ""])
def test_final_message_refuses_iteration_count(iterations):
    client = ScramClient(password="pw")
    with pytest.raises(ScramError, match="unacceptable SCRAM iteration count"):
        client.final_message(server_first(client, iterations=iterations))


def test_final_message_refuses_non_ascii_and_garbage():
    client = ScramClient(password="pw")
    with pytest.raises(ScramError, match="not ASCII"):
        client.final_message(f"r={client.nonce}sérv,s=c2FsdA==,i=4096".encode())
    with pytest.raises(ScramError, match="malformed SCRAM attribute"):
        client.final_message(b"garbage")
    with pytest.raises(ScramError, match="malformed SCRAM attribute"):
        client.final_message(f"r={client.nonce}srv,,s=c2FsdA==,i=4096".encode())


def expected_server_signature(client, first, password="pw"):
    text = first.decode()
    attrs = dict(part.split("=", 1) for part in text.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    auth_message = f"n=,r={client.nonce},{text},c=biws,r={attrs['r']}".encode()
    return hmac.new(server_key, auth_message, "sha256").digest()


def test_verify_final_accepts_right_signature():
    client = ScramClient(password="pw")
    first = server_first(client)
    client.final_message(first)
    signature = expected_server_signature(client, first)
    client.verify_final(b"v=" + base64.b64encode(signature))


def test_verify_final_refuses_wrong_signature():
    client = ScramClient(password="pw")
    first = server_first(client)
    client.final_message(first)
    wrong = bytearray(expected_server_signature(client, first))
    wrong[0] ^= 1
    with pytest.raises(ScramError, match="invalid server signature"):
        client.verify_final(b"v=" + base64.b64encode(bytes(wrong)))
    with pytest.raises(ScramError, match="invalid server signature"):
        client.verify_final(b"v=")
    with pytest.raises(ScramError):
        client.verify_final(b"v=@@@@")
    with pytest.raises(ScramError):
        client.verify_final(b"x=" + base64.b64encode(expected_server_signature(client, first)))


def test_verify_final_refuses_error_attribute():
    client = ScramClient(password="pw")
    client.final_message(server_first(client))
    with pytest.raises(ScramError, match="server reported SCRAM error: invalid-proof"):
        client.verify_final(b"e=invalid-proof")


def test_verify_final_before_final_message():
    client = ScramClient(password="pw")
    with pytest.raises(ScramError, match="invalid server signature"):
        client.verify_final(b"v=" + base64.b64encode(b"\x00" * 32))
