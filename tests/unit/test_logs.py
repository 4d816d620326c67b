"""pgrelay/logs.py: PgBouncer's line format, JSON lines, syslog text, connection fields and setup()."""

import io
import json
import logging
import os
import re
import sys

import pytest

from pgrelay import logs
from pgrelay.config import load_config
from pgrelay.routing import HostAddr
from pgrelay.settings import core_registry


def record(level=logging.INFO, msg="C-1: db/u@1.2.3.4:5 hello %s", args=("world",), **extra):
    rec = logging.LogRecord("pgrelay", level, __file__, 1, msg, args, None)
    rec.created, rec.msecs = 1767268800.25, 250.0  # 2026-01-01 12:00:00.250 UTC
    rec.__dict__.update(extra)
    return rec


def config(*args):
    return load_config(core_registry(), None, list(args), env={})


@pytest.mark.parametrize("level,name", [(logging.INFO, "LOG"), (logging.WARNING, "WARNING"),
                                        (logging.ERROR, "ERROR"), (logging.CRITICAL, "FATAL"),
                                        (logging.DEBUG, "DEBUG")])
def test_text_line_is_pgbouncers(level, name):
    line = logs.TextFormatter().format(record(level))
    assert line == f"2026-01-01 12:00:00.250 UTC [{os.getpid()}] {name} C-1: db/u@1.2.3.4:5 hello world"


def test_text_formatter_leaves_the_record_alone_for_other_handlers():
    rec = record()
    logs.TextFormatter().format(rec)
    assert rec.levelname == "INFO"


def test_json_line_has_time_level_pid_message_and_fields():
    line = logs.JsonFormatter().format(record(logging.WARNING, client="C-1", db="db", user="u", addr="1.2.3.4:5"))
    assert json.loads(line) == {"time": "2026-01-01T12:00:00.250Z", "level": "WARNING", "pid": os.getpid(),
                                "message": "C-1: db/u@1.2.3.4:5 hello world", "client": "C-1", "db": "db",
                                "user": "u", "addr": "1.2.3.4:5"}
    assert "\n" not in line


def test_json_line_without_fields_and_with_an_exception():
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record(logging.ERROR, "janitor failed", ())
        rec.exc_info = sys.exc_info()
    out = json.loads(logs.JsonFormatter().format(rec))
    assert out.keys() == {"time", "level", "pid", "message", "exception"}
    assert out["message"] == "janitor failed" and "ValueError: boom" in out["exception"]


def test_json_keeps_non_ascii_and_quotes_escaped():
    out = logs.JsonFormatter().format(record(msg='db "ünï" %s', args=("\n",)))
    assert json.loads(out)["message"] == 'db "ünï" \n' and "\n" not in out


def test_syslog_text_is_level_and_message():
    assert logs.SyslogFormatter().format(record(logging.CRITICAL)) == "FATAL C-1: db/u@1.2.3.4:5 hello world"


@pytest.mark.parametrize("addr,text", [(HostAddr("10.0.0.5", 5432), "10.0.0.5:5432"),
                                       (HostAddr("::1", 6000), "[::1]:6000"),
                                       (HostAddr("/var/run/postgresql", 5433), "unix:5433"),
                                       (None, "(noaddr)")])
def test_server_addr_as_pgbouncer_prefix_shows_it(addr, text):
    assert logs.server_addr(addr) == text


@pytest.mark.parametrize("params,value", [({}, "no"), ({"replication": "true"}, "yes"), ({"Replication": "on"}, "yes"),
                                          ({"replication": "database"}, "database"),
                                          ({"replication": "false"}, "no")])
def test_replication_field(params, value):
    assert logs.replication(params) == value


# -- setup() ------------------------------------------------------------------------------------

def pgrelay_handlers():
    return [h for h in logging.getLogger("pgrelay").handlers if getattr(h, "_pgrelay", False)]


def test_setup_stderr_logfile_and_level(tmp_path, restore_pgrelay_logger, monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    logfile = tmp_path / "a.log"
    logs.setup(config("--logfile", str(logfile)))
    log = logging.getLogger("pgrelay")
    log.debug("hidden")
    log.info("shown %d", 1)
    for text in (stderr.getvalue(), logfile.read_text()):
        assert re.fullmatch(r"\S+ \S+ UTC \[\d+\] LOG shown 1\n", text), text
    logs.setup(config("--logfile", str(logfile), "--verbose", "1", "--log_format", "json"))
    log.debug("now shown")
    assert json.loads(logfile.read_text().splitlines()[-1])["level"] == "DEBUG"
    assert len(pgrelay_handlers()) == 2


def test_setup_quiet_sends_nothing_to_stderr(tmp_path, restore_pgrelay_logger, monkeypatch, capfd):
    monkeypatch.setattr(logs, "quiet", True)
    logs.setup(config())
    logging.getLogger("pgrelay").warning("nowhere")  # not even logging's last-resort handler
    assert capfd.readouterr().err == ""
    logs.setup(config("--logfile", str(tmp_path / "q.log")))
    logging.getLogger("pgrelay").warning("to the file only")
    assert capfd.readouterr().err == ""
    assert "WARNING to the file only" in (tmp_path / "q.log").read_text()


def test_reload_keeps_the_open_logfile_and_follows_rotation(tmp_path, restore_pgrelay_logger, monkeypatch):
    monkeypatch.setattr(logs, "quiet", True)
    logfile = tmp_path / "r.log"
    logs.setup(config("--logfile", str(logfile)))
    first = pgrelay_handlers()[0]
    logs.setup(config("--logfile", str(logfile)))
    assert pgrelay_handlers() == [first]
    os.rename(logfile, tmp_path / "r.log.1")  # logrotate
    logging.getLogger("pgrelay").info("after rotation")
    assert "after rotation" in logfile.read_text()


def test_unwritable_logfile_fails_start_but_not_reload(tmp_path, restore_pgrelay_logger, monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    bad = str(tmp_path / "missing-dir" / "x.log")
    with pytest.raises(OSError):
        logs.setup(config("--logfile", bad))
    good = tmp_path / "good.log"
    logs.setup(config("--logfile", str(good)))
    logs.setup(config("--logfile", bad))  # a reload: logged, the logger keeps working
    logging.getLogger("pgrelay").info("still logging")
    assert not any(isinstance(h, logging.FileHandler) for h in pgrelay_handlers())
    text = stderr.getvalue()
    assert f"ERROR cannot open logfile {bad}: No such file or directory" in text and "LOG still logging" in text
