"""The second day (issue 32): what the loop says about itself is true, and a version is
described before anyone has reviewed it."""

import csv
import io
import json
import random
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from labelassist.cli import app
from labelassist.db.models import ModelVersion, Prediction
from labelassist.db.queries import first_paths
from labelassist.ingest import ingest
from labelassist.labels import load_label_file
from labelassist.model.load import load_model
from labelassist.predict.run import predict
from labelassist.toy import world as toyworld

from .conftest import add_annotation

EXAMPLES = Path(__file__).parent.parent / "examples" / "toyworld"


def kind_of(path: str) -> str:
    name = Path(path).name.split("_")[0]
    return "junk" if name in toyworld.JUNK else "warm" if name in toyworld.WARM else "cool"


@pytest.fixture
def unreviewed(db, db_url, toy_model_dir, tmp_path):
    """300 toy pictures and 30 of no class, predicted with the member descriptions; no
    review yet."""
    toyworld.write_images(tmp_path / "photos", 300, seed=51)
    toyworld.write_junk(tmp_path / "photos" / "junk", 30, seed=52)
    ingest(db, [tmp_path / "photos"])
    model = load_model(str(toy_model_dir), device="cpu", dtype="fp32")
    predict(db, model, load_label_file(EXAMPLES / "labels.toml"))
    return db, db_url


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result


def test_predictions_carry_the_out_of_set_flag_before_any_review(unreviewed):
    db, db_url = unreviewed
    result = run("predictions", "--db", db_url)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 330 and all(isinstance(r["out_of_set"], bool) for r in records)
    junk = [r["out_of_set"] for r in records if kind_of(r["path"]) == "junk"]
    real = [r["out_of_set"] for r in records if kind_of(r["path"]) != "junk"]
    assert sum(junk) >= 0.8 * len(junk) and sum(real) <= 0.03 * len(real)
    csv_out = run("predictions", "--db", db_url, "--format", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(csv_out)))
    assert sum(r["out_of_set"] == "true" for r in rows) == sum(junk) + sum(real)

    status = run("status", "--db", db_url)
    assert status.exit_code == 0, status.output
    assert f"out of set: {sum(junk) + sum(real)}" in status.output.replace(",", "")


def test_report_describes_a_version_before_any_review(unreviewed, tmp_path):
    db, db_url = unreviewed
    flagged = {r["path"] for r in map(json.loads, run("predictions", "--db", db_url)
                                      .stdout.splitlines()) if r["out_of_set"]}
    html = tmp_path / "preview.html"
    result = run("report", "--db", db_url, "--json", "-", "--html", html)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["reviewed"] == 0 and report["versions"] == []
    preview = report["preview"][0]
    with db.read() as s:
        version = s.scalars(select(ModelVersion)).one()
        labels = dict(s.execute(select(Prediction.label, func.count())
                                .group_by(Prediction.label)).all())
    assert report["model_version"] == preview["model_version"] == version.name
    assert preview["predicted"] == 330
    assert {c: n["count"] for c, n in preview["classes"].items()} == {
        c: labels.get(c, 0) for c in version.label_set["classes"]}
    assert sum(b["count"] for b in preview["confidence"]["bins"]) == 330
    assert preview["out_of_set"]["flagged"] == len(flagged)
    assert {e["path"] for e in preview["out_of_set"]["examples"]} <= flagged
    assert len(preview["out_of_set"]["examples"]) == min(len(flagged), 60)
    page = html.read_text()
    assert "no review yet" in page.lower()
    assert page.count('src="data:image/jpeg;base64,') == len(preview["out_of_set"]["examples"])


def test_learn_says_how_many_predictions_the_ledger_holds_for_the_probe(
        db, db_url, toy_model_dir, tmp_path):
    toyworld.write_images(tmp_path / "photos", 120, seed=61)
    ingest(db, [tmp_path / "photos"])
    model = load_model(str(toy_model_dir), device="cpu", dtype="fp32")
    predict(db, model, load_label_file(EXAMPLES / "labels-vague.toml"))
    with db.read() as s:
        ids = s.scalars(select(Prediction.image_id)).all()
        paths = first_paths(s, ids)
    for n, image_id in enumerate(random.Random(3).sample(list(ids), 80)):
        truth = "warm" if Path(paths[image_id]).name.split("_")[0] in toyworld.WARM else "cool"
        add_annotation(db, image_id, truth, n=n)
    result = run("learn", "--db", db_url, "--model", toy_model_dir)
    assert result.exit_code == 0, result.output
    with db.read() as s:
        probe = s.scalars(select(ModelVersion).where(ModelVersion.kind == "probe")).one()
        held = s.scalar(select(func.count()).where(Prediction.model_version_id == probe.id))
    assert held == 120  # 80 reviewed, out of fold, and 40 others: it said "stored 40"
    assert f"{probe.name} holds {held} predictions (80 reviewed" in result.output


