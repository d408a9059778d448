"""The package's annotations are checked by the test command (tools/test.sh runs mypy before pytest,
as configured in pyproject.toml), and the configuration's exemptions stay honest."""

from __future__ import annotations

import tomllib

from tests.support.paths import REPO


def _mypy_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]


def test_the_test_command_type_checks_before_it_runs_the_tests():
    lines = [line.strip() for line in (REPO / "tools" / "test.sh").read_text().splitlines()]
    assert lines.index(".venv/bin/mypy") < next(i for i, line in enumerate(lines) if "-m pytest" in line)
    assert _mypy_config()["packages"] == ["dcp_forge"]


def test_exemptions_name_existing_modules_and_never_ignore_our_own_imports():
    overrides = _mypy_config()["overrides"]
    [pending] = [o["module"] for o in overrides if o.get("ignore_errors")]
    assert pending == sorted(pending), "the second-pass list stays sorted"
    missing = [m for m in pending if not (REPO / (m.replace(".", "/") + ".py")).is_file()]
    assert missing == [], f"no such modules (remove them from the second-pass list): {missing}"
    untyped = [m for o in overrides if o.get("ignore_missing_imports") for m in o["module"]]
    assert untyped and not [m for m in untyped if m.split(".")[0] in ("dcp_forge", "tests", "benchmarks")]
