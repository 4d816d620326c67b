"""Every implemented setting has a test that fails if the setting does nothing (issue 7, item 3).

ENFORCED_BY maps each implemented (non-planned) setting to the tests that prove its effect: with
the setting ignored, each listed test fails. [pgbouncer] settings go by their name; keys of other
sections as "[section] key". A setting pgrelay does not enforce belongs in the planned list
(settings.PLANNED_SETTINGS), where it is accepted with a warning; test_planned_settings_warn checks that.

To add a setting: write the test (tests/integration/test_settings_enforced.py is the usual home),
then add `"name": [node id, ...]` below. Node ids are "path::function" (or "path::Class::method"),
relative to the repository root, without parameters.
"""

from __future__ import annotations

import ast
import os

import pytest

from pgrelay.config import load_config
from pgrelay.docs import full_registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Being implemented by other engineers right now; they add their tests here and take the name out.
# A section key counts as in progress when its bare name is listed ("[poolers] max_client_conn").
IN_PROGRESS: set[str] = set()  # settings being implemented right now; empty when nothing is

SE = "tests/integration/test_settings_enforced.py"
SERVERLESS_HTTP = "tests/integration/test_serverless_http.py"
SERVERLESS_WS = "tests/integration/test_serverless_websocket.py"
OPS = "tests/integration/test_operations.py"
PARAMS = "tests/integration/test_parameters.py"
SESSION_STATE = "tests/integration/test_session_state.py"
MODES = "tests/integration/test_pooling_modes.py"
TLS = "tests/integration/test_tls.py"
AUTH = "tests/integration/test_auth.py"
AUTHQ = "tests/integration/test_auth_query.py"
OPTIONS = "tests/integration/test_connection_options.py"
CLUSTERS = "tests/integration/test_clusters.py"
POOLERS = "tests/integration/test_dedicated_poolers.py"


def se(name: str) -> str:
    return f"{SE}::{name}"


TIMEOUTS = "tests/integration/test_client_timeouts.py"
DEFER = "tests/integration/test_defer_accept.py"
QT = "tests/integration/test_query_timeouts.py"


def qt(name: str) -> str:
    return f"{QT}::{name}"


TCPOPTS = "tests/integration/test_tcp_options.py"

LIMITS = "tests/integration/test_limits.py"


def lim(name: str) -> str:
    return f"{LIMITS}::{name}"


