"""Setting up is quiet where nothing is wrong and talkative where it takes time: pyproject.toml
builds without setuptools warnings, and tools/bootstrap.sh says what it is doing at every step,
showing pip's own progress for the long installs."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tomllib
import warnings

import pytest

from tests.support.paths import REPO

ROOT = REPO


def test_pyproject_builds_without_setuptools_warnings(monkeypatch):
    pytest.importorskip("setuptools")
    from packaging.requirements import Requirement
    from setuptools import __version__ as setuptools_version
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), "pyproject.toml")
    assert [str(w.message).splitlines()[0] for w in caught] == []
    assert dist.metadata.license_expression == "BSD-3-Clause"
    # the build backend pin admits only releases that read the SPDX license string
    [pin] = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
             if Requirement(r).name == "setuptools"]
    assert not pin.specifier.contains("76.9") and pin.specifier.contains(setuptools_version)


@pytest.fixture
def checkout(tmp_path):
    """A copy of the project's set-up files whose .venv python is a stand-in that records its calls."""
    (tmp_path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "bootstrap.sh", tmp_path / "tools")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/usr/bin/env bash\necho "$*" >> "$(dirname "$0")/../calls"\necho "pip output for: $*"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return tmp_path


def _bootstrap(checkout):
    return subprocess.run(["bash", "tools/bootstrap.sh"], cwd=checkout, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": "python3"})


def test_bootstrap_shows_every_step_and_pips_progress_then_nothing_once_done(checkout):
    proc = _bootstrap(checkout)
    assert proc.returncode == 0, proc.stderr
    steps = [line.split("] ", 1)[1] for line in proc.stderr.splitlines() if line.startswith("[bootstrap ")]
    assert [s.split(" ", 1)[0] for s in steps] == ["1/4", "2/4", "3/4", "4/4", "done:"], proc.stderr
    calls = (checkout / ".venv" / "calls").read_text().splitlines()
    installs = [c for c in calls if "install" in c and "--upgrade pip" not in c]
    assert [c.split()[-1] for c in installs] == ["torch==2.13.0", ".[dev]"]
    assert all("-q" not in c.split() and "--progress-bar on" in c for c in installs), "pip shows its progress"
    assert proc.stderr.count("pip output for:") == 2 and proc.stdout == ""
    again = _bootstrap(checkout)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", ""), "an up-to-date .venv: silent"
