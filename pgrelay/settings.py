"""Settings as declared data: each has a name, type, default, reloadability and one line of doc.

The README reference, `pgrelay --help` and config validation are all derived from these
declarations. Plugins add their own through the `pgrelay_add_settings` hook.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


class SettingType:
    """How a setting's text is parsed; `name` is shown in docs."""

    name = "str"

    def parse(self, text: str) -> Any:
        return text.strip()


class Str(SettingType):
    pass


class Int(SettingType):
    name = "int"

    def __init__(self, minimum: int | None = 0, base: int = 10, maximum: int | None = None):
        self.minimum = minimum
        self.maximum = maximum
        self.base = base
        if base == 8:
            self.name = "octal"

    def parse(self, text: str) -> int:
        text = text.strip()
        try:
            value = int(text, self.base)
        except ValueError:
            raise ValueError(f"invalid integer {text!r}") from None
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{value} is below the minimum {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{value} is above the maximum {self.maximum}")
        return value


class Bool(SettingType):
    name = "bool"
    TRUE = {"1", "yes", "on", "true"}
    FALSE = {"0", "no", "off", "false"}

    def parse(self, text: str) -> bool:
        word = text.strip().lower()
        if word in self.TRUE:
            return True
        if word in self.FALSE:
            return False
        raise ValueError(f"invalid boolean {text!r} (use 0/1, yes/no, on/off, true/false)")


class Seconds(SettingType):
    """Seconds as a number, optionally with a unit: 500ms, 30s, 5min, 1h, 1d."""

    name = "seconds"
    UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "min": 60.0, "h": 3600.0, "d": 86400.0}

    def parse(self, text: str) -> float:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-z]*)\s*", text.lower())
        if not match or match.group(2) not in self.UNITS:
            raise ValueError(f"invalid duration {text!r}")
        return float(match.group(1)) * self.UNITS[match.group(2)]


class Enum(SettingType):
    def __init__(self, *choices: str):
        self.choices = choices
        self.name = "|".join(choices)

    def parse(self, text: str) -> str:
        word = text.strip().lower()
        if word not in self.choices:
            raise ValueError(f"invalid value {text!r}: expected one of {', '.join(self.choices)}")
        return word


class List(SettingType):
    """Comma-separated words, parsed into a tuple; empty text is an empty tuple."""

    name = "list"

    def parse(self, text: str) -> tuple[str, ...]:
        return tuple(word.strip() for word in text.split(",") if word.strip())


class Networks(List):
    """Comma-separated IP addresses or CIDRs (10.0.0.0/8, ::1), checked; parsed into a tuple of words."""

    name = "list of addresses/CIDRs"

    def parse(self, text: str) -> tuple[str, ...]:
        from .proxy_protocol import check_trusted
        words = super().parse(text)
        check_trusted(words)
        return words


class Workers(SettingType):
    """A number of worker processes (1 to 64), or `auto`: one per CPU core the process may use."""

    name = "int|auto"
    MAXIMUM = 64

    def parse(self, text: str) -> int:
        import os
        word = text.strip().lower()
        if word == "auto":
            return max(1, min(self.MAXIMUM, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else os.cpu_count() or 1))
        try:
            value = int(word)
        except ValueError:
            raise ValueError(f"invalid value {text!r}: expected a number of processes or auto") from None
        if not 1 <= value <= self.MAXIMUM:
            raise ValueError(f"{value} is out of range (1 to {self.MAXIMUM}, or auto)")
        return value


