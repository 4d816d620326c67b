"""The CI slice of the protocol fuzzer: every target of fuzz/run.py for a fixed budget, with no crash, failure or hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fuzz.targets import TARGETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECONDS_PER_TARGET = 3


def test_fuzz_slice_runs_every_target_without_a_crash(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "fuzz", "run.py"), "--seconds", str(SECONDS_PER_TARGET),
                           "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=540, cwd=ROOT, check=False)  # a loaded CI box starts workers slowly
    results = {r["target"]: r for r in json.loads(out.read_text())}
    assert set(results) == set(TARGETS), proc.stdout
    for name, r in results.items():
        assert r["inputs"] > 0, (name, proc.stdout, proc.stderr[-2000:])
        assert r["crashes"] == 0 and r["hangs"] == 0 and not r["failures"], (name, proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