ENFORCED_BY: dict[str, list[str]] = {
    # -- operations (issue 9): the admin console, logging, the command line, rolling restarts
    "admin_users": ["tests/integration/test_admin_console.py::test_admin_and_stats_users_and_everyone_else"],
    "stats_users": ["tests/integration/test_admin_console.py::test_admin_and_stats_users_and_everyone_else"],
    "log_format": ["tests/integration/test_logging.py::test_json_log_lines"],
    "syslog": ["tests/integration/test_logging.py::test_syslog_off_sends_nothing",
               "tests/integration/test_logging.py::test_syslog_lines_carry_ident_and_facility"],
    "syslog_ident": ["tests/integration/test_logging.py::test_syslog_lines_carry_ident_and_facility"],
    "syslog_facility": ["tests/integration/test_logging.py::test_syslog_lines_carry_ident_and_facility"],
    "user": ["tests/integration/test_command_line.py::test_user_switch_to_an_unprivileged_user"],
    "metrics_listen": ["tests/integration/test_metrics.py::test_metrics_served_only_at_metrics_path_and_stopped_at_shutdown"],
    "sentry_dsn": ["tests/plugins/test_sentry.py::test_dsn_setting_reports_with_environment_release_and_defaults",
                   "tests/plugins/test_sentry.py::test_dsn_from_sentry_dsn_environment_variable"],
    "sentry_environment": ["tests/plugins/test_sentry.py::test_dsn_setting_reports_with_environment_release_and_defaults"],
    "sentry_release": ["tests/plugins/test_sentry.py::test_dsn_setting_reports_with_environment_release_and_defaults"],
    "sentry_sample_rate": ["tests/plugins/test_sentry.py::test_sample_rate"],
    "sentry_event_window": ["tests/plugins/test_sentry.py::test_repeats_within_the_window_become_one_event_with_a_count"],
    "proxy_protocol": ["tests/integration/test_proxy_protocol.py::test_v1_and_v2_headers_give_the_real_address_to_show_clients_logs_and_application_name"],
    "proxy_protocol_trusted": ["tests/integration/test_proxy_protocol.py::test_untrusted_sender_of_a_header_is_refused_and_plain_clients_are_served"],
    "[listeners] proxy_protocol": ["tests/integration/test_proxy_protocol.py::test_listener_key_and_required_trusted_list"],
    "workers": ["tests/integration/test_workers.py::test_pool_size_and_max_db_connections_hold_for_all_workers",
                "tests/integration/test_workers.py::test_bad_workers_values_are_refused"],
    "peer_id": ["tests/integration/test_peers.py::test_cancel_through_the_other_peer_cancels_that_query_only"],
    "[peers] host": ["tests/integration/test_peers.py::test_cancel_through_the_other_peer_cancels_that_query_only"],
    "[peers] port": ["tests/integration/test_peers.py::test_cancel_through_the_other_peer_cancels_that_query_only"],
    "[peers] pool_size": ["tests/integration/test_peers.py::test_cancel_through_the_other_peer_cancels_that_query_only"],
    "so_reuseport": ["tests/integration/test_rolling_restart.py::test_rolling_restart_with_so_reuseport_loses_no_transaction"],
    # -- caps shared across pools, client caps, the reserve pool (issue 8)
    "max_db_connections": [lim("test_max_db_connections_is_shared_by_users_ports_and_poolers_and_clients_queue"),
                           lim("test_thundering_herd_never_exceeds_max_db_connections")],
    "max_user_connections": [lim("test_global_max_user_connections")],
    "max_db_client_connections": [lim("test_client_caps_refuse_with_pgbouncers_error"),
                                  lim("test_max_db_client_connections_elsewhere")],
    "max_user_client_connections": [lim("test_client_caps_refuse_with_pgbouncers_error")],
    "reserve_pool_size": [lim("test_reserve_pool_opens_after_reserve_pool_timeout_and_shrinks_back")],
    "reserve_pool_timeout": [lim("test_reserve_pool_opens_after_reserve_pool_timeout_and_shrinks_back")],
    "[databases] max_db_connections": [lim("test_database_line_cap_wins_over_the_global_one")],
    "[databases] max_db_client_connections": [lim("test_client_caps_refuse_with_pgbouncers_error")],
    "[databases] reserve_pool_size": [lim("test_reserve_pool_size_per_line")],
    "[databases] reserve_pool": [lim("test_reserve_pool_size_per_line")],
    "[clusters] max_db_connections": [lim("test_max_db_connections_on_a_cluster_line")],
    "[clusters] max_db_client_connections": [lim("test_max_db_client_connections_elsewhere")],
    "[clusters] reserve_pool_size": [lim("test_reserve_pool_size_per_line")],
    "[clusters] reserve_pool": [lim("test_reserve_pool_size_per_line")],
    "[users] max_user_connections": [lim("test_max_user_connections_spans_databases")],
    "[users] max_user_client_connections": [lim("test_client_caps_refuse_with_pgbouncers_error")],
    "[users] reserve_pool_size": [lim("test_reserve_pool_size_per_line")],
    "server_round_robin": ["tests/integration/test_server_reuse.py::test_server_round_robin"],
    "autodb_idle_timeout": ["tests/integration/test_server_reuse.py::test_autodb_idle_timeout_frees_pools_of_star_databases",
                            "tests/integration/test_server_reuse.py::test_autodb_idle_timeout_off_keeps_them"],
    "server_check_query": ["tests/integration/test_server_check.py::test_idle_server_is_checked_before_its_next_client",
                           "tests/integration/test_server_check.py::test_failing_check_replaces_the_server_and_the_client_never_sees_it",
                           "tests/integration/test_server_check.py::test_no_check_within_the_delay_or_when_disabled"],
    "server_check_delay": ["tests/integration/test_server_check.py::test_idle_server_is_checked_before_its_next_client",
                           "tests/integration/test_server_check.py::test_no_check_within_the_delay_or_when_disabled"],
    # -- client timeouts and limits
    "client_idle_timeout": [f"{TIMEOUTS}::test_client_idle_timeout_closes_an_idle_client",
                            f"{TIMEOUTS}::test_client_idle_timeout_off_keeps_idle_clients"],
    "idle_transaction_timeout": [f"{TIMEOUTS}::test_idle_transaction_timeout_closes_the_client_and_frees_its_locks",
                                 f"{TIMEOUTS}::test_idle_transaction_timeout_off_by_default"],
    "server_drain_timeout": [f"{TIMEOUTS}::test_server_drain_timeout_closes_a_server_that_takes_too_long",
                             f"{TIMEOUTS}::test_drained_server_is_reused_once_its_replies_are_in"],
    "server_rollback_timeout": [
        f"tests/integration/test_abandoned_transactions.py::{name}" for name in (
            "test_rollback_that_hangs_closes_the_server_after_server_rollback_timeout",
            "test_server_rollback_timeout_0_closes_as_before", "test_killed_client_holding_a_row_lock",
            "test_reconnect_storm_costs_no_server_logins", "test_server_rollback_timeout_is_reloadable")],
    # -- query and transaction timeouts, the queue notice, unused pools; per-user and per-database values
    "query_timeout": [qt("test_query_timeout_closes_a_long_query_and_spares_fast_work"),
                      qt("test_queued_client_past_query_timeout_and_user_value_beating_the_global")],
    "transaction_timeout": [qt("test_transaction_timeout_closes_a_long_transaction_and_spares_short_ones")],
    "query_wait_notify": [qt("test_query_wait_notify_reaches_a_queued_client_once"),
                          qt("test_query_wait_timeout_of_the_database_the_cluster_and_the_user")],
    "pool_idle_timeout": [qt("test_pool_idle_timeout_frees_a_pool_without_clients_or_servers")],
    "[users] query_timeout": [qt("test_user_values_apply_with_the_global_timeouts_off"),
                              qt("test_queued_client_past_query_timeout_and_user_value_beating_the_global")],
    "[users] transaction_timeout": [qt("test_user_values_apply_with_the_global_timeouts_off")],
    "[users] idle_transaction_timeout": [qt("test_user_values_apply_with_the_global_timeouts_off")],
    "[users] client_idle_timeout": [qt("test_user_values_apply_with_the_global_timeouts_off")],
    "[users] query_wait_timeout": [qt("test_query_wait_timeout_of_the_database_the_cluster_and_the_user")],
    "[databases] query_wait_timeout": [qt("test_query_wait_timeout_of_the_database_the_cluster_and_the_user")],
    "[clusters] query_wait_timeout": [qt("test_query_wait_timeout_of_the_database_the_cluster_and_the_user")],
    "[databases] server_lifetime": [qt("test_server_lifetime_of_the_database_and_the_cluster")],
    "[clusters] server_lifetime": [qt("test_server_lifetime_of_the_database_and_the_cluster")],
    "tcp_defer_accept": [f"{DEFER}::test_silent_sockets_do_not_lock_out_a_real_client",
                         "tests/unit/test_defer_accept.py::test_set_on_tcp_listeners_when_on",
                         "tests/unit/test_defer_accept.py::test_not_set_when_off"],
    # -- TCP options of client and server sockets, the login notice (issue 8)
    "tcp_keepalive": [f"{TCPOPTS}::test_tcp_keepalive_is_on_by_default_with_the_os_timing",
                      f"{TCPOPTS}::test_tcp_keepalive_off_also_ignores_the_timing_settings"],
    "tcp_keepidle": [f"{TCPOPTS}::test_keepalive_timing_user_timeout_and_buffers_on_both_sides",
                     f"{TCPOPTS}::test_each_timing_setting_alone",
                     f"{TCPOPTS}::test_reload_applies_to_new_connections_only"],
    "tcp_keepintvl": [f"{TCPOPTS}::test_keepalive_timing_user_timeout_and_buffers_on_both_sides",
                      f"{TCPOPTS}::test_each_timing_setting_alone"],
    "tcp_keepcnt": [f"{TCPOPTS}::test_keepalive_timing_user_timeout_and_buffers_on_both_sides",
                    f"{TCPOPTS}::test_each_timing_setting_alone"],
    "tcp_user_timeout": [f"{TCPOPTS}::test_keepalive_timing_user_timeout_and_buffers_on_both_sides",
                         f"{TCPOPTS}::test_each_timing_setting_alone",
                         f"{TCPOPTS}::test_reload_applies_to_new_connections_only"],
    "tcp_socket_buffer": [f"{TCPOPTS}::test_keepalive_timing_user_timeout_and_buffers_on_both_sides"],
    "login_notify_message": [f"{TCPOPTS}::test_login_notify_message_follows_authentication_ok",
                             f"{TCPOPTS}::test_psql_and_psycopg2_show_the_login_notice",
                             f"{TCPOPTS}::test_reload_changes_the_login_notice_for_new_logins"],
    "max_client_conn": [f"{DEFER}::test_max_client_conn_counts_clients_that_sent_a_startup_message",
                        "tests/integration/test_bad_input.py::test_max_client_conn"],
    "[poolers] max_client_conn": [f"{POOLERS}::test_pooler_max_client_conn_is_its_own"],
    # -- process and logging
    "logfile": [f"{OPS}::test_logfile_pidfile_and_stats_lines"],
    "pidfile": [f"{OPS}::test_logfile_pidfile_and_stats_lines"],
    "verbose": [se("test_verbose_logs_debug_lines")],
    "log_connections": [f"{OPS}::test_log_connections_and_disconnections_can_be_switched_off"],
    "log_disconnections": [f"{OPS}::test_log_connections_and_disconnections_can_be_switched_off"],
    "log_pooler_errors": [se("test_log_pooler_errors_off_keeps_refusals_out_of_the_log")],
    "log_stats": [se("test_log_stats_off_silences_stats_lines")],
    "stats_period": [f"{OPS}::test_logfile_pidfile_and_stats_lines"],
    # -- listening
    "listen_addr": [se("test_listen_addr_and_listener_addr")],
    "listen_port": ["tests/integration/test_smoke.py::test_psycopg2_query_through_relay"],
    "listen_backlog": [se("test_listen_backlog_reaches_listen")],
    "unix_socket_dir": [se("test_unix_socket_dir")],
    "unix_socket_mode": [se("test_unix_socket_mode")],
    "client_login_timeout": [se("test_client_login_timeout"),
                             f"{TLS}::test_stalled_tls_handshake_hits_client_login_timeout"],
    # -- pooling
    "pool_mode": [f"{MODES}::test_statement_mode_single_statements_work_and_begin_is_refused"],
    "default_pool_size": [f"{MODES}::test_thirty_waiting_clients_on_two_servers_lose_nothing"],
    "min_pool_size": [se("test_min_pool_size")],
    "server_reset_query": [se("test_server_reset_query"),
                           f"{MODES}::test_session_mode_keeps_one_server_and_resets_it_for_the_next_client",
                           f"{SESSION_STATE}::test_tracked_statement_timeout_never_stale_on_reused_servers"],
    "server_reset_query_always": [f"{MODES}::test_transaction_mode_server_reset_query_only_with_reset_always"],
    "server_lifetime": [se("test_server_lifetime")],
    "server_idle_timeout": [se("test_server_idle_timeout")],
    "server_connect_timeout": ["tests/integration/test_faults.py::test_server_connect_timeout"],
    "server_login_retry": [se("test_server_login_retry")],
    "query_wait_timeout": [se("test_query_wait_timeout")],
    "cancel_wait_timeout": [se("test_cancel_wait_timeout")],
    "max_packet_size": [se("test_max_packet_size")],
    # -- startup parameters
    "ignore_startup_parameters": ["tests/integration/test_bad_input.py::test_ignored_startup_parameter_accepted",
                                  f"{SESSION_STATE}::test_ignore_startup_parameters_still_drops",
                                  f"{PARAMS}::test_untracked_startup_parameter_is_applied"],
    "track_extra_parameters": [se("test_track_extra_parameters_adds_a_parameter"),
                               f"{PARAMS}::test_untracked_startup_parameter_is_applied",
                               f"{SESSION_STATE}::test_tracked_statement_timeout_never_stale_on_reused_servers"],
    "session_state": [f"{SESSION_STATE}::{name}" for name in (
        "test_pin_keeps_the_state_working_and_ends_when_cleared", "test_error_refuses_and_leaves_the_server_clean",
        "test_allow_is_pgbouncers_unsafe_behaviour", "test_session_state_setting_is_reloadable")],
    "max_prepared_statements": [f"tests/integration/test_prepared_statements.py::{name}" for name in (
        "test_bind_to_a_statement_evicted_from_the_server", "test_ten_thousand_distinct_statements_from_one_client",
        "test_client_map_is_bounded", "test_max_prepared_statements_zero_is_off",
        "test_same_text_is_parsed_once_per_server", "test_psycopg3_default_prepare_threshold_50_clients")],
    "notify_queue_size": [
        "tests/integration/test_listen_notify.py::test_client_that_stops_reading_is_disconnected_and_memory_stays_bounded"],
    "application_name_add_host": [f"{PARAMS}::test_application_name_add_host"],
    # -- TLS
    "client_tls_sslmode": [f"{TLS}::test_client_tls_require_refuses_plaintext",
                           f"{TLS}::test_client_tls_disable_answers_no"],
    "client_tls_cert_file": [f"{TLS}::test_reload_rotates_client_certificate"],
    "client_tls_key_file": [f"{TLS}::test_reload_rotates_client_certificate"],
    "client_tls_ca_file": [f"{TLS}::test_client_certificate_required"],
    "client_tls_protocols": [f"{TLS}::test_client_tls_protocols_tlsv13_only"],
    "client_tls_ciphers": [se("test_client_tls_ciphers")],
    "server_tls_sslmode": [f"{TLS}::test_server_tls_disable_gets_pg_hba_refusal",
                           f"{TLS}::test_server_tls_require_against_server_without_ssl"],
    "server_tls_ca_file": [f"{TLS}::test_server_tls_verify_full_wrong_ca"],
    "server_tls_cert_file": [se("test_server_tls_cert_and_key_file")],
    "server_tls_key_file": [se("test_server_tls_cert_and_key_file")],
    "server_tls_protocols": [se("test_server_tls_protocols")],
    "server_tls_ciphers": [se("test_server_tls_ciphers")],
    "scram_iterations": [se("test_scram_iterations")],
    # -- server health
    "health_check_period": [se("test_health_check_period")],
    "health_check_timeout": [se("test_health_check_timeout")],
    "health_check_user": [se("test_health_check_user_and_dbname")],
    "health_check_dbname": [se("test_health_check_user_and_dbname")],
    # -- plugins
    "plugins": ["tests/unit/test_plugins.py::test_extra_plugin_from_file_wins_over_local_pooler"],
    "disable_plugins": ["tests/unit/test_plugins.py::test_disabled_plugins_not_loaded"],
    # -- declared by plugins (plugins/*.py)
    "max_direct_connections": [f"{OPTIONS}::test_max_direct_connections"],
    "replica_balance": [f"{CLUSTERS}::test_replica_balancing"],
    "max_replica_lag": [se("test_max_replica_lag")],
    "replica_fallback_to_primary": [f"{CLUSTERS}::test_replica_stopped_and_restarted"],
    "cluster_usernames": [f"{CLUSTERS}::test_cluster_user_names_route_to_the_cluster"],
    "auth_type": [f"{AUTH}::test_password_auth_types_with_real_clients"],
    "auth_file": [f"{AUTH}::test_trust_asks_no_password_but_needs_auth_file_entry"],
    "auth_hba_file": [f"{AUTH}::test_hba_mixes_methods_by_user_database_and_address"],
    "auth_user": [f"{AUTHQ}::test_auth_query_looks_up_users_missing_from_auth_file"],
    "auth_query": [se("test_auth_query_is_the_query_that_runs")],
    "auth_dbname": [f"{AUTHQ}::test_auth_dbname_runs_auth_query_in_that_database"],
    "local_pooler_replicas": [f"{OPTIONS}::test_local_pooler_replicas_setting"],
    # -- [listeners]
    "[listeners] port": [f"{OPTIONS}::test_direct_clients_have_their_own_backends"],
    "[listeners] addr": [se("test_listen_addr_and_listener_addr")],
    "[listeners] role": [f"{OPTIONS}::test_direct_clients_have_their_own_backends"],
    "[listeners] pool_mode": [f"{OPTIONS}::test_session_port_next_to_transaction_port"],
    "[listeners] suffixes": [f"{OPTIONS}::test_bad_user_names"],
    "[listeners] tls_cert_file": [f"{SERVERLESS_WS}::test_wss_with_the_listeners_own_certificate"],
    "[listeners] tls_key_file": [f"{SERVERLESS_WS}::test_wss_with_the_listeners_own_certificate"],
    # -- the serverless endpoint
    "serverless_max_request_size": [f"{SERVERLESS_HTTP}::test_body_over_the_request_limit_gets_413"],
    "serverless_max_response_size": [f"{SERVERLESS_HTTP}::test_huge_response_gets_507_and_the_server_comes_back_clean"],
    "serverless_request_timeout": [f"{SERVERLESS_HTTP}::test_slow_headers_are_cut_off"],
    "serverless_idle_timeout":
        [f"{SERVERLESS_HTTP}::test_idle_keep_alive_connection_is_closed_after_serverless_idle_timeout"],
    # -- [poolers]
    "[poolers] target": [f"{POOLERS}::test_replica_pooler_reaches_the_replica"],
    "[poolers] pool_mode": [f"{POOLERS}::test_primary_pooler_in_session_mode_with_two_servers"],
    "[poolers] default_pool_size": [f"{POOLERS}::test_primary_pooler_in_session_mode_with_two_servers",
                                    f"{POOLERS}::test_saturated_pooler_does_not_slow_the_local_pooler"],
    "[poolers] min_pool_size": [se("test_pooler_min_pool_size")],
    "[poolers] max_db_connections": [se("test_pooler_max_db_connections")],
    "[poolers] max_user_connections": [se("test_pooler_max_user_connections")],
    "[poolers] upstream": [
        "tests/integration/test_layered.py::test_dedicated_pooler_chained_through_server_side_relay"],
    # -- [databases]
    "[databases] host": [se("test_database_host_port_dbname_user")],
    "[databases] port": [se("test_database_host_port_dbname_user")],
    "[databases] dbname": [se("test_database_host_port_dbname_user")],
    "[databases] user": [se("test_database_host_port_dbname_user")],
    "[databases] password": [se("test_database_and_cluster_password"),
                             f"{AUTH}::test_any_ignores_the_user_and_uses_the_forced_server_user"],
    "[databases] pool_size": [se("test_database_pool_size")],
    "[databases] min_pool_size": [se("test_database_min_pool_size")],
    "[databases] pool_mode": [f"{MODES}::test_pool_mode_per_database_and_per_user"],
    "[databases] connect_query": [se("test_database_connect_query")],
    "[databases] client_encoding": [se("test_database_startup_parameters")],
    "[databases] datestyle": [se("test_database_startup_parameters")],
    "[databases] timezone": [se("test_database_startup_parameters")],
    "[databases] application_name": [se("test_database_startup_parameters")],
    "[databases] replicas": [f"{OPTIONS}::test_direct_replica_suffix"],
    # -- [users]
    "[users] pool_mode": [f"{MODES}::test_pool_mode_per_database_and_per_user"],
    "[users] pool_size": [se("test_users_pool_size")],
    # -- [clusters]
    "[clusters] host": [f"{CLUSTERS}::test_cluster_user_names_route_to_the_cluster"],
    "[clusters] port": [f"{CLUSTERS}::test_cluster_user_names_route_to_the_cluster"],
    "[clusters] user": [f"{CLUSTERS}::test_hundred_clusters"],
    "[clusters] replicas": [f"{CLUSTERS}::test_cluster_user_names_route_to_the_cluster"],
    "[clusters] password": [se("test_database_and_cluster_password")],
    "[clusters] pool_size": [se("test_cluster_keys")],
    "[clusters] min_pool_size": [se("test_cluster_keys")],
    "[clusters] pool_mode": [se("test_cluster_keys")],
    "[clusters] connect_query": [se("test_cluster_keys")],
    "[clusters] client_encoding": [se("test_cluster_keys")],
    "[clusters] datestyle": [se("test_cluster_keys")],
    "[clusters] timezone": [se("test_cluster_keys")],
    "[clusters] application_name": [se("test_cluster_keys")],
}


