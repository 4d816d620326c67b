"""Workers (``workers = N``): several pgrelay processes serving the same listening sockets as one pgrelay.

The parent (supervisor.py) binds the listeners, starts N worker processes that adopt them (each a
normal pgrelay, told by PGRELAY_WORKER which one it is), restarts a worker that dies, forwards
signals and speaks for all of them to systemd. Each worker holds a channel (channel.py) to the
parent, whose coordinator (coordinator.py) keeps the counts behind every limit for the whole
pgrelay: a worker asks it before it counts a client or opens a server (link.py). Cancel keys carry
the index of the worker owning them, so a CancelRequest reaching another worker is passed on; the
admin console gathers its SHOW answers from every worker and runs control commands in each
(console.py).
"""

WORKER_ENV = "PGRELAY_WORKER"          # "index/count/channel fd" in a worker's environment
LISTEN_FDS_ENV = "PGRELAY_LISTEN_FDS"  # the listening sockets' fds, comma-separated (pgrelay.listener)
