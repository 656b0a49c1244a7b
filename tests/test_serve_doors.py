"""Who may do what at `labelassist serve`'s door (issue #30): the secret files."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from labelassist.studio import free_port, read_or_make_secret

SLOW_MAKE = """
import sys, time, secrets
from pathlib import Path
from labelassist.studio import read_or_make_secret

def make():
    print("making", file=sys.stderr, flush=True)
    time.sleep(float(sys.argv[2]))  # slow entropy, a full disk, a kill: all land here
    return secrets.token_urlsafe(24)

print(read_or_make_secret(Path(sys.argv[1]), make), flush=True)
"""


def make_secret_in_process(path: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_MAKE, str(path), str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---- the secret files ------------------------------------------------------------------

def test_a_kill_while_a_secret_is_made_leaves_no_empty_secret_behind(tmp_path):
    path = tmp_path / "serve-secret"
    proc = make_secret_in_process(path, 30)
    assert proc.stderr.readline() == "making\n"  # inside make()
    proc.kill()
    proc.wait()

    assert not path.exists() or len(path.read_text().strip()) >= 16
    again = read_or_make_secret(path, lambda: secrets.token_urlsafe(24))
    assert len(again) >= 16 and path.read_text().strip() == again


def test_racing_first_starts_agree_on_one_secret(tmp_path):
    path = tmp_path / "sub" / "serve-secret"
    procs = [make_secret_in_process(path, 0.5) for _ in range(6)]
    said = {proc.communicate(timeout=60)[0].strip() for proc in procs}

    assert len(said) == 1, said
    (secret,) = said
    assert len(secret) >= 16 and path.read_text().strip() == secret
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["serve-secret"]  # no temp files left


@pytest.mark.parametrize("torn", ["", "\n", "abc"])
def test_an_empty_or_short_secret_file_is_made_again_and_said(tmp_path, torn):
    path = tmp_path / "serve-secret"
    path.write_text(torn)
    path.chmod(0o600)
    said = []

    secret = read_or_make_secret(path, lambda: secrets.token_urlsafe(24), log=said.append)

    assert len(secret) >= 16 and path.read_text().strip() == secret
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(said) == 1 and str(path) in said[0], said
    assert read_or_make_secret(path, lambda: "never used, the file is good") == secret


def test_a_good_secret_file_is_kept(tmp_path):
    path = tmp_path / "serve-secret"
    path.write_text("kept-secret-of-twenty-chars\n")
    assert read_or_make_secret(path, lambda: "x" * 40) == "kept-secret-of-twenty-chars"


@pytest.mark.parametrize("how", [["--secret", ""], ["--secret", "short-secret"],
                                 ["ENV", "0123456789abcde"]])
def test_a_short_or_empty_secret_is_refused_naming_the_flag(tmp_path, how):
    env = {**os.environ, "LABEL_STUDIO_URL": f"http://127.0.0.1:{free_port()}",
           "LABEL_STUDIO_API_KEY": "x" * 40, "HOME": str(tmp_path)}
    env.pop("LABELASSIST_SERVE_SECRET", None)
    args = []
    if how[0] == "ENV":
        env["LABELASSIST_SERVE_SECRET"] = how[1]
    else:
        args = how
    (tmp_path / "ledger.db").touch()
    result = subprocess.run(
        [sys.executable, "-m", "labelassist.cli", "serve", "--db",
         f"sqlite:///{tmp_path / 'ledger.db'}", "--port", str(free_port()), *args],
        env=env, capture_output=True, text=True, timeout=120, check=False)

    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "--secret" in lines[0] and "LABELASSIST_SERVE_SECRET" in lines[0]
    assert "16" in lines[0]
