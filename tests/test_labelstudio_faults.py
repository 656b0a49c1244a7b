"""Interrupted pushes against a real Label Studio: nothing lost, nothing duplicated."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from sqlalchemy import func, select

from labelassist.labels import parse_label_text
from labelassist.db.models import LSPushJournal, LSTask
from labelassist.ingest import ingest
from labelassist.labelstudio import ImageSource, list_remote_tasks, push
from labelassist.labelstudio.client import Connection, LabelStudioClient
from labelassist.predict.run import predict
from labelassist.db.queries import resolve_version
from labelassist.labelstudio.studio import free_port, start_studio

from .imagegen import write_shape_images

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]  # each starts its own server
# The module, not the function of the same name that labelassist.labelstudio re-exports.
ls = importlib.import_module("labelassist.labelstudio.push")
LABELS = '[classes]\nwarm = ["red", "orange"]\ncool = ["blue"]\n'


def count(db, model):
    with db.read() as s:
        return s.scalar(select(func.count()).select_from(model))


def assert_one_task_and_one_prediction_per_image(client, project_id, n_images):
    tasks = list_remote_tasks(client, project_id)
    shas = Counter(t["data"]["sha256"] for t in tasks)
    assert len(tasks) == n_images and set(shas.values()) == {1}
    assert all(len(t["predictions"]) == 1 for t in tasks)


def test_crash_between_import_and_commit_is_reconciled(db, tiny_model, label_studio,
                                                       monkeypatch, request):
    photos = label_studio.root / "crash_window"
    write_shape_images(photos, 30)
    ingest(db, [photos])
    predict(db, tiny_model, parse_label_text(LABELS))
    version = resolve_version(db)
    client = LabelStudioClient(Connection(label_studio.url, label_studio.token), retries=1)
    source = ImageSource("local", label_studio.root)
    real_record = ls.record_tasks
    calls = []

    def die_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # Label Studio has the batch; we die before writing it down
            raise KeyboardInterrupt
        return real_record(*args, **kwargs)

    monkeypatch.setattr(ls, "record_tasks", die_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        push(db, client, version, source, title=request.node.name, batch_size=10)
    monkeypatch.setattr(ls, "record_tasks", real_record)
    assert count(db, LSTask) == 10 and count(db, LSPushJournal) == 1

    summary = push(db, client, version, source, title=request.node.name, batch_size=10)

    assert (summary.recovered, summary.tasks_created) == (10, 10)
    assert count(db, LSTask) == 30 and count(db, LSPushJournal) == 0
    assert_one_task_and_one_prediction_per_image(client, summary.project_id, 30)


def test_label_studio_killed_mid_push_and_before_a_pull_then_restarted(tmp_path, db_url, db,
                                                                      tiny_clip_dir):
    """One server, two outages (each restart is a Label Studio start, the suite's dearest
    step). Killed mid-push: the push fails in one line, and the next one completes with
    one task per image. Killed before a pull: the pull fails in one line and stores
    nothing, and the pull after the restart stores every review."""
    from labelassist.db.models import Annotation
    from labelassist.errors import LabelStudioError
    from labelassist.labelstudio import choice_result, pull

    port, root, data = free_port(), tmp_path / "root", tmp_path / "ls-data"
    photos = root / "photos"
    write_shape_images(photos, 150)
    studio = start_studio(port, root, data)
    try:
        labels = tmp_path / "labels.toml"
        labels.write_text(LABELS)
        env = {**os.environ, "LABELASSIST_DB": db_url, "LABEL_STUDIO_URL": studio.url,
               "LABEL_STUDIO_API_KEY": studio.token, "LABELASSIST_LS_RETRIES": "2",
               "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(studio.root), "HF_HUB_OFFLINE": "1"}
        cli = [sys.executable, "-m", "labelassist.cli"]
        subprocess.run(cli + ["run", str(photos), "--labels", str(labels), "--model",
                              str(tiny_clip_dir)], env=env, check=True, capture_output=True)
        pusher = subprocess.Popen(cli + ["push", "--batch-size", "5", "--project", "outage"],
                                  env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600  # only against a hang: a loaded machine is slow
        while count(db, LSTask) < 20 and pusher.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        # Frozen while the server dies, so the kill lands mid-push however fast it runs.
        pusher.send_signal(signal.SIGSTOP)
        assert pusher.poll() is None and 20 <= count(db, LSTask) < 150
        os.killpg(studio.process.pid, signal.SIGKILL)  # the server dies mid-push
        studio.process.wait()
        pusher.send_signal(signal.SIGCONT)
        _, stderr = pusher.communicate(timeout=600)
        assert pusher.returncode == 1, stderr
        assert stderr.strip().splitlines()[-1].startswith("error: ")
        assert "Traceback" not in stderr
        assert 20 <= count(db, LSTask) < 150

        studio = start_studio(port, root, data)  # same data dir: Label Studio comes back
        again = subprocess.run(cli + ["push", "--batch-size", "50", "--project", "outage"],
                               env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        client = LabelStudioClient(Connection(studio.url, studio.token), retries=1)
        project_id = next(p.id for p in client.sdk.projects.list() if p.title == "outage")
        assert_one_task_and_one_prediction_per_image(client, project_id, 150)
        assert count(db, LSTask) == 150 and count(db, LSPushJournal) == 0

        for task in list_remote_tasks(client, project_id)[:20]:
            client.sdk.annotations.create(id=task["id"], result=choice_result("warm"))
        os.killpg(studio.process.pid, signal.SIGKILL)
        studio.process.wait()
        with pytest.raises(LabelStudioError, match="cannot reach Label Studio"):
            pull(db, client)
        assert count(db, Annotation) == 0  # nothing half-stored
        studio = start_studio(port, root, data)
        client = LabelStudioClient(Connection(studio.url, studio.token), retries=1)
        assert pull(db, client).new == 20 and count(db, Annotation) == 20
    finally:
        studio.stop()


def test_token_never_reaches_database_logs_report_or_export(tmp_path, db_url, tiny_clip_dir,
                                                           label_studio):
    from typer.testing import CliRunner

    from labelassist.cli import app

    photos = label_studio.root / "secrets"
    write_shape_images(photos, 6)
    labels = tmp_path / "labels.toml"
    labels.write_text(LABELS)
    runner = CliRunner()
    env = {"LABELASSIST_DB": db_url, "LABEL_STUDIO_URL": label_studio.url,
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(label_studio.root)}
    token = ["--ls-token", label_studio.token]
    results = [runner.invoke(app, ["run", str(photos), "--labels", str(labels), "--model",
                                   str(tiny_clip_dir)], env=env),
               runner.invoke(app, ["push", "--project", "secrets"] + token, env=env)]
    client = LabelStudioClient(Connection(label_studio.url, label_studio.token))
    project = next(p for p in client.sdk.projects.list() if p.title == "secrets")
    from labelassist.labelstudio import choice_result

    for task in list_remote_tasks(client, project.id):
        client.sdk.annotations.create(id=task["id"], result=choice_result("warm"))
    results.append(runner.invoke(app, ["pull"] + token, env=env))
    results.append(runner.invoke(app, ["report", "--json", str(tmp_path / "r.json"), "--html",
                                       str(tmp_path / "r.html")], env=env))
    results.append(runner.invoke(app, ["export", str(tmp_path / "out")], env=env))
    for result in results:  # every step really ran: the scan below reads what they wrote
        assert result.exit_code == 0, result.output
    assert "6 new" in results[2].output
    assert json.loads((tmp_path / "r.json").read_text())["versions"][0]["reviewed"] == 6
    written = sorted((tmp_path / "out").rglob("*.png")) + sorted((tmp_path / "out").rglob("*.jpg"))
    assert len(written) == 6 and (tmp_path / "out" / "manifest.jsonl").is_file()
    secret = label_studio.token.encode()
    assert all(label_studio.token not in result.output for result in results)
    assert secret not in repr(client.conn).encode()
    db_file = db_url.removeprefix("sqlite:///")
    for path in [db_file, db_file + "-wal", tmp_path / "r.json", tmp_path / "r.html",
                 *(tmp_path / "out").rglob("*")]:
        if os.path.isfile(path):
            assert secret not in open(path, "rb").read(), path
