"""The admin console across workers: which commands run in every worker, and how their answers become one.

A console session runs in the worker its connection reached. With workers, that worker has the
parent run the command in every worker (its own included) and merges the answers:

* SHOW commands about connections (CLIENTS, SERVERS, SOCKETS, ACTIVE_SOCKETS): every worker's
  rows, with a ``worker`` column added last (PgBouncer has none; readers by name ignore it);
* SHOW commands that count (POOLS, STATS*, TOTALS, DATABASES, USERS, LISTS, MEM, PEER_POOLS,
  ROUTES, POOLERS): one row per identity (its text columns), numbers added up, except settings
  and maxima, which are the same in every worker or the largest (MAX_COLUMNS), and averages,
  which are averaged (avg_*);
* control commands (PAUSE, RESUME, RECONNECT, KILL, KILL_CLIENT, DISABLE, ENABLE, RELOAD,
  WAIT_CLOSE, SET, SHUTDOWN): run in each worker; the answer is the first worker's, or the error
  all of them gave (KILL_CLIENT succeeds in the one worker that has the client);
* everything else (HELP, VERSION, CONFIG, STATE, LISTENERS, HOSTS, PLUGINS, BUDGET, a plugin's
  own): answered by the worker the console is on, as the configuration is the same in all.
SHOW WORKERS (one row per worker, from each) lists the workers themselves.
"""

from __future__ import annotations

import datetime
from decimal import Decimal
from typing import Any

CONNECTIONS = {"SHOW CLIENTS", "SHOW SERVERS", "SHOW SOCKETS", "SHOW ACTIVE_SOCKETS"}
ROWS = {"SHOW WORKERS"}  # one row per worker, which says which
COUNTS = {"SHOW POOLS", "SHOW STATS", "SHOW STATS_TOTALS", "SHOW STATS_AVERAGES", "SHOW TOTALS", "SHOW DATABASES",
          "SHOW USERS", "SHOW LISTS", "SHOW MEM", "SHOW PEER_POOLS", "SHOW ROUTES", "SHOW POOLERS"}
CONTROL = {"PAUSE", "RESUME", "RECONNECT", "KILL", "KILL_CLIENT", "DISABLE", "ENABLE", "RELOAD", "WAIT_CLOSE", "SET",
           "SHUTDOWN"}
# Numeric columns that are a setting or a maximum rather than a count: the largest value, not the sum.
MAX_COLUMNS = {"pool_size", "min_pool_size", "reserve_pool", "reserve_pool_size", "max_connections",
               "max_client_connections", "max_user_connections", "max_user_client_connections", "paused",
               "disabled", "maxwait", "maxwait_us", "port", "peer_id", "size", "server_lifetime",
               "max_db_connections", "max_db_client_connections", "pool_size_limit"}
NUMERIC = {"int4", "int8", "numeric", "float8"}


def gathered(name: str) -> bool:
    """Whether the command `name` runs in every worker."""
    return name in CONNECTIONS or name in COUNTS or name in CONTROL or name in ROWS


# -- answers on the channel (JSON) ----------------------------------------------------------------

def encode(result) -> list:
    """A handler's answer (a tag, a ResultSet or a list of them) as JSON-ready data."""
    from pgrelay.admin.commands import ResultSet
    items = result if isinstance(result, list) else [result]
    out = []
    for item in items:
        if item is None:
            continue
        if isinstance(item, ResultSet):
            out.append({"columns": [list(c) for c in item.columns], "tag": item.tag,
                        "rows": [[_value(v) for v in row] for row in item.rows]})
        else:
            out.append({"tag": str(item)})
    return out


def decode(items: list):
    from pgrelay.admin.commands import ResultSet
    out = []
    for item in items:
        if "columns" in item:
            out.append(ResultSet([tuple(c) for c in item["columns"]],
                                 [[_unvalue(v) for v in row] for row in item["rows"]], item["tag"]))
        else:
            out.append(item["tag"])
    return out


def _value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return {"d": str(value)}
    if isinstance(value, datetime.datetime):
        return {"t": value.isoformat()}
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _unvalue(value: Any) -> Any:
    if isinstance(value, dict):
        if "d" in value:
            return Decimal(value["d"])
        return datetime.datetime.fromisoformat(value["t"])
    return value


# -- merging ------------------------------------------------------------------------------------

def merge(name: str, answers: list[tuple[int, dict]]):
    """One answer from each worker's, (worker index, {"result": [...]} or {"error": ...}) in index
    order. Raises AdminError when every worker refused the command."""
    from pgrelay.admin.commands import AdminError
    good = [(index, decode(answer["result"])) for index, answer in answers if "result" in answer]
    if not good:
        error = next((answer["error"] for _, answer in answers if "error" in answer),
                     {"message": "no worker answered", "sqlstate": "58000"})
        raise AdminError(error["message"], error.get("sqlstate", "08P01"))
    if name in CONTROL:
        return good[0][1]
    if name in CONNECTIONS or name in ROWS:
        return _concatenate(good, with_worker=name in CONNECTIONS)
    return _add_up(good)


def _concatenate(good, with_worker: bool):
    from pgrelay.admin.commands import ResultSet
    first = good[0][1]
    out = []
    for position, item in enumerate(first):
        if not isinstance(item, ResultSet):
            out.append(item)
            continue
        rows = []
        for index, results in good:
            if position < len(results) and isinstance(results[position], ResultSet):
                rows.extend(list(row) + [index] if with_worker else row for row in results[position].rows)
        columns = list(item.columns) + [("worker", "int4")] if with_worker else item.columns
        out.append(ResultSet(columns, rows, item.tag))
    return out


def _add_up(good):
    from pgrelay.admin.commands import ResultSet
    first = good[0][1]
    out = []
    for position, item in enumerate(first):
        if not isinstance(item, ResultSet):
            out.append(item)
            continue
        kinds = [kind for _, kind in item.columns]
        names = [column for column, _ in item.columns]
        identity = [i for i, kind in enumerate(kinds) if kind not in NUMERIC]
        merged: dict[tuple, list] = {}
        seen: dict[tuple, int] = {}
        for _, results in good:
            if position >= len(results) or not isinstance(results[position], ResultSet):
                continue
            for row in results[position].rows:
                key = tuple(row[i] for i in identity)
                if key not in merged:
                    merged[key] = list(row)
                    seen[key] = 1
                    continue
                seen[key] += 1
                total = merged[key]
                for i, (column, kind) in enumerate(zip(names, kinds)):
                    if kind not in NUMERIC or row[i] is None:
                        continue
                    if total[i] is None:
                        total[i] = row[i]
                    elif column in MAX_COLUMNS:
                        total[i] = max(total[i], row[i])
                    else:
                        total[i] = total[i] + row[i]
        for key, total in merged.items():
            for i, (column, kind) in enumerate(zip(names, kinds)):
                if column.startswith("avg_") and kind in NUMERIC and total[i] is not None and seen[key] > 1:
                    total[i] = type(total[i])(total[i] / seen[key]) if kind != "numeric" else total[i] / seen[key]
        out.append(ResultSet(item.columns, list(merged.values()), item.tag))
    return out
