"""The worst case per host as pgrelay's routing allows it: pool sizes and reserves by precedence, caps
shared across ports, poolers and direct connections, uncountable pools (*, clusters, unlisted users),
health checks, auth_query sessions and upstream poolers."""

from __future__ import annotations

from pgrelay.budget.verdict import CAN_EXCEED, FITS

H = "h.example.com:5432"


def ini(databases: str, settings: str = "", users: str = "", extra: str = "") -> str:
    text = f"[databases]\n{databases}\n[pgbouncer]\npool_mode = transaction\n{settings}\n"
    if users:
        text += f"[users]\n{users}\n"
    return text + extra


# With a forced user every client shares the database's pools, so they can be counted.
MAIN = "main = host=h.example.com user=app"


def worst(check, text: str, *args: str, host: str = H) -> str:
    result = check(text, *args)
    assert result.status in (FITS, CAN_EXCEED, 2), result.err
    return result.value("worst case", host)


def test_default_pool_size_is_the_pool_size(check):
    # 7 servers, and the transaction pool's listening server (LISTEN, pgrelay.notify) beyond them
    assert worst(check, ini(MAIN, "default_pool_size = 7")) == "8"


def test_the_listening_server_counts_only_where_pgrelay_opens_one(check):
    """Transaction and statement pools open one listening server beyond their size when a client
    LISTENs; session pools (the client's own server listens) and session_state = allow (LISTEN
    stays on the pooled server, as in PgBouncer) open none."""
    assert worst(check, ini(MAIN, "default_pool_size = 7").replace("pool_mode = transaction",
                                                                   "pool_mode = statement")) == "8"
    assert worst(check, ini(MAIN, "default_pool_size = 7").replace("pool_mode = transaction",
                                                                   "pool_mode = session")) == "7"
    assert worst(check, ini(MAIN, "default_pool_size = 7\nsession_state = allow")) == "7"
    assert worst(check, ini(MAIN, "default_pool_size = 7\nsession_state = error")) == "8"
    # a cap bounds the listening server too: pgrelay counts it against max_db_connections
    assert worst(check, ini(MAIN, "default_pool_size = 7\nmax_db_connections = 7")) == "7"


def test_database_pool_size_wins_over_the_default(check):
    assert worst(check, ini(MAIN + " pool_size=5", "default_pool_size = 7")) == "6"  # 5 + listening server


def test_users_pool_size_wins_over_the_databases(check):
    """[users] pool_size of the client's role wins over the database's (PgBouncer); clients of roles
    without one get the database's, so the shared pool can be as large as the largest."""
    assert worst(check, ini(MAIN + " pool_size=5", "default_pool_size = 7", "app = pool_size=9")) == "10"
    assert worst(check, ini(MAIN + " pool_size=5", "default_pool_size = 7", "app = pool_size=3")) == "6"


def test_reserve_adds_to_each_pool_by_precedence(check):
    assert worst(check, ini(MAIN, "default_pool_size = 10\nreserve_pool_size = 3")) == "14"  # 10 + 3 + 1
    assert worst(check, ini(MAIN + " reserve_pool=2", "default_pool_size = 10\nreserve_pool_size = 3")) == "13"
    assert worst(check, ini(MAIN + " reserve_pool_size=2", "default_pool_size = 10\nreserve_pool_size = 3")) == "13"
    assert worst(check, ini(MAIN + " reserve_pool_size=2", "default_pool_size = 10",
                            "app = reserve_pool_size=6")) == "17"


def test_pool_size_zero_is_unbounded_until_a_cap_bounds_it(check):
    result = check(ini(MAIN, "default_pool_size = 0"))
    assert result.status == CAN_EXCEED
    assert result.value("worst case") == "unbounded"
    assert "pool size 0 means unlimited: set default_pool_size" in result.out
    capped = check(ini(MAIN, "default_pool_size = 0\nmax_user_connections = 15"))
    assert capped.status == FITS
    assert capped.value("worst case") == "15"
    assert "max_user_connections = 15 for user app" in capped.out


def test_a_user_cap_spans_databases(check):
    text = ini(MAIN.replace("main", "a") + "\n" + MAIN.replace("main", "b"), "default_pool_size = 10",
               "app = max_user_connections=15")
    assert worst(check, text) == "15"
    assert worst(check, text.replace("app = max_user_connections=15", "app = pool_mode=transaction")) == "22"  # 2 x (10 + 1)


def test_database_line_cap_wins_over_the_global_one(check):
    text = ini(MAIN + " max_db_connections=4", "default_pool_size = 10\nmax_db_connections = 8")
    result = check(text)
    assert result.value("worst case") == "4"
    assert "max_db_connections = 4 for database main" in result.out


