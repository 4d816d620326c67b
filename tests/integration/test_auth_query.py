"""auth_user / auth_query / auth_dbname lookups (expired and unknown users, timing, CVE-2025-12819 search_path), and secrets never reaching pgrelay's log."""

from __future__ import annotations

import base64
import hashlib
import statistics
import time

import psycopg
import pytest

from pgrelay.auth import ScramSecret

from ..support import wait_until
from .test_auth import (LIBPQ_METHOD, MD5_CODES, PASSWORDS, PLAIN_CODES, SCRAM_CODES, WRONG, assert_auth_failed,
                        assert_logged_in, assert_real_clients_refused, assert_serves, pg2_value, pg3, pg3_value,
                        raw_login, run_psql, server_logins, start_auth_pg, start_relay, stored_secret,
                        write_auth_file)

AUTH_SETTINGS = {"auth_type": "scram-sha-256", "auth_user": "relay_auth"}


@pytest.fixture(scope="module")
def auth_pg():
    server = start_auth_pg()
    yield server
    server.cleanup()


def auth_users() -> dict[str, str]:
    return {"relay_auth": PASSWORDS["relay_auth"]}


def auth_sessions(pg) -> list[str]:
    """database|application_name of every server connection logged in as auth_user."""
    return pg.psql("SELECT datname || '|' || application_name FROM pg_stat_activity "
                   "WHERE usename = 'relay_auth' ORDER BY 1").splitlines()


def assert_auth_sessions(pg, expected: list[str]) -> None:
    """Sessions of relays stopped by earlier tests may take a moment to leave pg_stat_activity."""
    try:
        wait_until(lambda: auth_sessions(pg) == expected, timeout=5)
    except AssertionError:
        assert auth_sessions(pg) == expected


def test_auth_query_looks_up_users_missing_from_auth_file(auth_pg, make_relay, tmp_path):
    relay = start_relay(make_relay, tmp_path, auth_pg, AUTH_SETTINGS, auth_users())
    before = server_logins(auth_pg, "quinn", "scram-sha-256")
    assert_logged_in(raw_login(relay.port, "quinn", PASSWORDS["quinn"], application_name="quinn-app"),
                     "quinn", SCRAM_CODES)
    # The server login used the verifier auth_query returned (pass-through), not a plaintext.
    assert server_logins(auth_pg, "quinn", "scram-sha-256") == before + 1
    assert pg3_value(relay, "quinn", PASSWORDS["quinn"], require_auth="scram-sha-256") == "quinn"
    assert pg2_value(relay, "quinn", PASSWORDS["quinn"]) == "quinn"
    result = run_psql(relay.port, "quinn", PASSWORDS["quinn"])
    assert (result.returncode, result.stdout.strip()) == (0, "quinn"), result.stderr
    assert_auth_failed(raw_login(relay.port, "quinn", WRONG), "quinn")
    assert_real_clients_refused(relay, "quinn", WRONG)
    # auth_query ran on one session in the client's database, which carries none of the client's
    # startup parameters (application_name above).
    assert_auth_sessions(auth_pg, ["postgres|"])
    assert_serves(relay, "relay_auth")  # auth_user itself is in auth_file


def test_auth_query_md5_method_switches_to_scram_for_scram_secrets(auth_pg, make_relay, tmp_path):
    relay = start_relay(make_relay, tmp_path, auth_pg, dict(AUTH_SETTINGS, auth_type="md5"), auth_users())
    assert_logged_in(raw_login(relay.port, "quinn", PASSWORDS["quinn"]), "quinn", SCRAM_CODES)
    assert_auth_failed(raw_login(relay.port, "quinn", WRONG), "quinn")
    bad = raw_login(relay.port, "bob", WRONG)  # bob's secret is md5: an md5 exchange
    assert bad.codes == MD5_CODES
    assert_auth_failed(bad, "bob")


@pytest.mark.parametrize("auth_type,codes,auth_dbname", [
    ("md5", MD5_CODES, ""), ("plain", PLAIN_CODES, ""), ("md5", MD5_CODES, "postgres")],
    ids=["md5", "plain", "md5-with-auth_dbname"])
