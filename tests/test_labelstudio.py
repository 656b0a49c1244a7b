"""Push and pull against a real Label Studio server (started once per test session)."""

import http.server
from pathlib import Path
import threading
import time

import httpx
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from labelassist.cli import app
from labelassist.labels import parse_label_text
from labelassist.db.models import Annotation, LSTask
from labelassist.errors import LabelStudioError
from labelassist.ingest import ingest
from labelassist.labelstudio import (
    ImageSource,
    choice_result,
    list_remote_tasks,
    pull,
    push,
    resolve_image_source,
)
from labelassist.labelstudio.client import Connection, LabelStudioClient, resolve_connection
from labelassist.labelstudio.pull import MARGIN
from labelassist.predict.run import predict
from labelassist.db.queries import resolve_version

pytestmark = pytest.mark.labelstudio

LABELS = '[classes]\nwarm = ["red", "orange"]\ncool = ["blue"]\nplain = ["grey"]\n'


PAST_MARGIN = MARGIN.total_seconds() + 0.5  # a pull looks back MARGIN before the last one


@pytest.fixture
def client(label_studio):
    c = LabelStudioClient(Connection(label_studio.url, label_studio.token), retries=1)
    yield c
    c.close()


def predicted(db, model, photos, labels=LABELS):
    ingest(db, [photos])
    predict(db, model, parse_label_text(labels))
    return resolve_version(db)


def remote_tasks(client, summary):
    return list_remote_tasks(client, summary.project_id)


def test_push_creates_tasks_with_preselected_predictions_and_is_idempotent(
        db, tiny_model, ls_photos, client, label_studio, request):
    version = predicted(db, tiny_model, ls_photos)
    source = ImageSource("local", label_studio.root)

    first = push(db, client, version, source, title=request.node.name)
    again = push(db, client, version, source, title=request.node.name)

    assert (first.tasks_created, again.tasks_created, again.predictions_added) == (12, 0, 0)
    tasks = remote_tasks(client, first)
    assert len(tasks) == 12
    for task in tasks:
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == version.name
        assert 0 < prediction["score"] <= 1
        assert prediction["result"][0]["value"]["choices"][0] in ("warm", "cool", "plain")
    image = httpx.get(label_studio.url + tasks[0]["data"]["image"],
                      headers={"Authorization": f"Token {label_studio.token}"})
    assert image.status_code == 200
    assert image.content == open(tasks[0]["data"]["path"], "rb").read()


def test_second_model_version_adds_predictions_not_tasks(db, tiny_model, ls_photos, client,
                                                         label_studio, request):
    source = ImageSource("local", label_studio.root)
    first = push(db, client, predicted(db, tiny_model, ls_photos), source,
                 title=request.node.name)
    predict(db, tiny_model, parse_label_text(LABELS.replace('"grey"]', '"grey", "white"]')))
    second_version = resolve_version(db)

    second = push(db, client, second_version, source, title=request.node.name)

    assert (second.tasks_created, second.predictions_added) == (0, 12)
    tasks = remote_tasks(client, first)
    assert len(tasks) == 12
    assert all(sorted(p["model_version"] for p in t["predictions"])
               == sorted([first.model_version, second_version.name]) for t in tasks)


def test_new_images_push_only_the_new_tasks(db, tiny_model, ls_photos, client, label_studio,
                                            request):
    from .imagegen import write_shape_images

    source = ImageSource("local", label_studio.root)
    push(db, client, predicted(db, tiny_model, ls_photos), source, title=request.node.name)
    write_shape_images(ls_photos / "more", 5, start=500)
    summary = push(db, client, predicted(db, tiny_model, ls_photos), source,
                   title=request.node.name)
    assert summary.tasks_created == 5 and len(remote_tasks(client, summary)) == 17


