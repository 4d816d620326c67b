"""The CI slice of the soak: bench/soak.py for 30 seconds, with every check of its report passing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_soak_slice_loses_nothing_and_crosses_nothing():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "soak.py"), "--seconds", "30",
                          "--seed", "7", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=240,
                         check=False)
    assert out.stdout.strip(), out.stderr[-3000:]
    report = json.loads(out.stdout)
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert out.returncode == 0 and report["ok"] and not failed, (failed, out.stdout[-4000:])
    writes = report["writes"]
    assert writes["lost"] == 0 and writes["duplicated"] == 0 and writes["present_after_failure"] == 0
    assert report["cross_client"] == 0
    assert writes["acknowledged"] > 100, "the workload ran"
    assert report["pgrelay"]["alive"] and report["pgrelay"]["died_at_s"] is None
    assert report["fds"]["end"] <= report["fds"]["start"]
    for kind in ("kill_clients", "terminate_backends", "restart_primary", "reload", "bad_connections",
                 "promote_replica"):
        assert report["chaos"].get(kind, 0) > 0, kind
    for path in ("pooled/transaction", "session/session", "statement/statement", "direct/direct"):
        assert report["after_chaos"].get(path, 0) > 0, path