def test_auth_query_md5_secret_logs_in_to_md5_server(auth_pg, make_relay, tmp_path, auth_type, codes, auth_dbname):
    """bob's md5 secret comes from auth_query; pgrelay must use it for the md5 server login (pass-the-hash)."""
    settings = dict(AUTH_SETTINGS, auth_type=auth_type, auth_dbname=auth_dbname)
    relay = start_relay(make_relay, tmp_path, auth_pg, settings, auth_users())
    before = server_logins(auth_pg, "bob", "md5")
    assert_logged_in(raw_login(relay.port, "bob", PASSWORDS["bob"]), "bob", codes)
    assert server_logins(auth_pg, "bob", "md5") == before + 1
    assert pg3_value(relay, "bob", PASSWORDS["bob"], require_auth=LIBPQ_METHOD[auth_type]) == "bob"


def test_expired_role_is_refused_like_a_wrong_password(auth_pg, make_relay, tmp_path):
    # PostgreSQL itself refuses olda's right password (VALID UNTIL 2000-01-01).
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "olda"'):
        psycopg.connect(auth_pg.dsn(user="olda", password=PASSWORDS["olda"]), connect_timeout=5)
    relay = start_relay(make_relay, tmp_path, auth_pg, AUTH_SETTINGS, auth_users())
    right = raw_login(relay.port, "olda", PASSWORDS["olda"])
    wrong = raw_login(relay.port, "olda", WRONG)
    assert right.codes == wrong.codes == [10, 11]
    assert right.error == wrong.error
    assert_auth_failed(right, "olda")
    assert_auth_failed(wrong, "olda")
    assert_real_clients_refused(relay, "olda", PASSWORDS["olda"])
    assert_serves(relay, "quinn")


def _scram_shape(server_first: str) -> tuple:
    attrs = dict(part.split("=", 1) for part in server_first.split(","))
    return len(attrs["r"]), len(base64.b64decode(attrs["s"])), attrs["i"], sorted(attrs)


def test_unknown_user_looks_exactly_like_a_wrong_password(auth_pg, make_relay, tmp_path):
    relay = start_relay(make_relay, tmp_path, auth_pg, AUTH_SETTINGS, auth_users())
    unknown = raw_login(relay.port, "ghost_user", PASSWORDS["quinn"])
    wrong = raw_login(relay.port, "quinn", WRONG)
    assert unknown.mechanisms == wrong.mechanisms == [b"SCRAM-SHA-256"]
    assert unknown.codes == wrong.codes == [10, 11]
    assert _scram_shape(unknown.server_first) == _scram_shape(wrong.server_first)
    assert _scram_shape(wrong.server_first)[1:] == (16, "4096", ["i", "r", "s"])
    assert unknown.error == dict(wrong.error, M='password authentication failed for user "ghost_user"')
    assert_auth_failed(unknown, "ghost_user")
    assert_auth_failed(wrong, "quinn")
    # The unknown user's mock salt is stable, like a real user's.
    salt = lambda out: dict(p.split("=", 1) for p in out.server_first.split(","))["s"]  # noqa: E731
    again = raw_login(relay.port, "ghost_user", WRONG)
    assert salt(again) == salt(unknown)
    assert_auth_failed(again, "ghost_user")
    with pytest.raises(psycopg.OperationalError, match='FATAL:  password authentication failed for user "ghost_user"'):
        pg3(relay, "ghost_user", PASSWORDS["quinn"])


def test_unknown_user_and_wrong_password_take_similar_time(auth_pg, make_relay, tmp_path):
    """A coarse check (shared 2-core machine): median failure times within 3x of each other.

    Both paths run auth_query and a full SCRAM exchange; only a gross difference (say, skipping
    the exchange for unknown users) would show up here.
    """
    relay = start_relay(make_relay, tmp_path, auth_pg, AUTH_SETTINGS, auth_users())
    assert_serves(relay, "quinn")  # auth_query session and pool are warm

    def timed(user):
        started = time.perf_counter()
        out = raw_login(relay.port, user, WRONG)
        elapsed = time.perf_counter() - started
        assert_auth_failed(out, user)
        return elapsed

    unknown, wrong = [], []
    for _ in range(15):
        unknown.append(timed("ghost_user"))
        wrong.append(timed("quinn"))
    a, b = statistics.median(unknown), statistics.median(wrong)
    assert max(a, b) / min(a, b) < 3, f"unknown user median {a * 1000:.1f} ms, wrong password {b * 1000:.1f} ms"