def test_upload_mode_sends_the_image_bytes(db, tiny_model, tmp_path, client, label_studio,
                                           request):
    from .imagegen import write_shape_images

    outside = tmp_path / "not-under-the-root"
    write_shape_images(outside, 3)
    summary = push(db, client, predicted(db, tiny_model, outside), ImageSource("upload"),
                   title=request.node.name)
    tasks = remote_tasks(client, summary)
    assert len(tasks) == 3
    for task in tasks:
        assert task["data"]["image"].startswith("/data/upload/")
        got = httpx.get(label_studio.url + task["data"]["image"],
                        headers={"Authorization": f"Token {label_studio.token}"})
        assert got.content == open(task["data"]["path"], "rb").read()


def test_local_mode_refuses_images_outside_the_root(db, tiny_model, tmp_path, client,
                                                   label_studio, request):
    from .imagegen import write_shape_images

    write_shape_images(tmp_path / "elsewhere", 2)
    with pytest.raises(LabelStudioError, match="--image-mode upload") as refused:
        push(db, client, predicted(db, tiny_model, tmp_path / "elsewhere"),
             ImageSource("local", label_studio.root), title=request.node.name)
    # what works: Label Studio started with that folder linked in (a root of its own would
    # get a 400 from Label Studio), or uploads
    import re

    named = Path(re.search(r"labelassist studio --root (\S+?)`", str(refused.value))[1])
    image = Path(str(refused.value).split(" is not inside")[0])
    assert named in image.parents and named != image.parent  # a folder below it holds it


def annotate(client, task, label, *, accept=False, user=None, cancel=False, lead_time=2.5):
    pred = task["predictions"][0]
    return client.sdk.annotations.create(
        id=task["id"], result=[] if cancel else choice_result(label),
        parent_prediction=pred["id"], lead_time=lead_time, was_cancelled=cancel,
        **({"completed_by": user} if user else {}))


def predicted_label(task):
    return task["predictions"][0]["result"][0]["value"]["choices"][0]


def other(label):
    return "cool" if label != "cool" else "warm"


@pytest.mark.slow
def test_reviews_are_pulled_then_updates_and_deletes_arrive_as_deltas(
        db, tiny_model, ls_photos, client, label_studio, request):
    summary = push(db, client, predicted(db, tiny_model, ls_photos),
                   ImageSource("local", label_studio.root), title=request.node.name)
    t = remote_tasks(client, summary)
    time.sleep(PAST_MARGIN)  # so that the untouched tasks fall before the delta pull's window
    second = client.sdk.users.create(username=f"r2-{summary.project_id}",
                                      email=f"r2-{summary.project_id}@example.org")
    accepted = annotate(client, t[0], predicted_label(t[0]), lead_time=1.5)
    changed = annotate(client, t[1], other(predicted_label(t[1])))
    annotate(client, t[2], None, cancel=True)
    annotate(client, t[3], predicted_label(t[3]))
    annotate(client, t[3], other(predicted_label(t[3])), user=second.id)

    first = pull(db, client)

    assert (first.new, first.cancelled, first.deleted) == (5, 1, 0)
    rows = {a.ls_annotation_id: a for a in _annotations(db)}
    assert rows[accepted.id].accepted_prediction is True
    assert rows[accepted.id].label == predicted_label(t[0])
    assert rows[accepted.id].lead_time == 1.5 and rows[accepted.id].annotator
    assert rows[changed.id].accepted_prediction is False
    assert rows[changed.id].label == other(predicted_label(t[1]))
    assert {a.annotator for a in rows.values() if a.image_id == rows[accepted.id].image_id} \
        == {rows[accepted.id].annotator}
    skipped = [a for a in rows.values() if a.cancelled]
    assert len(skipped) == 1 and skipped[0].label is None
    two = [a for a in rows.values() if a.image_id == _image_of(db, t[3]["id"])]
    assert {a.annotator for a in two} == {"admin@localhost", second.email}

    assert pull(db, client).new == 0  # nothing changed: nothing new
    time.sleep(PAST_MARGIN)  # past the window that the next pull looks back over
    client.sdk.annotations.update(id=accepted.id, result=choice_result(
        other(predicted_label(t[0]))))
    client.sdk.annotations.delete(id=changed.id)

    delta = pull(db, client)

    assert (delta.new, delta.updated, delta.deleted) == (0, 1, 1)
    assert delta.tasks_seen <= 4  # the changed tasks (+ the pull's look-back), not all 12
    rows = {a.ls_annotation_id: a for a in _annotations(db)}
    assert rows[accepted.id].label == other(predicted_label(t[0]))
    assert rows[accepted.id].accepted_prediction is False
    assert rows[changed.id].deleted_at is not None


