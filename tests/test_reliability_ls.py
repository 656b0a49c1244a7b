"""Defects from the hostile review that involve Label Studio: against the real server, or,
where a real server cannot misbehave that way, against tests/hostile_server.py."""

import os
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest
from sqlalchemy import func, select

from labelassist.labels import parse_label_text
from labelassist.db.models import Annotation, Image, LSProject, LSTask
from labelassist.errors import LabelStudioError
from labelassist.ingest import ingest
from labelassist.labelstudio import ImageSource, choice_result, list_remote_tasks, pull, push
from labelassist.labelstudio.client import Connection, LabelStudioClient, resolve_connection
from labelassist.predict.run import predict
from labelassist.trust.reviews import load_reviews

from .hostile_server import JSON, HostileServer
from .imagegen import shape_image, write_shape_images
from .test_labelstudio import LABELS, annotate, other, predicted, predicted_label

pytestmark = pytest.mark.labelstudio


@pytest.fixture
def client(label_studio):
    c = LabelStudioClient(Connection(label_studio.url, label_studio.token), retries=1)
    yield c
    c.close()


def count(db, model, *where):
    with db.read() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


# 1. Concurrent pushes must not import tasks twice (nor make two projects).
@pytest.mark.slow
@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_two_pushes_at_once_make_one_project_and_one_task_per_image(
        tmp_path, tiny_clip_dir, label_studio, request, database):
    photos = label_studio.root / f"concurrent-{os.getpid()}-{database}"
    write_shape_images(photos, 40)
    url = f"sqlite:///{tmp_path / 'push.db'}" if database == "sqlite" else \
        request.getfixturevalue("pg_url")
    labels = tmp_path / "labels.toml"
    labels.write_text(LABELS)
    env = {**os.environ, "LABELASSIST_DB": url, "HF_HUB_OFFLINE": "1",
           "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token}
    cli = [sys.executable, "-m", "labelassist.cli"]
    subprocess.run(cli + ["run", str(photos), "--labels", str(labels), "--model",
                          str(tiny_clip_dir)], env=env, check=True, capture_output=True)
    title = f"race {database} {os.getpid()} {request.node.name}"[:50]
    push_cmd = cli + ["push", "--project", title, "--batch-size", "5", "--ls-root",
                      str(label_studio.root)]
    procs = [subprocess.Popen(push_cmd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results

    client = LabelStudioClient(Connection(label_studio.url, label_studio.token))
    projects = [p for p in client.sdk.projects.list(title=title) if p.title == title]
    assert len(projects) == 1
    tasks = list_remote_tasks(client, projects[0].id)
    assert len(tasks) == 40 and len({t["data"]["sha256"] for t in tasks}) == 40
    from labelassist.db import open_database

    assert count(open_database(url), LSTask) == 40


# 2. An annotation changed while a multi-page pull runs is seen by the next pull.
def test_a_change_made_during_a_paged_pull_is_not_skipped(db, tiny_model, ls_photos, client,
                                                          label_studio, request):
    summary = push(db, client, predicted(db, tiny_model, ls_photos),
                   ImageSource("local", label_studio.root), title=request.node.name)
    tasks = sorted(list_remote_tasks(client, summary.project_id), key=lambda t: t["id"])
    first, last = tasks[0], tasks[-1]
    fix_me = annotate(client, first, predicted_label(first))
    annotate(client, last, predicted_label(last))
    changed = {}

    def during_the_pull(done, total):  # called after each page of 5
        if done == 5 and not changed:
            changed["fix"] = client.sdk.annotations.update(
                id=fix_me.id, result=choice_result(other(predicted_label(first))))
            time.sleep(1.5)  # the later change is well past the pull's old 1 s overlap
            client.sdk.annotations.create(id=last["id"], result=choice_result(
                other(predicted_label(last))))

    pull(db, client, page_size=5, on_progress=during_the_pull)
    assert changed
    pull(db, client)
    with db.read() as s:
        row = s.scalars(select(Annotation).where(Annotation.ls_annotation_id == fix_me.id)).one()
    assert row.label == other(predicted_label(first))


# 5. Push goes on after an image is edited and re-ingested (its old prediction has no file).
def test_push_skips_predictions_of_images_that_have_no_file_left(db, tiny_model, ls_photos,
                                                                 client, label_studio, request):
    version = predicted(db, tiny_model, ls_photos)
    edited = next(ls_photos.rglob("img_0004.jpg"))
    shape_image(999).save(edited)  # new content at the same path
    ingest(db, [ls_photos])
    predict(db, tiny_model, parse_label_text(LABELS))

    summary = push(db, client, version, ImageSource("local", label_studio.root),
                   title=request.node.name)
    assert summary.tasks_created == 12  # 11 unchanged + the edited path's new content
    assert summary.skipped_no_file == 1
    again = push(db, client, version, ImageSource("local", label_studio.root),
                 title=request.node.name)
    assert again.tasks_created == 0 and again.skipped_no_file == 1


# 6. A task deleted in Label Studio takes its labels with it.
def test_a_task_deleted_in_label_studio_no_longer_counts(db, tiny_model, ls_photos, client,
                                                         label_studio, request):
    summary = push(db, client, predicted(db, tiny_model, ls_photos),
                   ImageSource("local", label_studio.root), title=request.node.name)
    tasks = list_remote_tasks(client, summary.project_id)
    annotate(client, tasks[0], predicted_label(tasks[0]))
    annotate(client, tasks[1], predicted_label(tasks[1]))
    assert pull(db, client).new == 2
    client.sdk.tasks.delete(id=tasks[0]["id"])

    after = pull(db, client)
    assert after.deleted == 1 and after.tasks_gone == 1
    reviews = load_reviews(db, "majority")
    with db.read() as s:
        gone = s.scalar(select(LSTask.image_id).where(LSTask.ls_task_id == tasks[0]["id"]))
    assert gone not in reviews.labels and len(reviews.labels) == 1
    assert pull(db, client).deleted == 0  # once


# 9. Re-reading the labeling config must not corrupt it.
def test_classes_with_quotes_and_tabs_survive_every_push(db, tiny_model, ls_photos, client,
                                                         label_studio, request):
    labels = '[classes]\n"say \\"hi\\"" = ["red"]\n"a\\tb" = ["blue"]\n"x & <y>" = ["grey"]\n'
    version = predicted(db, tiny_model, ls_photos, labels)
    source = ImageSource("local", label_studio.root)
    summary = push(db, client, version, source, title=request.node.name)
    config = client.sdk.projects.get(id=summary.project_id).label_config
    for _ in range(2):
        push(db, client, version, source, title=request.node.name)
    after = client.sdk.projects.get(id=summary.project_id).label_config
    assert after == config
    assert choice_values(after) == ['say "hi"', "a\tb", "x & <y>", "other"]


def test_a_customised_config_keeps_its_other_controls(db, tiny_model, ls_photos, client,
                                                      label_studio, request):
    title = request.node.name[:50]
    custom = ('<View>\n  <Image name="image" value="$image"/>\n'
              '  <Choices name="label" toName="image" choice="single">\n'
              '    <Choice value="warm" hotkey="w" alias="W"/>\n'
              '    <Choice value="cool" hotkey="c"/>\n  </Choices>\n'
              '  <TextArea name="notes" toName="image" placeholder="anything odd?"/>\n</View>')
    client.sdk.projects.create(title=title, label_config=custom)
    push(db, client, predicted(db, tiny_model, ls_photos), ImageSource("local", label_studio.root),
         title=title)
    (project,) = [p for p in client.sdk.projects.list(title=title) if p.title == title]
    config = client.sdk.projects.get(id=project.id).label_config
    assert '<TextArea name="notes" toName="image" placeholder="anything odd?"' in config
    assert 'hotkey="w"' in config and 'alias="W"' in config and 'hotkey="c"' in config
    assert choice_values(config) == ["warm", "cool", "plain", "other"]


def choice_values(config: str) -> list[str]:
    import xml.etree.ElementTree as ET

    return [c.get("value") for c in ET.fromstring(config).iter("Choice")]


# 10. A server that reports an inflated total must not make pull loop forever.
def test_pull_stops_when_pages_bring_nothing_new(db, tmp_path):
    page = [task_json(1), task_json(2), task_json(3)]
    with HostileServer({"/api/tasks": lambda q: (200, JSON, {"total": 10 ** 6,
                                                              "tasks": page})}) as server:
        client = ledger_for(db, server.url, tmp_path, tasks=3)
        summary = pull(db, client, full=True)
    assert summary.tasks_seen == 3 and summary.deleted == 0
    # Two listings (the tasks, then their ids to find deleted ones), each ending at the
    # first page that brings nothing new. The code before looped here forever.
    assert server.requests["/api/tasks"] == 4


def test_pull_stops_when_a_server_cycles_through_the_same_pages(db, tmp_path):
    """Pages A, B, A, B, ... under an inflated total: only the last page's ids are kept
    (memory stays flat), so a repeat further back is caught by the pages' fingerprints."""
    pages = [[task_json(1), task_json(2)], [task_json(3), task_json(4)]]

    def cycling(query):
        page = int(query["page"][0])
        return 200, JSON, {"total": 4000, "tasks": pages[(page - 1) % 2]}

    with HostileServer({"/api/tasks": cycling}) as server:
        client = ledger_for(db, server.url, tmp_path, tasks=4)
        summary = pull(db, client, full=True)
    assert summary.tasks_seen == 4
    assert server.requests["/api/tasks"] <= 6  # two listings, each stopped at the repeat


def test_an_annotation_deleted_then_back_counts_again(db, tmp_path):
    """Label Studio cannot undelete through its API, so a server of the test's own shows
    an annotation, then not (deleted), then again (an admin restored it from a backup)."""
    with_it = {"total": 1, "tasks": [task_json(1)]}
    without = {"total": 1, "tasks": [{**task_json(1), "annotations": []}]}
    shown = [with_it]
    with HostileServer({"/api/tasks": lambda q: (200, JSON, shown[0])}) as server:
        client = ledger_for(db, server.url, tmp_path, tasks=1)
        assert pull(db, client, full=True).new == 1
        shown[0] = without
        assert pull(db, client, full=True).deleted == 1
        assert load_reviews(db).labels == {}
        shown[0] = with_it
        back = pull(db, client, full=True)
    assert (back.new, back.updated) == (0, 1)
    (label,) = load_reviews(db).labels.values()
    assert label.label == "warm"


# 11. Tracebacks instead of one-line errors.
def test_html_with_status_200_is_a_clear_error(db, tmp_path):
    html = "<!doctype html><html><body>Sign in</body></html>"
    with HostileServer({"/api/tasks": lambda q: (200, "text/html", html)}) as server:
        client = ledger_for(db, server.url, tmp_path, tasks=1)
        with pytest.raises(LabelStudioError, match="not JSON.*--ls-url"):
            pull(db, client, full=True)


def test_unreadable_timestamps_and_odd_choices_are_handled(db, tmp_path):
    tasks = [task_json(1, updated="yesterday"), task_json(2, choice=42)]
    with HostileServer({"/api/tasks": lambda q: (200, JSON, {"total": 2,
                                                              "tasks": tasks})}) as server:
        client = ledger_for(db, server.url, tmp_path, tasks=2)
        with pytest.raises(LabelStudioError, match="yesterday"):
            pull(db, client, full=True)
        tasks[0] = task_json(1)
        summary = pull(db, client, full=True)
    assert summary.new == 2
    with db.read() as s:
        labels = sorted(s.scalars(select(Annotation.label)).all(), key=str)
    assert labels == ["42", "warm"]


def test_timestamps_with_an_offset_are_stored_in_utc(db, tmp_path):
    tasks = [task_json(1, updated="2026-01-01T12:00:00+02:00")]
    with HostileServer({"/api/tasks": lambda q: (200, JSON, {"total": 1,
                                                              "tasks": tasks})}) as server:
        client = ledger_for(db, server.url, tmp_path, tasks=1)
        assert pull(db, client, full=True).new == 1
        assert pull(db, client, full=True).unchanged == 1  # not "updated" on every pull
    with db.read() as s:
        stamp = s.scalars(select(Annotation.ls_updated_at)).one()
    stamp = stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)
    assert stamp == datetime(2026, 1, 1, 10, 0, tzinfo=timezone.utc)


def test_a_token_with_a_line_break_is_refused_as_such():
    with pytest.raises(LabelStudioError, match="LABEL_STUDIO_API_KEY.*line break"):
        resolve_connection("http://127.0.0.1:1", "abc\r\n")


def task_json(task_id, *, updated="2026-01-01T10:00:00Z", choice="warm"):
    return {"id": task_id, "updated_at": updated, "predictions": [], "annotations": [
        {"id": 100 + task_id, "completed_by": 1, "was_cancelled": False, "lead_time": 1.0,
         "created_at": "2026-01-01T09:00:00Z", "updated_at": updated,
         "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                     "value": {"choices": [choice]}}]}]}


def ledger_for(db, url, tmp_path, *, tasks):
    """A ledger that pushed `tasks` tasks (ids 1..n) to project 1 of the server at `url`."""
    root = tmp_path / "imgs"
    write_shape_images(root, tasks)
    ingest(db, [root])
    with db.write() as s:
        project = LSProject(url=url, ls_project_id=1, title="t", classes=["warm", "cool"],
                            image_mode="local")
        s.add(project)
        s.flush()
        for n, image_id in enumerate(s.scalars(select(Image.id).order_by(Image.id)), start=1):
            s.add(LSTask(project_id=project.id, image_id=image_id, ls_task_id=n))
    return LabelStudioClient(Connection(url, "token"), retries=0)




def test_a_server_that_serves_smaller_pages_is_read_to_the_end(db, tmp_path):
    tasks = [task_json(n) for n in range(1, 6)]

    def two_per_page(query):
        page = int(query["page"][0])
        return 200, JSON, {"total": 5, "tasks": tasks[(page - 1) * 2:page * 2]}

    with HostileServer({"/api/tasks": two_per_page}) as server:
        client = ledger_for(db, server.url, tmp_path, tasks=5)
        summary = pull(db, client, full=True)
    assert (summary.tasks_seen, summary.new, summary.deleted) == (5, 5, 0)


# The client's retries: throttling, server errors and timeouts are waited out, with
# backoff; a server that never recovers gives one clear line.
def answers(*statuses, delay_first: float = 0.0):
    """A route that answers the given statuses in turn, then 200 with a version."""
    calls = []

    def route(query):
        calls.append(time.monotonic())
        if delay_first and len(calls) == 1:
            time.sleep(delay_first)
        status = statuses[len(calls) - 1] if len(calls) <= len(statuses) else 200
        return status, JSON, {"release": "1.23.2"} if status == 200 else {"detail": "busy"}

    return route, calls


def test_throttling_and_server_errors_are_retried_with_backoff():
    route, calls = answers(429, 503, 502)
    with HostileServer({"/api/version": route}) as server:
        client = LabelStudioClient(Connection(server.url, "t"), retries=4)
        assert client.check_server()
    assert len(calls) == 4
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert gaps[0] >= 0.45 and gaps[1] >= 0.9 and gaps[2] >= 1.8  # 0.5 s, doubling


def test_a_timeout_is_retried():
    route, calls = answers(delay_first=1.5)
    with HostileServer({"/api/version": route}) as server:
        client = LabelStudioClient(Connection(server.url, "t"), retries=2, timeout=0.5)
        assert client.check_server()
    assert len(calls) == 2


def test_a_server_that_never_recovers_gives_one_clear_line():
    route, calls = answers(*[503] * 10)
    with HostileServer({"/api/version": route}) as server:
        client = LabelStudioClient(Connection(server.url, "t"), retries=2)
        with pytest.raises(LabelStudioError, match=r"answered 503 .*gave up after 2 retries"):
            client.check_server()
    assert len(calls) == 3


def test_nothing_listening_is_reported_at_once_and_retries_are_shown():
    from labelassist.labelstudio.studio import free_port

    shown = []
    nobody = LabelStudioClient(Connection(f"http://127.0.0.1:{free_port()}", "t"), retries=6,
                               on_retry=shown.append)
    with pytest.raises(LabelStudioError, match="cannot reach Label Studio.*Is it running"):
        nobody.check_server()
    assert shown == []  # a port where nothing listens is not retried for half a minute

    route, calls = answers(503)
    with HostileServer({"/api/version": route}) as server:
        client = LabelStudioClient(Connection(server.url, "t"), retries=4,
                                   on_retry=shown.append)
        assert client.check_server()
    assert len(calls) == 2
    assert shown == [f"Label Studio at {server.url} answered 503 while checking the server; "
                     "retrying in 0.5 s (1 of 4)"]