def clean_env(home: Path) -> dict:
    import os

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABELASSIST_", "LABEL_STUDIO_")) and k != "CI"}
    return {**env, "HOME": str(home), "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": "",
            "XDG_DATA_HOME": ""}


def test_predict_on_openvino_writes_nothing_outside_the_workspace_and_cache(
        tiny_clip_dir, photo_dir, labels_file, tmp_path):
    """OpenVINO's telemetry wrote ~/intel/openvino_ga_cid on every import (issue 32)."""
    import subprocess
    import sys

    from .ci import require

    require("openvino")
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(home)
    db = tmp_path / "ws" / "labelassist.db"
    db.parent.mkdir()
    cli = [str(Path(sys.executable).parent / "labelassist")]
    for args in (["ingest", str(photo_dir), "--db", str(db)],
                 ["predict", "--labels", str(labels_file), "--model", str(tiny_clip_dir),
                  "--dtype", "ov-fp32", "--db", str(db)]):
        done = subprocess.run(cli + args, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-c", "from labelassist.model.openvino import "
                           "require_nncf; require_nncf()"], env=env, timeout=300,
                          capture_output=True, text=True)  # int8 calibration's import
    assert done.returncode == 0, done.stderr
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())
    assert not [p for p in written if not p.startswith(".cache/")], written


def interrupt_after_progress(args: list[str], env: dict, marker: str):
    """Start `labelassist ARGS` in its own session, and Ctrl-C it (SIGINT to the whole
    process group, as a terminal does) once it has reported progress."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([str(Path(sys.executable).parent / "labelassist"), *args],
                            env={**env, "LABELASSIST_PROGRESS_EVERY": "0"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines = []
    deadline = time.monotonic() + 240
    for line in proc.stderr:
        lines.append(line)
        if marker in line and "/" in line.split(marker, 1)[1][:20]:
            break
        assert time.monotonic() < deadline, "".join(lines)
    # Held still first: on a quiet machine the rest of the run takes about a second, and
    # Ctrl-C must land while it runs. SIGINT waits while the group is stopped.
    os.killpg(proc.pid, signal.SIGSTOP)
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGCONT)
    out, rest = proc.communicate(timeout=120)
    return proc.returncode, "".join(lines) + rest


def test_ctrl_c_on_predict_says_what_was_kept_and_how_to_go_on(toy_model_dir, tmp_path):
    import re

    toyworld.write_images(tmp_path / "photos", 400, seed=71)
    db = tmp_path / "labelassist.db"
    env = clean_env(tmp_path / "home")
    from labelassist.db import open_database

    ingest(open_database(f"sqlite:///{db}"), [tmp_path / "photos"])
    code, err = interrupt_after_progress(
        ["predict", "--db", str(db), "--labels", str(EXAMPLES / "labels.toml"), "--model",
         str(toy_model_dir), "--batch-size", "8", "--dtype", "fp32"], env, "predict")
    assert code == 130, err
    said = re.search(r"interrupted: ([\d,]+) of ([\d,]+) images predicted and kept", err)
    assert said, err
    assert "labelassist predict" in err.splitlines()[-1] and "again" in err.splitlines()[-1]
    assert "Traceback" not in err
    with open_database(f"sqlite:///{db}").read() as s:
        kept = s.scalar(select(func.count()).select_from(Prediction))
    assert kept >= int(said.group(1).replace(",", "")) > 0 and kept < 400


@pytest.mark.parametrize("greeting", [b"SSH-2.0-OpenSSH_9.2\r\n", b""])
def test_a_port_that_does_not_speak_http_fails_at_once(greeting):
    """--ls-url at an SSH port (or one that hangs up) retried for 28 s: it cannot be a
    Label Studio, so the first answer says so (one connection, no retry)."""
    import socket
    import threading

    from labelassist.errors import LabelStudioError
    from labelassist.labelstudio.client import Connection, LabelStudioClient

    server = socket.create_server(("127.0.0.1", 0))
    connections = []

    def answer():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            connections.append(conn)
            conn.recv(65536)
            conn.sendall(greeting)
            conn.close()

    threading.Thread(target=answer, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    retries = []
    client = LabelStudioClient(Connection(url, "a-token-of-sorts"), retries=3,
                               on_retry=retries.append)
    try:
        with pytest.raises(LabelStudioError, match="does not speak HTTP.*--ls-url"):
            client.check_server()
    finally:
        server.close()
    assert len(connections) == 1 and retries == []


def quick_start_lines() -> list[str]:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_the_quick_start_runs_as_printed_offline_with_a_fresh_home(tmp_path):
    """Offline, the Quick start could not work as written: its label file pinned the hub
    model, which beat the environment and the workspace, and nothing named the toy."""
    import shutil
    import subprocess
    import sys

    lines = quick_start_lines()
    assert lines[0].startswith("scripts/setup.sh")  # the install: done once for the suite
    repo = Path(__file__).parent.parent
    shutil.copytree(repo / "examples", tmp_path / "examples")
    env = clean_env(tmp_path / "home")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    script = "set -euo pipefail\n" + "\n".join(lines[1:]) + "\n"
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = list(csv.DictReader(open(tmp_path / "try" / "predictions.csv")))
    assert len(rows) == 200 and rows[0]["model_version"].startswith("toyworld-shipped-")
    right = sum((Path(r["path"]).name.split("_")[0] in toyworld.WARM) == (r["label"] == "warm")
                for r in rows)
    assert right >= 0.95 * len(rows)  # the shipped toy model, not random weights


def test_the_model_is_settled_in_one_order(tmp_path, monkeypatch):
    from labelassist import cli
    from labelassist.labels import DEFAULT_MODEL

    label_file = tmp_path / "labels.toml"
    label_file.write_text('model = "org/pinned"\n[classes]\na = ["a"]\nb = ["b"]\n')
    pinned = load_label_file(label_file)
    monkeypatch.delenv("LABELASSIST_MODEL", raising=False)
    monkeypatch.setattr(cli, "workspace", None)
    assert cli.resolve_model_id(None, None) == DEFAULT_MODEL
    assert cli.resolve_model_id(None, pinned) == "org/pinned"
    ws = type("W", (), {"model": "org/workspace"})()
    monkeypatch.setattr(cli, "workspace", ws)
    assert cli.resolve_model_id(None, pinned) == "org/workspace"
    monkeypatch.setenv("LABELASSIST_MODEL", "org/env")
    assert cli.resolve_model_id(None, pinned) == "org/env"
    assert cli.resolve_model_id("org/flag", pinned) == "org/flag"


def test_the_scripts_say_what_they_install_before_they_do():
    """scripts/test.sh ran apt-get and pip with their output hidden: two silent minutes,
    and nothing said what went into the user's .venv."""
    import subprocess

    repo = Path(__file__).parent.parent
    for script in ("scripts/setup.sh", "scripts/test.sh"):
        args = ["bash", script, "--plan"] + (["test,studio"] if "setup" in script else [])
        done = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        said = done.stderr
        assert f"into {repo / '.venv'}: torch==2.13.0" in said
        assert "labelassist[test,studio]" in said and "label-studio>=" in said, said
        assert "pytest>=" in said and "openvino>=" in said
    assert "lint-imports and pytest" in said
    for script in ("scripts/setup.sh", "scripts/test.sh"):  # and it shows progress as it goes
        text = (repo / script).read_text()
        assert " -qq " not in text and ">/dev/null\n" not in text and "pip install -q" not in text