def _annotations(db):
    with db.read() as s:
        return s.scalars(select(Annotation)).all()


def _image_of(db, ls_task_id):
    with db.read() as s:
        return s.scalar(select(LSTask.image_id).where(LSTask.ls_task_id == ls_task_id))


def test_connection_problems_each_give_one_clear_line(label_studio, monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    with pytest.raises(LabelStudioError, match="set LABEL_STUDIO_API_KEY or pass --ls-token"):
        resolve_connection(label_studio.url, None)
    with pytest.raises(LabelStudioError, match=r"refused the token \(401\).*--ls-token"):
        LabelStudioClient(Connection(label_studio.url, "wrong-token"), retries=0).check_server()
    from labelassist.labelstudio.studio import free_port

    with pytest.raises(LabelStudioError, match="cannot reach Label Studio.*Is it running"):
        LabelStudioClient(Connection(f"http://127.0.0.1:{free_port()}", "t"),
                          retries=1).check_server()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(LabelStudioError, match="does not look like Label Studio"):
            LabelStudioClient(Connection(f"http://127.0.0.1:{server.server_port}", "t"),
                              retries=0).check_server()
    finally:
        server.shutdown()


def test_cli_push_and_pull_with_env_connection(db_url, tiny_clip_dir, ls_env, ls_photos,
                                               tmp_path, request):
    runner = CliRunner()
    labels = tmp_path / "labels.toml"
    labels.write_text(LABELS)
    assert runner.invoke(app, ["run", str(ls_photos), "--labels", str(labels), "--model",
                               str(tiny_clip_dir), "--db", db_url]).exit_code == 0
    result = runner.invoke(app, ["push", "--db", db_url, "--project", request.node.name[:40]])
    assert result.exit_code == 0, result.output
    assert "12 tasks created" in result.output
    assert ls_env.token not in result.output
    pulled = runner.invoke(app, ["pull", "--db", db_url])
    assert pulled.exit_code == 0 and "0 new annotations" in pulled.output
    wrong = runner.invoke(app, ["push", "--db", db_url, "--ls-token", "nope"])
    assert wrong.exit_code == 1
    assert wrong.output.strip().splitlines()[-1].startswith("error: Label Studio refused the "
                                                             "token (401)")


def test_cli_push_flags_pull_full_and_a_hand_made_task(db_url, db, tiny_clip_dir, ls_env,
                                                      ls_photos, tmp_path, request):
    runner = CliRunner()
    labels = tmp_path / "labels.toml"
    labels.write_text(LABELS)
    assert runner.invoke(app, ["run", str(ls_photos), "--labels", str(labels), "--model",
                               str(tiny_clip_dir), "--db", db_url]).exit_code == 0
    version = resolve_version(db).name
    client = LabelStudioClient(Connection(ls_env.url, ls_env.token), retries=1)
    title = f"{request.node.name} and a title well over fifty characters long"
    projects_before = {p.id for p in client.sdk.projects.list()}

    for flag, value in (("--order", "sideways"), ("--image-mode", "carrier-pigeon")):
        bad = runner.invoke(app, ["push", "--db", db_url, flag, value, "--project", title])
        assert bad.exit_code == 1 and f"{flag} '{value}'" in bad.output, bad.output
    assert {p.id for p in client.sdk.projects.list()} == projects_before  # nothing made

    pushed = runner.invoke(app, ["push", "--db", db_url, "--version", version, "--image-mode",
                                 "local", "--ls-root", str(ls_env.root), "--order", "confident",
                                 "--batch-size", "4", "--project", title])
    assert pushed.exit_code == 0, pushed.output
    (project,) = [p for p in client.sdk.projects.list() if p.id not in projects_before]
    assert project.title == title[:50]  # Label Studio keeps 50 characters
    tasks = sorted(list_remote_tasks(client, project.id), key=lambda t: t["id"])
    confidence = [t["predictions"][0]["score"] for t in tasks]
    assert len(tasks) == 12 and confidence == sorted(confidence, reverse=True)

    # A new prompt set with one more class: the same project gains the choice.
    labels.write_text(LABELS + 'violet = ["purple"]\n')
    assert runner.invoke(app, ["predict", "--db", db_url, "--labels", str(labels), "--model",
                               str(tiny_clip_dir)]).exit_code == 0
    newer = resolve_version(db).name
    assert newer != version
    again = runner.invoke(app, ["push", "--db", db_url, "--version", newer, "--project", title])
    assert again.exit_code == 0, again.output
    config = client.sdk.projects.get(id=project.id).label_config
    assert [c for c in ("warm", "cool", "plain", "violet") if f'value="{c}"' in config] == \
        ["warm", "cool", "plain", "violet"]

    annotate(client, tasks[0], "warm")
    client.sdk.tasks.create(project=project.id, data={"image": "/data/local-files/?d=x.png"})
    # The second push touched every task: wait until that lies before the look-back of
    # the incremental pull below (which starts from this first pull's start).
    time.sleep(PAST_MARGIN)
    first = runner.invoke(app, ["pull", "--db", db_url])
    assert first.exit_code == 0 and "1 new annotations" in first.output, first.output
    assert "1 task made in Label Studio by hand" in first.output
    incremental = runner.invoke(app, ["pull", "--db", db_url])
    full = runner.invoke(app, ["pull", "--db", db_url, "--full"])
    assert incremental.exit_code == full.exit_code == 0
    # Incremental: at most the two tasks touched (Label Studio may bump a task's
    # updated_at a moment after an annotation); --full: every task, again.
    assert int(incremental.output.split()[0]) <= 2, incremental.output
    assert full.output.startswith("13 tasks read") and "1 unchanged" in full.output


def test_image_mode_auto_picks_local_only_for_a_local_server_with_a_root(monkeypatch):
    for name in ("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "LOCAL_FILES_DOCUMENT_ROOT"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_image_source("auto", "/srv", "http://127.0.0.1:8080").mode == "local"
    assert resolve_image_source("auto", None, "http://127.0.0.1:8080").mode == "upload"
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "/srv")
    assert resolve_image_source("auto", None, "http://localhost:8080").mode == "local"
    assert resolve_image_source("auto", "/srv", "https://ls.example.org").mode == "upload"


def test_push_order_uncertain_sends_the_least_certain_first(db, tiny_model, ls_photos, client,
                                                           label_studio, request):
    from labelassist.db.models import Prediction

    summary = push(db, client, predicted(db, tiny_model, ls_photos),
                   ImageSource("local", label_studio.root), title=request.node.name,
                   order="uncertain", batch_size=4)
    with db.read() as s:
        margin = dict(s.execute(select(LSTask.ls_task_id, Prediction.margin).join(
            Prediction, Prediction.image_id == LSTask.image_id)).all())
    in_task_order = [margin[t["id"]] for t in sorted(remote_tasks(client, summary),
                                                     key=lambda t: t["id"])]
    assert in_task_order == sorted(in_task_order)


def test_push_order_random_is_a_fixed_shuffle_and_the_default(db, tiny_model, ls_photos,
                                                              client, label_studio, request):
    """File names often sort by class: reviews in ingest order are a biased sample, which
    suggest, accept and learn cannot use. The default is the fair shuffle."""
    summary = push(db, client, predicted(db, tiny_model, ls_photos),
                   ImageSource("local", label_studio.root), title=request.node.name,
                   batch_size=4)
    with db.read() as s:
        image_of = dict(s.execute(select(LSTask.ls_task_id, LSTask.image_id)).all())
    in_task_order = [image_of[t["id"]] for t in sorted(remote_tasks(client, summary),
                                                       key=lambda t: t["id"])]
    assert in_task_order == sorted(in_task_order, key=lambda i: i * 2654435761 % 2 ** 32)
    assert in_task_order != sorted(in_task_order)  # not the ingest order


@pytest.mark.slow
def test_worker_push_sends_new_predictions_as_it_goes(db_url, db, tiny_clip_dir, ls_env,
                                                     ls_photos, tmp_path, request):
    import os
    import signal
    import subprocess
    import sys

    labels = tmp_path / "labels.toml"
    labels.write_text('[classes]\nworker_warm = ["red"]\nworker_cool = ["blue"]\n')
    env = {**os.environ, "LABELASSIST_DB": db_url, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "labelassist.cli", "worker", "--labels",
                             str(labels), "--model", str(tiny_clip_dir), "--poll", "0.3",
                             "--push", "--device", "cpu"], env=env, stderr=subprocess.PIPE,
                            text=True)
    try:
        ingest(db, [ls_photos])  # someone ingests while the worker waits
        deadline = time.time() + 600  # only against a hang
        while time.time() < deadline:
            with db.read() as s:
                if s.scalar(select(func.count()).select_from(LSTask)) == 12:
                    break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "pushed 12 tasks" in stderr and ls_env.token not in stderr
    client = LabelStudioClient(Connection(ls_env.url, ls_env.token))
    project = next(p for p in client.sdk.projects.list()
                   if p.title == "labelassist: worker_warm / worker_cool")
    assert len(list_remote_tasks(client, project.id)) == 12


