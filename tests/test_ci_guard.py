"""Under CI, a missing service fails the run: a green CI must mean that the PostgreSQL
tests really ran. On a developer's machine they are skipped with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from labelassist.labelstudio.studio import free_port

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow  # each runs a pytest of its own

ONE_PG_TEST = "tests/test_scaleout.py::test_id_lists_beyond_postgres_parameter_limit"


def run_without_postgres(ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["LABELASSIST_TEST_PG"] = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           ONE_PG_TEST], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_missing_postgres_fails_under_ci():
    run = run_without_postgres(ci=True)
    assert run.returncode == 1, run.stdout[-2000:]
    assert "1 error" in run.stdout and "CI=true: start PostgreSQL" in run.stdout


def test_missing_postgres_is_a_skip_elsewhere():
    run = run_without_postgres(ci=False)
    assert run.returncode == 0, run.stdout[-2000:]
    assert "1 skipped" in run.stdout and "PostgreSQL is not reachable" in run.stdout
