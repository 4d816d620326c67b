"""The three tuning scenarios of "Scaling Postgres connections with PgBouncer" (PlanetScale), with the
article's numbers, as pgrelay configurations: the worst case `pgrelay check` prints, its verdict and
exit status, and where no room is left for direct or superuser connections."""

from __future__ import annotations

import pytest

from pgrelay.budget.verdict import CAN_EXCEED, FITS, NO_ROOM

HOST = "db.example.com:5432"

# Small server: max_connections=50, one database, three users (app, analytics, export).
SMALL = """\
[databases]
main = host=db.example.com dbname=main

[users]
app = pool_mode=transaction
analytics = pool_mode=transaction
export = pool_mode=transaction

[pgbouncer]
pool_mode = transaction
max_client_conn = 500
default_pool_size = 30
max_user_connections = 30
max_db_connections = 40
"""

# Large server: the same layout, max_connections=500.
LARGE = SMALL.replace("max_client_conn = 500", "max_client_conn = 10000") \
    .replace("default_pool_size = 30", "default_pool_size = 200") \
    .replace("max_user_connections = 30", "max_user_connections = 200") \
    .replace("max_db_connections = 40", "max_db_connections = 450")


def tenants(forced_users: bool) -> str:
    """Single tenant: 200 databases, one role each, pool size 2, against max_connections=400."""
    user = " user=tenant{n:03d}" if forced_users else ""
    lines = ["[databases]"] + [f"tenant{n:03d} = host=db.example.com dbname=tenant{n:03d}" + user.format(n=n)
                               for n in range(1, 201)]
    lines += ["[pgbouncer]", "pool_mode = transaction", "max_client_conn = 5000", "default_pool_size = 2",
              "max_db_connections = 2", "max_user_connections = 2"]
    return "\n".join(lines) + "\n"


def test_small_server_fits_with_seven_left(check):
    result = check(SMALL, "--max-connections", "50")
    assert result.status == FITS, result.out
    report = result.host(HOST)
    # The article's formula before the caps: 3 pools x 30, each with its listening server (31), and
    # any other user would get a pool too.
    assert result.value("pools x (size + reserve + listening)") == "unbounded"
    assert "3 x 31 + pools of users not in [users]" in report
    assert result.value("pools under their caps") == "40"
    assert "max_db_connections = 40 for database main" in report
    assert result.value("worst case") == "40"
    assert result.value("= slots for non-superusers") == "47"
    assert result.value("left for direct and admin connections") == "7"
    assert "FITS: 7 connections left for direct and admin connections" in report
    assert "no room left" not in result.out
    assert result.out.rstrip().endswith("result: fits on 1 host (exit status 0)")


def test_small_server_without_the_database_cap_is_bounded_by_nothing(check):
    """The article's reason for max_db_connections: without it, users not listed can open pools at will."""
    result = check(SMALL.replace("max_db_connections = 40\n", ""), "--max-connections", "50")
    assert result.status == CAN_EXCEED
    assert result.value("worst case") == "unbounded"
    assert "database main, users not in [users]: each gets a pool of its own: set max_db_connections" in result.out
    assert "UNBOUNDED" in result.out


def test_large_server_fits_with_fifty_for_direct_and_superusers(check):
    result = check(LARGE, "--max-connections", "500")
    assert result.status == FITS, result.out
    assert "3 x 201 + pools of users not in [users]" in result.out  # 200 + the listening server
    assert result.value("worst case") == "450"
    assert "max_db_connections = 450 for database main" in result.out
    # The article's 50 "available for other purposes": 47 for anyone, 3 kept for superusers.
    assert result.value("left for direct and admin connections") == "47"
    assert "superusers also keep the 3 superuser_reserved_connections slots" in result.out


@pytest.mark.parametrize("forced_users", [False, True], ids=["any-user", "one-user-per-tenant"])
def test_single_tenant_fills_max_connections_and_leaves_no_room(check, forced_users):
    """200 x 2 = 400 "matches" max_connections=400, but PostgreSQL keeps 3 slots for superusers: pgrelay
    can ask for 3 more than non-superusers may have, and leaves no room for anyone else."""
    result = check(tenants(forced_users), "--max-connections", "400")
    assert result.status == CAN_EXCEED, result.out
    assert result.value("worst case") == "400"
    assert result.value("= slots for non-superusers") == "397"
    assert result.value("left for direct and admin connections") == "none"
    report = result.host(HOST)
    assert "CAN EXCEED: 400 server connections for 397 slots, 3 too many" in report
    assert "no room left for direct connections" in report
    assert "no room left for superuser connections either if pgrelay's server users are superusers" in report
    assert "sorry, too many clients already" in report
    if forced_users:  # the article's arithmetic, as the pools x sizes term (2 + a listening server each),
        # which max_db_connections = 2 bounds to 400: pgrelay counts the listening server against it
        assert "200 x 3" in report and result.value("pools x (size + reserve + listening)") == "600"
        assert result.value("pools under their caps") == "400"
    else:
        assert "max_db_connections for 200 databases (2 each, 400 in all)" in report


def test_single_tenant_without_superuser_slots_fits_but_leaves_nothing(check):
    result = check(tenants(True), "--max-connections", "400", "--superuser-reserved", "0")
    assert result.status == NO_ROOM, result.out
    assert result.value("left for direct and admin connections") == "0"
    report = result.host(HOST)
    assert "FITS BUT LEAVES NOTHING: 400 server connections for 400 slots" in report
    assert "no room left for direct connections" in report
    assert "no room left for superuser connections: superuser_reserved_connections is 0" in report
    assert result.out.rstrip().endswith("(exit status 2)")


def test_single_tenant_with_superuser_slots_kept_fits_but_leaves_nothing_for_direct(check):
    result = check(tenants(True), "--max-connections", "403")
    assert result.status == NO_ROOM, result.out
    report = result.host(HOST)
    assert "no room left for direct connections" in report
    assert "only the 3 superuser_reserved_connections slots remain, for superusers" in report


@pytest.mark.parametrize("text,max_connections,per_process", [(SMALL, 50, 40), (LARGE, 500, 450)],
                         ids=["small", "large"])
def test_processes_multiply_the_worst_case(check, text, max_connections, per_process):
    """Each pgrelay process has pools and caps of its own: two processes can open twice as many."""
    result = check(text, "--max-connections", str(max_connections), "--processes", "2")
    assert result.value("per pgrelay process") == str(per_process)
    assert result.value("pgrelay processes") == "x 2"
    assert result.value("worst case") == str(2 * per_process)
    assert result.status == CAN_EXCEED
    assert "2 pgrelay processes" in result.out.splitlines()[0]
    assert "no room left for direct connections" in result.out


def test_reserved_connections_of_postgresql_16_count(check):
    """reserved_connections (16+) takes slots from non-superusers, as superuser_reserved_connections does."""
    result = check(SMALL, "--max-connections", "50", "--reserved", "7")
    assert result.value("= slots for non-superusers") == "40"
    assert result.value("left for direct and admin connections") == "0"
    assert result.status == NO_ROOM