def test_wildcard_database_is_unbounded_and_says_how_to_bound_it(check):
    result = check(ini("* = host=h.example.com", "default_pool_size = 10\nmax_db_connections = 10"))
    assert result.status == CAN_EXCEED
    assert result.value("worst case") == "unbounded"
    assert "pools of database names under * and of users not in [users]" in result.out
    assert "give the * line a user= (then that user's max_user_connections caps it)" in result.out
    # A forced user: every database name still gets a pool, but the user's cap spans them.
    bounded = check(ini("* = host=h.example.com user=svc", "default_pool_size = 10\nmax_user_connections = 25"))
    assert bounded.value("worst case") == "25"
    assert "max_user_connections = 25 for user svc" in bounded.out


def test_wildcard_with_a_listed_user_names_that_users_cap(check):
    result = check(ini("* = host=h.example.com user=app", "default_pool_size = 10"))
    assert "user app: each database name gets a pool of its own: set max_user_connections" in result.out


def test_a_session_port_doubles_the_pools(check):
    """A session port and a transaction port never share servers: one pool each per (database, user)."""
    text = ini(MAIN, "default_pool_size = 10", extra="[listeners]\nsession = port=6433 pool_mode=session\n")
    result = check(text)
    assert result.value("worst case") == "21"  # session 10, transaction 10 + its listening server
    assert "1 x 10 + 1 x 11" in result.out
    same_mode = text.replace("pool_mode=session", "pool_mode=transaction")
    assert worst(check, same_mode) == "11"


def test_a_dedicated_pooler_has_its_own_pools_and_caps_under_the_shared_ones(check):
    pooler = "[poolers]\nreports = default_pool_size=5 max_db_connections=3\n"
    # main: 10 + 1 listening; reports (transaction): 5 + 1 under its own cap of 3
    assert worst(check, ini(MAIN, "default_pool_size = 10", extra=pooler)) == "14"
    capped = check(ini(MAIN + " max_db_connections=12", "default_pool_size = 10", extra=pooler))
    assert capped.value("worst case") == "12"
    assert "max_db_connections = 12 for database main" in capped.out


def test_replica_pools_reach_the_replicas_and_have_caps_of_their_own(check):
    text = ini("main = host=p.example.com replicas=r.example.com user=app", "default_pool_size = 10\n"
               "max_db_connections = 8\nlocal_pooler_replicas = 1")
    result = check(text)
    # The primary's pools (cap 8) and the replica pools (cap 8, since one may fall back to any host).
    assert result.value("pools under their caps", "p.example.com:5432") == "16"
    assert result.value("pools under their caps", "r.example.com:5432") == "8"
    # Replica routes make pgrelay health-check every host.
    assert result.value("health checks", "p.example.com:5432") == "1"
    assert result.value("health checks", "r.example.com:5432") == "1"
    assert result.value("worst case", "p.example.com:5432") == "17"


def test_health_checks_of_a_multi_host_database(check):
    result = check(ini("main = host=a.example.com,b.example.com user=app", "default_pool_size = 10"))
    for host in ("a.example.com:5432", "b.example.com:5432"):
        assert result.value("health checks", host) == "1"
        assert result.value("worst case", host) == "12"  # 10 + listening + health check
    single = check(ini(MAIN, "default_pool_size = 10"))
    assert single.value("health checks") == "0"


def test_direct_port_adds_max_direct_connections_under_the_shared_caps(check):
    direct = "[listeners]\ndirect = port=5433 role=direct\n"
    result = check(ini(MAIN, "default_pool_size = 10\nmax_direct_connections = 20", extra=direct))
    assert result.value("direct connections") == "40"  # the primary's and (|replica) the same host's
    assert result.value("worst case") == "52"           # 10 + 1 listening + 40 + a health check (|replica asks)
    capped = check(ini(MAIN + " max_db_connections=25", "default_pool_size = 10\nmax_direct_connections = 20",
                       extra=direct))
    # Primary pools and direct connections share the cap of 25; |replica ones have their own.
    assert capped.value("pools and direct, under shared caps") == "45"
    unlimited = check(ini(MAIN, "default_pool_size = 10\nmax_direct_connections = 0", extra=direct))
    assert unlimited.value("worst case") == "unbounded"
    assert "max_direct_connections = 0 (no limit): set max_direct_connections" in unlimited.out


def test_direct_limit_shared_by_databases_on_the_same_host(check):
    """Two databases on one host share its direct limit; their own caps still bound each."""
    dbs = MAIN.replace("main", "a") + " max_db_connections=5\n" + MAIN.replace("main", "b") + " max_db_connections=5"
    text = ini(dbs, "default_pool_size = 10\nmax_direct_connections = 20",
               extra="[listeners]\ndirect = port=5433 role=direct\n")
    result = check(text)
    # a: 5 + 5 (replica side), b: 5 + 5: the caps bind before the shared 20 + 20 direct limits do.
    assert result.value("pools and direct, under shared caps") == "20"


