"""Fixtures for the budget tests: write a configuration and run `pgrelay check` on it in-process."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import pytest

from pgrelay.budget import command


@dataclass
class Checked:
    status: int
    out: str
    err: str

    def host(self, addr: str) -> str:
        """The report of one host: from its title line to the next blank line."""
        match = re.search(rf"^(?:PostgreSQL|upstream pooler) {re.escape(addr)}\b.*?(?=\n\n|\Z)", self.out, re.M | re.S)
        assert match, f"no report for {addr} in:\n{self.out}"
        return match.group(0)

    def value(self, label: str, addr: str | None = None) -> str:
        """The value column of a row ("worst case", "pools under their caps", ...)."""
        text = self.host(addr) if addr else self.out
        found = re.findall(rf"^  {re.escape(label)}\s+(\S+(?: \S+)?)(?:  |$)", text, re.M)
        assert len(found) == 1, f"{len(found)} rows {label!r} in:\n{text}"
        return found[0]


@pytest.fixture
def check(tmp_path, monkeypatch, restore_pgrelay_logger):
    """check(ini_text, *args) -> Checked: `pgrelay check FILE *args` with a clean PGRELAY_* environment."""
    import os
    for name in list(os.environ):
        if name.startswith("PGRELAY_"):
            monkeypatch.delenv(name)
    count = 0

    def run(text: str | None, *args: str) -> Checked:
        nonlocal count
        count += 1
        argv = list(args)
        if text is not None:
            path = tmp_path / f"check{count}.ini"
            path.write_text(text)
            argv = [str(path)] + argv
        out, err = io.StringIO(), io.StringIO()
        status = command.main(argv, out=out, err=err)
        return Checked(status, out.getvalue(), err.getvalue())

    return run