def test_serve_names_the_version_that_reached_label_studio(db, tiny_model, photo_dir,
                                                          labels_file, tmp_path):
    """After `learn` stored a probe that was never pushed, serve's status said it showed
    that probe: Label Studio had only ever been sent the zero-shot version."""
    from labelassist.db.models import LSPrediction, LSProject, LSTask
    from labelassist.labelstudio.client import Connection, LabelStudioClient
    from labelassist.serve.backend import Backend

    ingest(db, [photo_dir])
    pushed = predict(db, tiny_model, load_label_file(labels_file)).model_version
    other = tmp_path / "other.toml"
    other.write_text(labels_file.read_text().replace('"grey"', '"grey", "silver"'))
    stored_only = predict(db, tiny_model, load_label_file(other)).model_version
    with db.write() as s:
        version = s.scalars(select(ModelVersion).where(ModelVersion.name == pushed)).one()
        project = LSProject(url="http://127.0.0.1:9", ls_project_id=1, title="t",
                            classes=list(version.label_set["classes"]), image_mode="local")
        s.add(project)
        s.flush()
        for n, image_id in enumerate(s.scalars(select(Prediction.image_id).where(
                Prediction.model_version_id == version.id))):
            task = LSTask(project_id=project.id, image_id=image_id, ls_task_id=n + 1)
            s.add(task)
            s.flush()
            s.add(LSPrediction(task_id=task.id, model_version_id=version.id))
        s.expunge(project)
    backend = Backend(db, LabelStudioClient(Connection("http://127.0.0.1:9", "t0ken-x")),
                      project, load_model=None, fetch_dir=tmp_path / "fetched")
    assert stored_only != pushed
    assert backend.status.model_version == pushed