def test_auth_dbname_runs_auth_query_in_that_database(auth_pg, make_relay, tmp_path):
    relay = start_relay(make_relay, tmp_path, auth_pg, dict(AUTH_SETTINGS, auth_dbname="authdb"), auth_users(),
                        databases={"authdb": f"host=127.0.0.1 port={auth_pg.port} dbname=authdb_real"})
    assert_logged_in(raw_login(relay.port, "quinn", PASSWORDS["quinn"]), "quinn", SCRAM_CODES)
    assert_auth_sessions(auth_pg, ["authdb_real|"])
    assert_auth_failed(raw_login(relay.port, "quinn", WRONG), "quinn")


def test_auth_user_with_a_wrong_password_refuses_cleanly(auth_pg, make_relay, tmp_path):
    relay = start_relay(make_relay, tmp_path, auth_pg, AUTH_SETTINGS,
                        {"relay_auth": WRONG, "alice": PASSWORDS["alice"]})
    assert_auth_failed(raw_login(relay.port, "quinn", PASSWORDS["quinn"]), "quinn")
    assert 'auth_query as relay_auth in postgres failed: password authentication failed for user "relay_auth"' \
        in relay.log()
    assert_serves(relay, "alice")


ATTACKER_PASSWORD = "attacker-Pw-666"
UNQUALIFIED_AUTH_QUERY = ("SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
                          "FROM pg_authid WHERE rolname = $1 AND rolcanlogin")


def test_client_search_path_never_reaches_auth_query(auth_pg, make_relay, tmp_path):
    """CVE-2025-12819 class: a client's startup search_path must not steer auth_query's name lookup.

    Schema `evil` shadows pg_authid (returning a verifier for the attacker's password) and now()
    (counting its calls). auth_query is deliberately unqualified, as PgBouncer's old default was.
    """
    attacker = ScramSecret.from_password(ATTACKER_PASSWORD).encode()
    auth_pg.psql(f"""
        DROP SCHEMA IF EXISTS evil CASCADE;
        CREATE SCHEMA evil;
        CREATE SEQUENCE evil.calls;
        CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE plpgsql AS
            $$ BEGIN PERFORM pg_catalog.nextval('evil.calls'); RETURN pg_catalog.now(); END $$;
        CREATE VIEW evil.pg_authid AS SELECT 'quinn'::name AS rolname, '{attacker}'::text AS rolpassword,
            NULL::timestamptz AS rolvaliduntil, true AS rolcanlogin;
        GRANT USAGE ON SCHEMA evil TO PUBLIC;
        GRANT USAGE ON SEQUENCE evil.calls TO PUBLIC;
        GRANT SELECT ON evil.pg_authid TO PUBLIC;
    """)
    try:
        # Control: with that search_path the query really would resolve to the evil objects.
        with psycopg.connect(auth_pg.dsn(user="relay_auth", password=PASSWORDS["relay_auth"]), autocommit=True) as conn:
            conn.execute("SET search_path = evil, pg_catalog")
            query = UNQUALIFIED_AUTH_QUERY.replace("$1", "'quinn'")
            assert conn.execute(query).fetchone() == ("quinn", attacker)
            conn.execute("ALTER SEQUENCE evil.calls RESTART")
        assert auth_pg.psql("SELECT is_called FROM evil.calls") == "f"

        relay = start_relay(make_relay, tmp_path, auth_pg,
                            dict(AUTH_SETTINGS, auth_query=UNQUALIFIED_AUTH_QUERY,
                                 track_extra_parameters="IntervalStyle, search_path"), auth_users())
        evil_path = {"search_path": "evil, pg_catalog", "application_name": "evil-app"}
        # The attacker's password is refused: auth_query read the real pg_catalog.pg_authid.
        assert_auth_failed(raw_login(relay.port, "quinn", ATTACKER_PASSWORD, **evil_path), "quinn")
        # The real password works, and the client's own session does get its search_path.
        ok = raw_login(relay.port, "quinn", PASSWORDS["quinn"], **evil_path)
        assert ok.error is None, ok.error
        assert ok.value("SHOW search_path") == "evil, pg_catalog"
        assert ok.value("SELECT current_user") == "quinn"
        ok.client.close()
        with pg3(relay, "quinn", PASSWORDS["quinn"], options="-c search_path=evil,pg_catalog") as conn:
            # As PostgreSQL keeps a startup option: the string as given (a SET would print "evil, pg_catalog").
            assert conn.execute("SHOW search_path").fetchone()[0] == "evil,pg_catalog"
        assert auth_pg.psql("SELECT is_called FROM evil.calls") == "f", "evil.now() was called by auth_query"
        assert_auth_sessions(auth_pg, ["postgres|"])
    finally:
        auth_pg.psql("DROP SCHEMA evil CASCADE")


