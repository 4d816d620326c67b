"""The connection budget behind `pgrelay check`: the most server connections a configuration lets pgrelay open.

model.py computes the worst case per host from the loaded configuration, flow.py the maximum
flow through the caps, verdict.py sets it against the server's limits, live.py reads those
limits from the servers, report.py formats the result and command.py is the command itself.
Of the core, only pgrelay/cli.py imports this package; the relay never does. The wings that
show its figures (the admin console's SHOW BUDGET, the metrics plugin) import it lazily.
"""
