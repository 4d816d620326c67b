"""The connection budget behind `pgrelay check`: the most server connections a configuration lets pgrelay open.

model.py computes the worst case per host from the loaded configuration, flow.py the maximum
flow through the caps, verdict.py sets it against the server's limits, live.py reads those
limits from the servers, report.py formats the result and command.py is the command itself.
Only pgrelay/cli.py imports this package; the pooler never does.
"""
