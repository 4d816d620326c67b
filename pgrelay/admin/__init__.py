"""The admin console: PgBouncer's virtual database `pgbouncer` (also `pgrelay`), a built-in plugin."""