def implemented_settings() -> set[str]:
    """Every non-planned setting the core and the installed plugins declare."""
    registry = full_registry()
    names = {s.name for s in registry if not s.planned}
    for section, keys in registry.section_keys.items():
        names |= {f"[{section}] {name}" for name, s in keys.items() if not s.planned}
    return names


def in_progress(name: str) -> bool:
    return name.split()[-1] in IN_PROGRESS


def test_every_implemented_setting_has_an_enforcing_test():
    missing = sorted(n for n in implemented_settings() - set(ENFORCED_BY) if not in_progress(n))
    assert not missing, ("implemented settings without a test proving their effect (add one to ENFORCED_BY, "
                         f"or move the setting to the planned list): {missing}")


def test_table_names_only_implemented_settings():
    implemented = implemented_settings()
    stale = sorted(n for n in ENFORCED_BY if n not in implemented)
    assert not stale, f"ENFORCED_BY lists settings that are planned or no longer declared: {stale}"
    done = sorted(n for n in ENFORCED_BY if in_progress(n))
    assert not done, f"these have tests in ENFORCED_BY now: take them out of IN_PROGRESS: {done}"
    assert all(ENFORCED_BY.values()), "a setting with an empty list of tests"


def _functions(path: str) -> tuple[set[str], dict[str, list[ast.expr]]]:
    """'func' and 'Class::method' names defined in a test file, and their decorators."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found: dict[str, list[ast.expr]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = node.decorator_list
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[f"{node.name}::{item.name}"] = node.decorator_list + item.decorator_list
    return set(found), found


def _marks(decorators: list[ast.expr]) -> set[str]:
    out = set()
    for dec in decorators:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Attribute):
            out.add(target.attr)
    return out


ALL_NODE_IDS = sorted({node for nodes in ENFORCED_BY.values() for node in nodes})


@pytest.mark.parametrize("node_id", ALL_NODE_IDS)
def test_node_id_exists_and_runs(node_id):
    path, sep, name = node_id.partition("::")
    assert sep and name and "[" not in name, f"{node_id}: expected path::function without parameters"
    assert os.path.isfile(os.path.join(ROOT, path)), f"{node_id}: no such file"
    names, decorators = _functions(path)
    assert name in names, f"{node_id}: no such test function in {path}"
    assert name.split("::")[-1].startswith("test_"), f"{node_id}: not a test function"
    assert not _marks(decorators[name]) & {"skip", "skipif", "xfail"}, \
        f"{node_id}: a skipped or xfail test proves nothing"


def test_planned_settings_warn(tmp_path):
    """The other half of the rule: a setting pgrelay does not enforce is planned, and setting it warns."""
    registry = full_registry()
    planned = sorted(s.name for s in registry if s.planned)
    assert planned, "no planned settings?"
    path = tmp_path / "planned.ini"
    path.write_text("[pgbouncer]\n" + "".join(f"{s.name} = {s.default}\n" for s in registry if s.planned))
    config = load_config(registry, str(path), env={})
    silent = [name for name in planned if not any(f"setting '{name}' is not implemented" in w for w in config.warnings)]
    assert not silent, f"planned settings accepted without a warning: {silent}"
