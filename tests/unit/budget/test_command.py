"""`pgrelay check` as a command: bad input is exit status 3 with a clear message, --help, and the
`pgrelay` entry point (a real subprocess) giving the same statuses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pgrelay.budget.verdict import BAD_INPUT, CAN_EXCEED, FITS

GOOD = "[databases]\nmain = host=h.example.com user=app\n[pgbouncer]\ndefault_pool_size = 10\n"


def test_missing_file(check, tmp_path):
    result = check(None, str(tmp_path / "nope.ini"))
    assert result.status == BAD_INPUT
    assert result.out == ""
    assert f"pgrelay check: error: cannot read configuration file {tmp_path / 'nope.ini'}: no such file" in result.err


def test_no_file(check):
    result = check(None)
    assert result.status == BAD_INPUT
    assert "no configuration file given" in result.err and "usage: pgrelay check" in result.err


def test_unknown_setting_in_the_file(check):
    result = check(GOOD + "max_conections = 5\n")
    assert result.status == BAD_INPUT
    assert "unknown setting 'max_conections'" in result.err


def test_unknown_database_option(check):
    result = check(GOOD.replace("user=app", "user=app pool_sise=3"))
    assert result.status == BAD_INPUT
    assert "unknown database option 'pool_sise'" in result.err


def test_negative_setting_in_the_file(check):
    result = check(GOOD.replace("default_pool_size = 10", "default_pool_size = -1"))
    assert result.status == BAD_INPUT
    assert "default_pool_size: -1 is below the minimum 0" in result.err


@pytest.mark.parametrize("args,message", [
    (["--max-connections", "-5"], "--max-connections: -5 is below the minimum 1"),
    (["--superuser-reserved=-1"], "--superuser-reserved: -1 is below the minimum 0"),
    (["--reserved", "-2"], "--reserved: -2 is below the minimum 0"),
    (["--processes", "0"], "--processes: 0 is below the minimum 1"),
    (["--processes", "two"], "--processes: invalid integer 'two'"),
    (["--processes"], "--processes needs a number"),
    (["--max-connections", "10", "--superuser-reserved", "7", "--reserved", "3"],
     "superuser_reserved_connections (7) plus reserved_connections (3) must be less than max_connections (10)"),
    (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag 1"),
    (["extra.ini"], "unexpected argument 'extra.ini'"),
])
def test_bad_options(check, args, message):
    result = check(GOOD, *args)
    assert result.status == BAD_INPUT, result.out
    assert message in result.err
    assert result.out == ""


def test_help_documents_options_and_exit_statuses(check):
    result = check(None, "--help")
    assert result.status == 0
    for text in ("--live", "--processes N", "--max-connections N", "--superuser-reserved N", "--reserved N",
                 "0  fits", "1  can exceed", "2  fits, but", "3  bad input", "4  --live could not"):
        assert text in result.out, text


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGRELAY_")}
    return subprocess.run([sys.executable, "-m", "pgrelay", *args], capture_output=True, text=True, timeout=60,
                          env=env, cwd=cwd)


def test_the_pgrelay_command_runs_check(tmp_path):
    path = tmp_path / "relay.ini"
    path.write_text(GOOD)
    fits = run("check", str(path))
    assert fits.returncode == FITS, fits.stderr
    assert "worst case" in fits.stdout and "result: fits on 1 host (exit status 0)" in fits.stdout
    exceeds = run("check", str(path), "--max-connections", "10")
    assert exceeds.returncode == CAN_EXCEED
    assert "CAN EXCEED: 10 server connections for 7 slots, 3 too many" in exceeds.stdout
    missing = run("check", str(tmp_path / "missing.ini"))
    assert missing.returncode == BAD_INPUT
    assert "cannot read configuration file" in missing.stderr
    assert "pgrelay check CONFIG_FILE" in run("--help").stdout


def test_the_core_never_imports_the_budget_package():
    """Of the core, only pgrelay/cli.py imports the budget code (for `pgrelay check`); the wings that
    show its figures (the admin console's SHOW BUDGET, the metrics plugin) may, the relay never does."""
    import glob
    import re as re_
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    importers = []
    for path in glob.glob(os.path.join(root, "pgrelay", "*.py")):
        with open(path, encoding="utf-8") as f:
            if re_.search(r"^\s*(from\s+(\.|pgrelay\.)budget\b|import\s+pgrelay\.budget\b)", f.read(), re_.M):
                importers.append(os.path.relpath(path, root))
    assert importers == ["pgrelay/cli.py"]