STR, BOOL, SECONDS, LIST = Str(), Bool(), Seconds(), List()
INT = Int()
POOL_MODE = Enum("session", "transaction", "statement")
TLS_MODE = Enum("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class Setting:
    """One declared setting. `planned` marks a PgBouncer key pgrelay accepts but ignores, with a warning."""

    name: str
    type: SettingType
    default: str
    reload: bool
    doc: str
    planned: bool = False
    section: str = "pgbouncer"

    def parse(self, text: str) -> Any:
        return self.type.parse(text)

    @property
    def default_value(self) -> Any:
        return self.type.parse(self.default)


@dataclass
class SettingsRegistry:
    """The settings and config sections one relay knows; plugins add theirs in pgrelay_add_settings."""

    settings: dict[str, Setting] = field(default_factory=dict)
    sections: dict[str, str] = field(default_factory=dict)
    section_keys: dict[str, dict[str, Setting]] = field(default_factory=dict)

    def add(self, setting: Setting) -> None:
        if setting.section == "pgbouncer":
            if setting.name in self.settings and not self.settings[setting.name].planned:
                raise ValueError(f"setting {setting.name!r} is declared twice")
            self.settings[setting.name] = setting
        else:
            self.section_keys.setdefault(setting.section, {})[setting.name] = setting

    def add_section(self, name: str, doc: str) -> None:
        """Claim an INI section such as [databases]; its lines reach plugins unparsed."""
        self.sections[name] = doc

    def __iter__(self):
        return iter(self.settings.values())


def S(name: str, type_: SettingType, default: str, reload: bool, doc: str, **kw) -> Setting:
    return Setting(name, type_, default, reload, doc, **kw)


def planned(name: str, type_: SettingType, default: str, doc: str, reload: bool = True) -> Setting:
    return Setting(name, type_, default, reload, doc, planned=True)


# The core's settings: what this build implements, PgBouncer names and defaults.
CORE_SETTINGS: list[Setting] = [
    # Process and logging
    S("logfile", STR, "", True, "Also write the log to this file (stderr gets it too, unless -q or -d)."),
    S("pidfile", STR, "", False, "Write the process id to this file; removed on exit. Required by -d."),
    S("verbose", INT, "0", True, "Log verbosity: 0 normal; 1 or more adds debug lines (e.g. each server "
      "connection launched). Each -v on the command line raises it by one."),
    S("log_connections", BOOL, "1", True, "Log successful logins."),
    S("log_disconnections", BOOL, "1", True, "Log disconnections, with their reason."),
    S("log_pooler_errors", BOOL, "1", True, "Log the error messages pgrelay sends to clients."),
    S("log_stats", BOOL, "1", True, "Log aggregated statistics every stats_period."),
    S("stats_period", INT, "60", True, "Seconds between statistics log lines and stats hook calls."),
    S("log_format", Enum("text", "json"), "text", True,
      "text: PgBouncer's log lines; json: one JSON object per line (time, level, pid, message, and the "
      "client, server, db, user and addr of the connection a line is about) for log shippers."),
    S("syslog", BOOL, "0", True, "Also send the log to syslog (the /dev/log socket)."),
    S("syslog_ident", STR, "pgbouncer", True, "Program name the syslog lines carry."),
    S("syslog_facility", Enum("auth", "authpriv", "daemon", "user", *(f"local{i}" for i in range(8))), "daemon",
      True, "Syslog facility: auth, authpriv, daemon, user or local0 to local7."),
    S("user", STR, "", False,
      "Unix user to switch to once the listening sockets are bound (pgrelay must start as root); "
      "-u/--user USER on the command line overrides it."),
    # Listening
    S("listen_addr", LIST, "localhost", False,
      "TCP addresses to listen on, comma-separated; * means all. Empty: Unix socket only."),
    S("listen_port", Int(1), "6432", False, "TCP port, also used in the Unix socket name."),
    S("listen_backlog", Int(1), "128", False, "Backlog argument for listen()."),
    S("unix_socket_dir", STR, "/tmp", False, "Directory of the Unix socket .s.PGSQL.<port>; empty disables it."),
    S("unix_socket_mode", Int(0, base=8), "0777", False, "File mode of the Unix socket."),
    S("max_client_conn", Int(1), "100", True, "Most client connections accepted; more get an error after their StartupMessage. "
      "Connections that have not sent one yet do not count."),
    S("tcp_defer_accept", BOOL, "1", False,
      "TCP_DEFER_ACCEPT on the TCP listening sockets, 45 seconds as in PgBouncer: the kernel hands a connection "
      "to pgrelay only once the client has sent data (or the 45 s are over). Linux only; ignored elsewhere."),
    S("so_reuseport", BOOL, "0", False,
      "SO_REUSEPORT on the TCP listening sockets: several pgrelay processes may listen on the same port and the "
      "kernel spreads new connections over them (rolling restarts, using more cores). Give each process its own "
      "unix_socket_dir (or none). Linux and the BSDs; an error where the OS lacks it."),
    S("workers", Workers(), "1", False,
      "Worker processes serving the same listening sockets (auto: one per core), supervised by a parent that "
      "restarts a dead one; limits, cancel requests and the admin console span all of them (pgrelay.workers)."),
    S("proxy_protocol", BOOL, "0", False,
      "Accept the HAProxy PROXY protocol (v1 and v2) on the TCP listeners ([listeners] lines may set their own "
      "proxy_protocol=): a connection from a proxy_protocol_trusted address must begin with a PROXY header, whose "
      "client address then stands for the connection's (auth_hba_file, logs, SHOW CLIENTS, "
      "application_name_add_host, plugins); from any other address a PROXY header is refused."),
    S("proxy_protocol_trusted", Networks(), "", True,
      "Addresses or CIDRs (comma-separated) of the proxies allowed to send a PROXY header; empty: nobody, so "
      "proxy_protocol needs it set."),
    # TCP options of every client and server TCP socket (never Unix sockets), set when the socket is
    # opened: a reload applies to new connections.
    S("tcp_keepalive", BOOL, "1", True,
      "SO_KEEPALIVE on client and server TCP sockets (never Unix sockets), with the OS's probe timing unless "
      "tcp_keepidle, tcp_keepintvl or tcp_keepcnt set it (Linux: 7200 s idle, 75 s apart, 9 probes); 0 turns "
      "keepalive off. These TCP options are set as a socket opens, so a reload applies to new connections; "
      "a value the kernel refuses is logged once and left unset."),
    S("tcp_keepidle", INT, "0", True,
      "TCP_KEEPIDLE: seconds a connection is idle before the first keepalive probe (Linux: at most 32767); "
      "0: the OS default."),
    S("tcp_keepintvl", INT, "0", True,
      "TCP_KEEPINTVL: seconds between keepalive probes (Linux: at most 32767); 0: the OS default."),
    S("tcp_keepcnt", INT, "0", True,
      "TCP_KEEPCNT: unanswered keepalive probes after which the connection is dropped (Linux: at most 127); "
      "0: the OS default."),
    S("tcp_user_timeout", INT, "0", True,
      "TCP_USER_TIMEOUT in milliseconds: how long sent data may stay unacknowledged before the connection "
      "is dropped; 0: the OS default. Linux only."),
    S("tcp_socket_buffer", INT, "0", True,
      "SO_SNDBUF and SO_RCVBUF in bytes (Linux doubles the value and caps it at net.core.wmem_max/rmem_max); "
      "0: the OS default, auto-tuned."),
    S("client_login_timeout", SECONDS, "60", True, "Disconnect a client that has not logged in within this time; 0 disables."),
    # Pooling
    S("pool_mode", POOL_MODE, "session", True,
      "When a server is released: session (client disconnect), transaction (end of transaction), statement (end of statement)."),
    S("default_pool_size", INT, "20", True, "Server connections per (database, user) pool; 0 means unlimited."),
    S("min_pool_size", INT, "0", True, "Keep at least this many server connections open per pool."),
    S("server_reset_query", STR, "DISCARD ALL", True, "Query run on a server released in session mode; empty disables."),
    S("server_reset_query_always", BOOL, "0", True, "Run server_reset_query in every pooling mode."),
    S("server_check_query", STR, "select 1", True,
      "Query a server idle longer than server_check_delay must pass before its next client; empty disables."),
    S("server_check_delay", SECONDS, "30", True, "Idle time after which a server is checked before reuse."),
    S("autodb_idle_timeout", SECONDS, "3600", True,
      "Free the pools (and idle servers) of a database made from the * fallback once unused this long; 0 disables."),
    S("server_round_robin", BOOL, "0", True,
      "Hand out idle servers oldest first (spreads load over hosts behind one address) instead of LIFO."),
    S("server_lifetime", SECONDS, "3600", True, "Close a server connection older than this when it is released; 0 disables."),
    S("server_idle_timeout", SECONDS, "600", True, "Close a server connection idle longer than this; 0 disables."),
    S("server_connect_timeout", SECONDS, "15", True, "Give up on a server connect plus login after this long."),
    S("server_login_retry", SECONDS, "15", True, "After a failed server login, wait this long before retrying; clients get the cached error."),
    S("query_wait_timeout", SECONDS, "120", True, "Disconnect a client that waited this long for a server; 0 disables."),
    S("reserve_pool_size", INT, "0", True,
      "Extra servers a pool may open once a client has waited reserve_pool_timeout; 0 disables."),
    S("reserve_pool_timeout", SECONDS, "5", True, "How long a client waits before the reserve pool is used."),
    # Caps shared by every pool of a database or user (ports, poolers, clusters, direct connections)
    S("max_db_connections", INT, "0", True,
      "Most server connections per database across all its pools; past it clients queue. 0: no limit."),
    S("max_user_connections", INT, "0", True,
      "Most server connections per server user across all its pools; past it clients queue. 0: no limit."),
    S("max_db_client_connections", INT, "0", True, "Most client connections per database; 0: no limit."),
    S("max_user_client_connections", INT, "0", True, "Most client connections per user; 0: no limit."),
    S("client_idle_timeout", SECONDS, "0", True, "Close a client connection idle (no server) longer than this; 0 disables."),
    S("idle_transaction_timeout", SECONDS, "0", True, "Disconnect a client idle in a transaction longer than this; 0 disables."),
    S("query_timeout", SECONDS, "0", True, "Close the server and the client (\"query timeout\") once a query, or a transaction, "
      "has gone this long since the client's last request; a queued client gets \"query_timeout\". 0 disables."),
    S("transaction_timeout", SECONDS, "0", True,
      "Close the server and the client (\"transaction timeout\") of a transaction open longer than this; 0 disables."),
    S("query_wait_notify", SECONDS, "5", True,
      "Send one NOTICE to a client queued longer than this for a server; 0 disables."),
    S("pool_idle_timeout", SECONDS, "0", True,
      "Free a pool that has had no clients and no servers for this long (its statistics go too); 0 disables."),
    S("cancel_wait_timeout", SECONDS, "10", True, "Give up forwarding a cancel request after this long."),
    S("peer_id", Int(0, maximum=16383), "0", False,
      "This process's id among its [peers] (1 to 16383), written into every cancel key it gives out so that a "
      "peer receiving the CancelRequest forwards it here; 0: no peering."),
    S("server_drain_timeout", SECONDS, "30", True,
      "A client left (e.g. Query + Terminate) while its server still owed replies: the queries run and "
      "the replies are dropped for up to this long, then the server is reused if idle, else closed; 0: no limit."),
    S("server_rollback_timeout", SECONDS, "5", True,
      "A client left inside a transaction (closed, killed, Terminate or a timeout) or with queries or a batch "
      "unfinished: its server drains them, runs ROLLBACK and is reused if that finishes within this long, "
      "else it is closed; 0: closed at once, as PgBouncer does."),
    S("max_packet_size", Int(4), "2147483647", True, "Largest message a client may send; longer ones are a protocol violation."),
    S("max_prepared_statements", Int(0), "200", True, "Named protocol-level prepared statements kept per server in "
      "transaction and statement pooling (LRU; 0: off, named statements pass through as in PgBouncer < 1.21)."),
    S("notify_queue_size", Int(16384), "1048576", True,
      "Transaction and statement pooling: bytes of LISTEN notifications pgrelay holds for one client (queued while "
      "its server owes replies, or unsent because it does not read); a client past it is disconnected."),
    # Startup parameters
    S("ignore_startup_parameters", LIST, "", True, "Startup parameters accepted and dropped instead of refused."),
    S("track_extra_parameters", LIST, "IntervalStyle", False,
      "Server-reported parameters tracked per client and re-applied, beyond the built-in five."),
    S("session_state", Enum("pin", "error", "allow"), "pin", True,
      "Transaction and statement pooling: session state that cannot follow a client to another server (SQL "
      "PREPARE, LISTEN, temporary tables, session advisory locks, WITH HOLD cursors, SET ROLE): pin keeps the "
      "client on its server until the state is gone; error undoes it and answers 0A000; allow ignores it (unsafe)."),
    S("application_name_add_host", BOOL, "0", True, "Append ' - host:port' of the client to its application_name."),
    S("login_notify_message", STR, "", True,
      "A NOTICE sent to every client right after AuthenticationOk at login, e.g. to tell users they reach "
      "a pooler; empty: none."),
    # TLS
    S("client_tls_sslmode", TLS_MODE, "disable", True,
      "TLS towards clients: disable, allow/prefer (accept TLS), require (refuse plaintext), "
      "verify-ca/verify-full (also require a client certificate signed by client_tls_ca_file)."),
    S("client_tls_cert_file", STR, "", True, "Certificate pgrelay presents to clients (PEM)."),
    S("client_tls_key_file", STR, "", True, "Private key of client_tls_cert_file (PEM)."),
    S("client_tls_ca_file", STR, "", True, "CA certificates that sign client certificates (PEM)."),
    S("client_tls_protocols", STR, "secure", True,
      "TLS versions accepted from clients: secure (TLS 1.2 and 1.3), all, or a list such as tlsv1.3."),
    S("client_tls_ciphers", STR, "default", True, "OpenSSL cipher list for clients (TLS 1.2 and below)."),
    S("server_tls_sslmode", TLS_MODE, "prefer", True,
      "TLS towards servers: disable, allow/prefer (use TLS if offered), require, verify-ca, verify-full."),
    S("server_tls_ca_file", STR, "", True, "CA certificates that sign server certificates (PEM); "
      "empty means the system's store for verify-ca/verify-full."),
    S("server_tls_cert_file", STR, "", True, "Client certificate pgrelay presents to servers (PEM)."),
    S("server_tls_key_file", STR, "", True, "Private key of server_tls_cert_file (PEM)."),
    S("server_tls_protocols", STR, "secure", True, "TLS versions used towards servers (as client_tls_protocols)."),
    S("server_tls_ciphers", STR, "default", True, "OpenSSL cipher list for servers (TLS 1.2 and below)."),
    S("scram_iterations", Int(1), "4096", True,
      "PBKDF2 iterations for SCRAM verifiers pgrelay derives from plaintext auth_file passwords."),
    # Server health (hosts of multi-host databases and replicas)
    S("health_check_period", SECONDS, "2", True,
      "Seconds between health checks of hosts that have several roles to choose from (primary, replicas)."),
    S("health_check_timeout", SECONDS, "3", True, "A host that does not answer a health check within this is down."),
    S("health_check_user", STR, "postgres", True,
      "User for health checks (pg_is_in_recovery(), replication lag); its password comes from auth_file."),
    S("health_check_dbname", STR, "postgres", True, "Database health checks connect to."),
    # Plugins
    S("plugins", LIST, "", False, "Extra plugin modules or .py files to load after the installed ones."),
    S("disable_plugins", LIST, "", False, "Plugin names (as --list-plugins shows them) not to load."),
]

# PgBouncer keys accepted with a warning until pgrelay implements them.
PLANNED_SETTINGS: list[Setting] = [
    planned("unix_socket_group", STR, "", "Group of the Unix socket.", reload=False),
    planned("disable_pqexec", BOOL, "0", "Refuse the simple query protocol.", reload=False),
    planned("conffile", STR, "", "Shows the config file in use."),
    planned("service_name", STR, "pgbouncer", "Windows service name.", reload=False),
    planned("job_name", STR, "pgbouncer", "Alias of service_name.", reload=False),
    planned("auth_ident_file", STR, "", "Ident map file."),
    planned("auth_ldap_options", STR, "", "LDAP options."),
    planned("server_fast_close", BOOL, "0", "Close session-mode servers quickly on RECONNECT."),
    planned("dns_max_ttl", SECONDS, "15", "DNS cache time."),
    planned("dns_nxdomain_ttl", SECONDS, "15", "DNS negative cache time."),
    planned("dns_zone_check_period", SECONDS, "0", "DNS zone serial check period."),
    planned("resolv_conf", STR, "", "Custom resolv.conf.", reload=False),
    planned("client_tls13_ciphers", STR, "", "TLS 1.3 suites towards clients."),
    planned("client_tls_ecdhcurve", STR, "auto", "ECDH curve towards clients."),
    planned("client_tls_dheparams", STR, "auto", "DHE parameters towards clients."),
    planned("server_tls13_ciphers", STR, "", "TLS 1.3 suites towards servers."),
    planned("pkt_buf", INT, "4096", "Internal buffer size (pgrelay sizes its buffers itself).", reload=False),
    planned("sbuf_loopcnt", INT, "5", "Fairness loop count (pgrelay does not need it)."),
]


LISTENER_KEYS = [
    Setting("port", Int(0), "0", False, "TCP port (also names its Unix socket); required.", section="listeners"),
    Setting("addr", LIST, "", False, "Addresses to listen on; default: listen_addr.", section="listeners"),
    Setting("role", Enum("direct", "pooled", "serverless"), "pooled", False,
            "direct: each client gets its own server connection; pooled: the local pooler and dedicated poolers; "
            "serverless: Neon's HTTP /sql and WebSocket protocols, routed as pooled.",
            section="listeners"),
    Setting("pool_mode", Enum("", "session", "transaction", "statement"), "", False,
            "Pool mode of this port's pools, overriding [users], [databases] and the global setting.",
            section="listeners"),
    Setting("suffixes", BOOL, "1", False, "Whether user names may carry a |suffix on this port.",
            section="listeners"),
    Setting("proxy_protocol", Enum("", "0", "1"), "", False,
            "0 or 1: this port's own proxy_protocol (PROXY headers from proxy_protocol_trusted); empty: the "
            "global setting. Not with role=serverless.", section="listeners"),
    Setting("tls_cert_file", STR, "", False,
            "role=serverless: serve HTTPS and WSS with this certificate (default: client_tls_cert_file).",
            section="listeners"),
    Setting("tls_key_file", STR, "", False, "role=serverless: the private key of tls_cert_file.",
            section="listeners"),
]


PEER_KEYS = [
    Setting("host", STR, "", False, "The peer's address: a host name, an IP address or a Unix socket directory; required.",
            section="peers"),
    Setting("port", Int(1), "6432", False, "The peer's port.", section="peers"),
    Setting("pool_size", Int(0), "0", False, "Cancel requests in flight to this peer at once (0: default_pool_size); "
            "more wait for a slot.", section="peers"),
]
PEERS_DOC = ("Other pgrelay processes this one is peered with, one line each: "
             "peer_id = host=... [port=6432] [pool_size=N]. A CancelRequest whose key carries another "
             "peer's id is forwarded to it. The line with this process's own peer_id is ignored, so all "
             "peers may share one list.")


def declare(settings: list[Setting], sections: dict[str, str] | None = None):
    """A plugin's pgrelay_add_settings implementation declaring `settings` (and claiming `sections`).

    In a plugin module: ``pgrelay_add_settings = declare(SETTINGS)``.
    """
    import pluggy

    @pluggy.HookimplMarker("pgrelay")
    def pgrelay_add_settings(settings: SettingsRegistry) -> None:  # noqa: F811 (the hook's argument name)
        for name, doc in (sections or {}).items():
            settings.add_section(name, doc)
        for setting in declared:
            settings.add(setting)

    declared = list(settings)
    return pgrelay_add_settings


def core_registry() -> SettingsRegistry:
    registry = SettingsRegistry()
    for setting in PLANNED_SETTINGS + CORE_SETTINGS:
        registry.add(setting)
    registry.add_section("pgbouncer", "pgrelay's own settings (also accepted as [pgrelay]).")
    registry.add_section("listeners", "Extra listening ports, one line each: name = port=N role=direct|pooled|serverless "
                                      "[pool_mode=...] [addr=...] [suffixes=0] [proxy_protocol=0|1] [tls_cert_file=... tls_key_file=...]. The main listener is listen_addr:listen_port, "
                                      "role pooled.")
    for setting in LISTENER_KEYS:
        registry.add(setting)
    registry.add_section("peers", PEERS_DOC)
    for setting in PEER_KEYS:
        registry.add(setting)
    return registry


