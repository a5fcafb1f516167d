"""The documentation matches the code: every environment variable settings.py reads is in the
README's configuration table and in .env.example."""

from __future__ import annotations

import re

from conftest import ROOT

SETTINGS = (ROOT / "agentplatform" / "settings.py").read_text()
# env("X"), env.int("X", ...), and the helpers that take the variable's name first.
READ = re.compile(r'(?:env(?:\.[a-z_]+)?|_decimal_setting)\(\s*"([A-Z][A-Z0-9_]*)"')
# Variables for the test machinery, not for people running the platform.
INTERNAL = {"TEST_DATABASE_NAME"}


def settings_variables() -> set[str]:
    return set(READ.findall(SETTINGS)) - INTERNAL


def test_settings_reads_the_variables_this_test_knows_how_to_find():
    # Guards the regular expression: a change in how settings.py reads env vars must not make
    # the checks below pass vacuously.
    assert {"DATABASE_URL", "REDIS_URL", "WS_MAX_FRAME_BYTES", "BUDGET_ALERT_EMAILS",
            "BILLING_DEFAULT_INPUT_PER_1M"} <= settings_variables()


def test_every_setting_is_in_the_readme_configuration_table():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("## Layout and architecture")]
    missing = sorted(v for v in settings_variables() if f"`{v}`" not in table)
    assert not missing, f"README's Configuration table lacks {missing}"


def test_every_setting_is_in_env_example():
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example, re.M))
    missing = sorted(settings_variables() - listed)
    assert not missing, f".env.example lacks {missing}"
