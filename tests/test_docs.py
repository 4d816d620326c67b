"""README.rst is the manual: its generated reference is current and it documents every setting and hook."""

import inspect
import os
import re

from pgrelay import docs, hookspecs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.rst")


def readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def test_generated_sections_are_current():
    text = readme()
    assert docs.rewrite(text) == text, "README.rst is stale: run `python -m pgrelay.docs README.rst`"


def test_every_setting_and_section_key_is_documented():
    text = readme()
    registry = docs.full_registry()
    for setting in registry:
        assert f"``{setting.name}``" in text, setting.name
    for section, keys in registry.section_keys.items():
        assert f"``[{section}]`` keys" in text, section
        for name in keys:
            assert f"``{name}``" in text, (section, name)


def test_every_hook_is_documented_with_its_signature():
    text = readme()
    hooks = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("pgrelay_")]
    assert len(hooks) >= 18
    for name in hooks:
        signature = str(inspect.signature(getattr(hookspecs, name))).replace("'", "").replace('"', "")
        assert f"``{name}{signature}``" in text, name


def test_two_setup_commands_and_ci_uses_the_readme_test_command():
    text = readme()
    assert "    pip install '.[demo]' && pgrelay demo\n" in text
    test_command = "pip install -e '.[test]' && python -m pytest"
    assert f"    {test_command}\n" in text
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    # .ci/run extracts the command from README.rst, so the two cannot drift apart.
    assert "README.rst" in ci and re.search(r"grep -m1 .*pip install -e", ci)


def test_example_plugins_in_readme_compile():
    """Every Python example that defines a hook implementation is valid Python."""
    blocks = re.findall(r"::\n\n((?:    .*\n|\n)+)", readme())
    examples = [inspect.cleandoc("\n" + block) for block in blocks if "@hookimpl" in block]
    assert len(examples) >= 4
    for example in examples:
        compile(example, "<README example>", "exec")


def test_sentry_is_not_claimed_before_pgrelay_uses_it():
    """sentry-sdk is installed for the coming Sentry integration; until pgrelay imports it, neither
    the README nor a setting nor --help may say that Sentry works (issue 7, item 11)."""
    import glob

    sources = glob.glob(os.path.join(ROOT, "pgrelay", "**", "*.py"), recursive=True) \
        + glob.glob(os.path.join(ROOT, "plugins", "**", "*.py"), recursive=True)
    used = any("sentry_sdk" in open(path, encoding="utf-8").read() for path in sources)
    if not used:
        assert "sentry" not in readme().lower()
        assert not [s.name for s in docs.full_registry() if "sentry" in s.name.lower()]


def test_every_refusal_of_the_message_table_is_in_the_readme_with_its_sqlstate():
    from pgrelay_plugins.errors import MESSAGES
    lines = readme().splitlines()
    for message, entry in MESSAGES.items():
        shown = "``remaining connection slots are reserved ...``" if message.startswith("remaining connection") \
            else f"``{message}``"
        rows = [i for i, line in enumerate(lines) if line.startswith(shown)]
        assert rows, message
        # the SQLSTATE is on the row's line, or on the line above for a two-line message cell
        assert any(f"``{entry.sqlstate}``" in lines[i] or f"``{entry.sqlstate}``" in lines[i - 1] for i in rows), message


def test_readme_is_valid_restructuredtext():
    """README.rst renders without a docutils warning (a stray * or _ silently mangles the manual)."""
    import io

    import docutils.core
    warnings = io.StringIO()
    docutils.core.publish_doctree(readme(), settings_overrides={"warning_stream": warnings, "report_level": 2,
                                                                "halt_level": 5})
    assert warnings.getvalue() == ""
