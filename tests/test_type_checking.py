"""The package's annotations are checked by the test command (tools/test.sh runs mypy before pytest,
as configured in pyproject.toml); no module's errors are exempt, and the exemptions for untyped
third-party imports never cover our own."""

from __future__ import annotations

import tomllib

from tests.support.paths import REPO


def _mypy_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]


def test_the_test_command_type_checks_before_it_runs_the_tests():
    lines = [line.strip() for line in (REPO / "tools" / "test.sh").read_text().splitlines()]
    assert lines.index(".venv/bin/mypy") < next(i for i, line in enumerate(lines) if "-m pytest" in line)
    assert _mypy_config()["packages"] == ["dcp_forge"]


def test_every_module_is_checked_and_no_exemption_ignores_our_own_imports():
    config = _mypy_config()
    overrides = config["overrides"]
    ignored = [m for o in overrides if o.get("ignore_errors") for m in o["module"]]
    assert ignored == [] and not config.get("ignore_errors"), "every module's errors are reported"
    untyped = [m for o in overrides if o.get("ignore_missing_imports") for m in o["module"]]
    assert untyped and not [m for m in untyped if m.split(".")[0] in ("dcp_forge", "tests", "benchmarks")]
