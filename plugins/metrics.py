"""Prometheus metrics on metrics_listen: a built-in plugin reading pgrelay's pools, clients and servers."""