# == secrets never reach the log =======================================================================

LOG_HBA = """\
host all alice 127.0.0.1/32 scram-sha-256
host all bob 127.0.0.1/32 md5
host all carol 127.0.0.1/32 password
host all all 127.0.0.1/32 scram-sha-256
"""


BAD_SERVER_PASSWORD = "badserver-Pw-4242"


def _secret_strings(pg, md5_secret: str) -> set[str]:
    out = set(PASSWORDS.values()) | {WRONG, BAD_SERVER_PASSWORD, md5_secret, md5_secret[3:]}
    for role in ("alice", "carol", "dave", "quinn", "relay_auth", "erin"):
        verifier = stored_secret(pg, role)
        out.add(verifier)
        salt_part, keys = verifier.split("$", 1)[1].split("$")
        out.add(salt_part.split(":")[1])
        out.update(keys.split(":"))
    return {s for s in out if s}


def test_secrets_never_reach_the_log(auth_pg, make_relay, tmp_path):
    hba = tmp_path / "hba.conf"
    hba.write_text(LOG_HBA)
    md5_secret = "md5" + hashlib.md5((PASSWORDS["bob"] + "bob").encode()).hexdigest()
    users = {"alice": PASSWORDS["alice"], "bob": md5_secret, "carol": PASSWORDS["carol"],
             "dave": stored_secret(auth_pg, "dave"), "relay_auth": PASSWORDS["relay_auth"]}
    relay = start_relay(make_relay, tmp_path, auth_pg,
                        {"auth_type": "hba", "auth_hba_file": str(hba), "auth_user": "relay_auth", "verbose": "2",
                         "log_connections": "1", "log_disconnections": "1"}, users, name="logged",
                        databases={"badsrv": f"host=127.0.0.1 port={auth_pg.port} dbname=postgres user=alice "
                                             f"password={BAD_SERVER_PASSWORD}"})

    def round_of_logins():
        for user, codes in (("alice", SCRAM_CODES), ("bob", MD5_CODES), ("carol", PLAIN_CODES),
                            ("dave", SCRAM_CODES), ("quinn", SCRAM_CODES)):
            assert_logged_in(raw_login(relay.port, user, PASSWORDS[user]), user, codes)
            assert_auth_failed(raw_login(relay.port, user, WRONG), user)
        assert pg3_value(relay, "dave", PASSWORDS["dave"]) == "dave"
        assert_auth_failed(raw_login(relay.port, "ghost_user", PASSWORDS["quinn"]), "ghost_user")
        assert_auth_failed(raw_login(relay.port, "olda", PASSWORDS["olda"]), "olda")
        assert_logged_in(raw_login(relay.port, "erin", PASSWORDS["erin"]), "erin", SCRAM_CODES)

    round_of_logins()
    # A server login that fails: the [databases] line's password is wrong.
    failed = raw_login(relay.port, "alice", PASSWORDS["alice"], "badsrv")
    assert (failed.error["C"], failed.error["M"]) == ("28P01", 'password authentication failed for user "alice"')
    # Reload with erin's verifier added to auth_file (auth_query found it before), then log in again.
    write_auth_file(tmp_path / "logged-users.txt", dict(users, erin=stored_secret(auth_pg, "erin")))
    relay.reload()
    round_of_logins()
    log = relay.log()
    assert "login attempt: db=postgres user=quinn" in log and "DEBUG" in log  # verbose logging was on
    leaked = sorted(s for s in _secret_strings(auth_pg, md5_secret) if s in log)
    assert leaked == [], f"secrets in pgrelay's log: {leaked}"