def stop_studio_command(proc) -> None:
    """SIGTERM first, so `labelassist studio` stops the Label Studio it started (in a
    session of its own, which a SIGKILL of the command's group would leave running)."""
    import os
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_studio_in_a_workspace_records_itself_so_push_needs_no_flags(tmp_path, tiny_clip_dir,
                                                                     labels_file):
    """The newcomer's path: init, run, studio, push, with no flag and no exported line.
    And `labelassist studio` as a user runs it: its own port and data folder, the lines
    it prints are enough to connect, and SIGTERM stops the server it started."""
    import os
    import signal
    import subprocess
    import sys

    from labelassist.labelstudio.studio import free_port

    from .imagegen import write_shape_images

    ws, data, port = tmp_path / "ws", tmp_path / "data", free_port()
    write_shape_images(ws / "photos", 6)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABEL_STUDIO_", "LABELASSIST_"))}

    def labelassist(*args, **kwargs):
        return subprocess.run([sys.executable, "-m", "labelassist.cli", *map(str, args)],
                              cwd=ws, env=env, capture_output=True, text=True, **kwargs)

    made = labelassist("init", "--labels", labels_file, "--model", tiny_clip_dir)
    assert made.returncode == 0, made.stderr
    assert labelassist("run", "photos").returncode == 0
    before_studio = labelassist("push")
    assert before_studio.returncode == 1
    assert "no Label Studio URL" in before_studio.stderr

    proc = subprocess.Popen([sys.executable, "-m", "labelassist.cli", "studio", "--port",
                             str(port), "--data-dir", str(data)], cwd=ws, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        lines = {}
        for line in proc.stdout:  # ends only if it dies; the first start takes ~40 s
            if line.startswith("export "):
                name, value = line[len("export "):].strip().split("=", 1)
                lines[name] = value
            if "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT" in lines:
                break
        assert lines.get("LABEL_STUDIO_URL") == f"http://127.0.0.1:{port}", proc.stderr.read()
        # the data folder's own document root, which every workspace's folder is linked into
        assert lines["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] == str(data.resolve() / "files")
        client = LabelStudioClient(Connection(lines["LABEL_STUDIO_URL"],
                                              lines["LABEL_STUDIO_API_KEY"]), retries=1)
        assert client.check_server()
        assert (data / "label_studio.sqlite3").exists()  # its database lives in --data-dir
        recorded = (ws / "labelassist.toml").read_text()
        assert f'ls_url = "http://127.0.0.1:{port}"' in recorded
        token = next(line for line in (data / "labelassist-token").read_text().splitlines())
        assert "ls_token_file" in recorded and token not in recorded  # where, never what

        pushed = labelassist("push", timeout=300)

        assert pushed.returncode == 0, pushed.stderr
        assert "6 tasks created" in pushed.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        with pytest.raises(LabelStudioError, match="cannot reach"):
            client.check_server()
    finally:
        stop_studio_command(proc)


@pytest.mark.slow
def test_reviews_from_a_real_label_studio_flow_into_audit_learn_accept_and_export(
        db_url, db, toy_model_dir, ls_env, tmp_path, request):
    """The whole loop with nothing faked: reviews are made in Label Studio through its API,
    come back through `pull`, and drive report, learn, accept and export."""
    import json
    import random

    from labelassist.toy import world as toyworld
    photos = ls_env.root / "loop"
    toyworld.write_images(photos, 90, seed=31)
    vague = tmp_path / "vague.toml"
    vague.write_text('templates = ["a photo of a {} thing."]\n[classes]\n'
                     'warm = ["warm colour"]\ncool = ["cool colour"]\n')
    runner = CliRunner()
    ran = runner.invoke(app, ["run", str(photos), "--labels", str(vague), "--model",
                              str(toy_model_dir), "--db", db_url])
    assert ran.exit_code == 0, ran.output
    pushed = runner.invoke(app, ["push", "--db", db_url, "--project", request.node.name[:40]])
    assert pushed.exit_code == 0 and "90 tasks created" in pushed.output, pushed.output

    client = LabelStudioClient(Connection(ls_env.url, ls_env.token), retries=1)
    project = next(p for p in client.sdk.projects.list()
                   if p.title == request.node.name[:40])
    tasks = sorted(list_remote_tasks(client, project.id), key=lambda t: t["id"])
    truth = {}
    # Reviewers give the true colour temperature of a random sample (tasks follow the
    # file names, which sort by colour: the first 60 would leave whole colours unseen).
    for task in random.Random(0).sample(tasks, 60):
        colour = task["data"]["path"].rsplit("/", 1)[-1].split("_")[0]
        truth[task["data"]["path"]] = "warm" if colour in toyworld.WARM else "cool"
        annotate(client, task, truth[task["data"]["path"]])

    pulled = runner.invoke(app, ["pull", "--db", db_url])
    assert pulled.exit_code == 0 and "60 new annotations" in pulled.output, pulled.output
    report = runner.invoke(app, ["report", "--db", db_url, "--json", str(tmp_path / "r.json")])
    assert report.exit_code == 0, report.output
    audit = json.loads((tmp_path / "r.json").read_text())
    assert audit["reviewed"] == 60
    real = sum(truth[d["path"]] != d["predicted"] for d in audit["disagreements"])
    assert real == len(audit["disagreements"])  # each one the model really got wrong

    learned = runner.invoke(app, ["learn", "--db", db_url, "--model", str(toy_model_dir)])
    assert learned.exit_code == 0 and " holds 90 predictions (60 reviewed" in learned.output, \
        learned.output
    probe = resolve_version(db).name
    to_probe = runner.invoke(app, ["push", "--db", db_url, "--version", probe, "--project",
                                   request.node.name[:40]])
    assert to_probe.exit_code == 0, to_probe.output
    assert "0 tasks created" in to_probe.output  # the probe's labels join the same tasks
    after = list_remote_tasks(client, project.id)
    assert sum(probe in {p["model_version"] for p in t["predictions"]} for t in after) >= 30
    accepted = runner.invoke(app, ["accept", "--db", db_url, "--target-precision", "0.9",
                                   "--min-support", "10", "--rule", "class"])
    assert accepted.exit_code == 0, accepted.output
    exported = runner.invoke(app, ["export", str(tmp_path / "out"), "--db", db_url,
                                   "--include-auto", "--target-precision", "0.9",
                                   "--min-support", "10", "--rule", "class"])
    assert exported.exit_code == 0, exported.output
    rows = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text()
            .splitlines()]
    human = [r for r in rows if r["source"] == "human"]
    assert len(human) == 60 and all(r["label"] == truth[r["path"]] for r in human)
    assert all(r["annotators"] == ["admin@localhost"] for r in human)
    auto = [r for r in rows if r["source"] == "auto"]
    assert auto and all(r["model_version"].startswith("probe@") for r in auto)
    right = sum(("warm" if r["path"].rsplit("/", 1)[-1].split("_")[0] in toyworld.WARM
                 else "cool") == r["label"] for r in auto)
    assert right / len(auto) >= 0.9


@pytest.mark.slow
def test_junk_goes_to_reviewers_first_and_their_other_comes_back(db_url, db, toy_model_dir,
                                                                 ls_env, tmp_path, request):
    """None of these, through a real Label Studio: the project offers `other`, the junk
    becomes the first tasks with --order flagged, and reviewers' `other` comes back through
    pull into the report and out of the export."""
    import json

    from labelassist.toy import world as toyworld
    from labelassist.db.models import Prediction
    from labelassist.trust.outofset import class_bars, flagged
    from labelassist.db.queries import first_paths

    photos = ls_env.root / "junky"
    toyworld.write_images(photos, 40, seed=51)
    toyworld.write_junk(photos / "zz-junk", 6, seed=52)  # ingested last
    members = tmp_path / "labels.toml"
    members.write_text('templates = ["a photo of a {} thing."]\n[classes]\n'
                       'warm = ["red", "orange", "yellow"]\ncool = ["green", "blue", "purple"]\n')
    runner = CliRunner()
    title = request.node.name[:40]
    assert runner.invoke(app, ["run", str(photos), "--labels", str(members), "--model",
                               str(toy_model_dir), "--db", db_url]).exit_code == 0
    pushed = runner.invoke(app, ["push", "--db", db_url, "--project", title, "--order",
                                 "flagged"])
    assert pushed.exit_code == 0 and "46 tasks created" in pushed.output, pushed.output

    client = LabelStudioClient(Connection(ls_env.url, ls_env.token), retries=1)
    project = next(p for p in client.sdk.projects.list() if p.title == title)
    assert '<Choice value="other"/>' in client.sdk.projects.get(id=project.id).label_config
    tasks = sorted(list_remote_tasks(client, project.id), key=lambda t: t["id"])
    with db.read() as s:
        rows = s.execute(select(Prediction.image_id, Prediction.label, Prediction.similarity)
                         ).all()
        paths = first_paths(s, [r[0] for r in rows])
    bars = class_bars(db, resolve_version(db))
    odd = {paths[i] for i, label, sim in rows if flagged(label, sim, bars)}
    is_odd = [t["data"]["path"] in odd for t in tasks]
    assert is_odd == sorted(is_odd, reverse=True)  # reviewers meet the flagged ones first
    # the default order leaves them in their place in the fair shuffle
    fair_title = title[:35] + " fair"
    assert runner.invoke(app, ["push", "--db", db_url, "--project", fair_title]).exit_code == 0
    fair_project = next(p for p in client.sdk.projects.list() if p.title == fair_title)
    in_order = [t["data"]["path"] for t in sorted(list_remote_tasks(client, fair_project.id),
                                                  key=lambda t: t["id"])]
    assert sorted(in_order) == sorted(t["data"]["path"] for t in tasks)
    fair_odd = [path in odd for path in in_order]
    assert fair_odd != sorted(fair_odd, reverse=True) and sum(fair_odd) == sum(is_odd)
    junk = [t for t in tasks if "/zz-junk/" in t["data"]["path"]]
    assert len(junk) == 6 and all(t["data"]["path"] in odd for t in junk)
    assert len(odd) <= 6 + 2  # and few real pictures among them (here 40)
    for task in junk:
        annotate(client, task, "other")

    assert runner.invoke(app, ["pull", "--db", db_url]).exit_code == 0
    report = runner.invoke(app, ["report", "--db", db_url, "--json", str(tmp_path / "r.json")])
    assert report.exit_code == 0, report.output
    (section,) = json.loads((tmp_path / "r.json").read_text())["out_of_set"]
    assert (section["flagged_reviewed"], section["flagged_reviewed_other"]) == (6, 6)
    exported = runner.invoke(app, ["export", str(tmp_path / "out"), "--db", db_url,
                                   "--format", "csv"])
    assert exported.exit_code == 1, exported.output  # six reviews, all "other"
    assert "nothing to export" in exported.output
    assert "6 reviewed as 'other' (none of the classes)" in exported.output