def test_clusters_are_uncountable(check):
    text = ini(MAIN, "default_pool_size = 10\ncluster_usernames = 1",
               extra="[clusters]\nacme = host=h.example.com\n")
    result = check(text)
    assert result.value("worst case") == "unbounded"
    assert "database names under cluster acme" in result.out
    off = check(text.replace("cluster_usernames = 1", "cluster_usernames = 0"))
    assert off.value("worst case") == "11"
    assert "[clusters] entries are not reachable: cluster_usernames is off" in off.out


def test_auth_query_sessions(check):
    two = MAIN + "\n" + MAIN.replace("main", "other")
    result = check(ini(two, "default_pool_size = 10\nauth_user = pgrelay_auth"))
    assert result.value("auth_query sessions") == "2"
    assert result.value("worst case") == "24"  # 2 x (10 + 1) + 2
    one = check(ini(two, "default_pool_size = 10\nauth_user = pgrelay_auth\nauth_dbname = main"))
    assert one.value("auth_query sessions") == "1"
    star = check(ini(MAIN + "\n* = host=h.example.com user=svc", "default_pool_size = 10\nmax_user_connections = 5\n"
                     "auth_user = pgrelay_auth"))
    assert star.value("auth_query sessions") == "unbounded"
    assert "auth_query: one session per database name under *: set auth_dbname" in star.out


def test_an_upstream_pooler_is_not_judged_against_postgresql(check):
    pooler = "[poolers]\nchained = upstream=local.example.com:6432 default_pool_size=7\n"
    result = check(ini(MAIN, "default_pool_size = 10", extra=pooler))
    upstream = result.host("local.example.com:6432")
    assert "upstream pooler local.example.com:6432 (not PostgreSQL" in upstream
    assert result.value("worst case", "local.example.com:6432") == "8"  # 7 + the pooler's listening server
    assert "max_connections" not in upstream
    assert result.value("worst case", H) == "11"
    assert result.out.rstrip().endswith("result: fits on 1 host (exit status 0)")


def test_setting_flags_and_variables_change_the_budget_as_they_change_pgrelay(check, monkeypatch):
    text = ini(MAIN, "default_pool_size = 10")
    assert worst(check, text, "--default_pool_size", "4") == "5"  # + the listening server
    monkeypatch.setenv("PGRELAY_DEFAULT_POOL_SIZE", "6")
    assert worst(check, text) == "7"


def test_routing_plugins_the_check_cannot_see_are_named(check, tmp_path):
    plugin = tmp_path / "my_routes.py"
    plugin.write_text("from pgrelay import hookimpl\n\n\n@hookimpl\ndef pgrelay_route_client(relay, login):\n"
                      "    return None\n")
    result = check(ini(MAIN, f"default_pool_size = 10\nplugins = {plugin}"))
    assert f"note: plugin {plugin} implements pgrelay_route_client: pools it creates are not counted" in result.out
    disabled = check(ini(MAIN, "default_pool_size = 10\ndisable_plugins = dedicated_poolers"))
    assert "note: built-in plugin dedicated_poolers is disabled: its routes are not counted" in disabled.out
    refused = check(ini(MAIN, "disable_plugins = databases"))  # pgrelay itself refuses [databases] then
    assert refused.status == 3
    assert "unknown section [databases]" in refused.err
    no_databases = check("[pgbouncer]\ndisable_plugins = databases\n")
    assert no_databases.status == 3
    assert "the databases plugin is disabled (disable_plugins): no database is known to budget" in no_databases.err


def test_an_option_the_plugin_does_not_parse_is_read_from_the_line(tmp_path, restore_pgrelay_logger):
    """While a [databases]/[users] key is only planned, the plugin's objects lack it: the check reads
    the line's raw value, and says it counts a limit pgrelay does not enforce yet."""
    from pgrelay.budget.model import _Reader
    from pgrelay.relay import Relay
    path = tmp_path / "relay.ini"
    path.write_text(ini(MAIN + " max_db_connections=5", "default_pool_size = 10", "app = max_user_connections=4"))
    relay = Relay(str(path), env={})
    reader = _Reader(relay)
    assert reader.option("databases", "main", object(), "max_db_connections") == 5
    assert reader.option("users", "app", object(), "max_user_connections") == 4
    assert reader.option("users", "app", object(), "reserve_pool_size") is None
    assert reader.notes == [f"{path}:2: max_db_connections is not enforced by this pgrelay build yet; "
                            "counted as if it were",
                            f"{path}:7: max_user_connections is not enforced by this pgrelay build yet; "
                            "counted as if it were"]
    # The plugin's parsed value wins when it has one.
    db = relay.plugin_data["databases"].databases["main"]
    assert reader.option("databases", "main", db, "max_db_connections") == 5 and len(reader.notes) == 2


def test_no_database_means_no_server_connection(check):
    result = check("[pgbouncer]\npool_mode = transaction\n")
    assert result.status == FITS
    assert "no server host is configured ([databases] is empty): pgrelay opens no server connection" in result.out
    assert "result: nothing to check (exit status 0)" in result.out
