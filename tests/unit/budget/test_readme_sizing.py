"""README.rst's "Sizing pools and limits": its scenario configurations give the worst cases and exit
statuses the text states, and the example output is what `pgrelay check` prints for it.

tests/readme.py checks every literal block of a known kind; the example output is a
``.. parsed-literal::`` block, which it does not collect, so it is checked here."""

from __future__ import annotations

import re
import textwrap

import pytest

from tests import readme

SECTION = "Sizing pools and limits"


def section_text() -> str:
    text = readme.read()
    start = text.index(f"{SECTION}\n{'-' * len(SECTION)}\n")
    end = re.compile(r"^\S.*\n-{3,}\n", re.M).search(text, start + len(SECTION) * 2 + 2)
    return text[start:end.start() if end else len(text)]


def scenarios() -> dict[str, str]:
    """{file name: configuration} from the section's ini blocks, named by their first comment line."""
    out = {}
    for block in readme.ini_blocks(section=SECTION):
        first = block.text.splitlines()[0]
        match = re.match(r"; (\S+\.ini):", first)
        assert match, f"README.rst:{block.line}: a scenario block starts with '; NAME.ini: ...'"
        out[match.group(1)] = block.text
    return out


def config(name: str) -> str:
    """The scenario as the text describes it; tenants.ini continued "up to tenant200"."""
    text = scenarios()[name]
    if name == "tenants.ini":
        lines = text.splitlines()
        last = max(i for i, line in enumerate(lines) if line.startswith("tenant"))
        pattern = lines[last]
        shown = int(re.match(r"tenant(\d+)", pattern).group(1))
        more = [re.sub(r"tenant\d{3}", f"tenant{n:03d}", pattern) for n in range(shown + 1, 201)]
        text = "\n".join(lines[:last + 1] + more + lines[last + 1:]) + "\n"
        assert text.count("\ntenant") == 200
    return text


@pytest.fixture
def run(check, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def run(name: str, *args: str):
        (tmp_path / name).write_text(config(name))
        return check(None, name, *args)

    return run


def test_the_section_has_the_three_scenarios():
    assert set(scenarios()) == {"small.ini", "large.ini", "tenants.ini"}


CLAIMS = re.findall(r"``pgrelay check (\S+\.ini)([^`]*)``: worst\s+case (\S+), exit\s+status (\d)", section_text())


def test_every_scenario_states_its_result():
    assert {name for name, *_ in CLAIMS} == set(scenarios())


@pytest.mark.parametrize("name,args,worst,status", CLAIMS, ids=[c[0] for c in CLAIMS])
def test_stated_worst_case_and_exit_status(run, name, args, worst, status):
    result = run(name, *args.split())
    assert result.value("worst case") == worst
    assert result.status == int(status)


def test_the_example_output_is_what_check_prints(run):
    match = re.search(r"``pgrelay check (small\.ini[^`]*)`` prints:\n\n\.\. parsed-literal::\n\n((?:    .*\n|\n)+)",
                      section_text())
    assert match, "the example output of pgrelay check is missing"
    shown = textwrap.dedent(match.group(2)).strip("\n") + "\n"
    # A parsed-literal block renders inline markup: the output must hold none.
    assert not re.search(r"[*`|]|\w_\W", shown), "the example output would be rendered with markup"
    name, *args = match.group(1).split()
    result = run(name, *args)
    assert result.err == ""
    assert result.out == shown


@pytest.mark.parametrize("name,args,phrase,status,row,value", [
    ("large.ini", ["--max-connections", "500", "--processes", "2"], "(``--processes 2``) could open 900: exit status 1",
     1, "worst case", "900"),
    ("large.ini", ["--max-connections", "500"], "47 for anyone plus the 3 superuser slots", 0,
     "left for direct and admin connections", "47"),
    ("tenants.ini", ["--max-connections", "403"], "With ``--max-connections 403`` it fits but leaves nothing for "
     "direct connections (exit status 2)", 2, "left for direct and admin connections", "0"),
    ("tenants.ini", ["--max-connections", "420"], "``--max-connections 420`` leaves 17 (exit status 0)", 0,
     "left for direct and admin connections", "17"),
    ("small.ini", ["--max-connections", "50"], "Without\n``max_db_connections`` the worst case is unbounded", 0,
     "worst case", "40"),
])
def test_other_stated_results(run, name, args, phrase, status, row, value):
    assert phrase in section_text()
    result = run(name, *args)
    assert result.status == status
    assert result.value(row) == value


def test_small_server_without_max_db_connections_is_unbounded(check):
    result = check(config("small.ini").replace("max_db_connections = 40\n", ""), "--max-connections", "50")
    assert result.value("worst case") == "unbounded"
    assert result.status == 1


def test_tenants_leave_no_room_for_direct_or_superuser_connections(run):
    text = section_text()
    assert "there is no room left for\ndirect connections, and none for superuser connections" in text
    result = run("tenants.ini", "--max-connections", "400")
    assert "no room left for direct connections" in result.out
    assert "no room left for superuser connections either if pgrelay's server users are superusers" in result.out
