"""A Label Studio project that other people use: they delete tasks, import their own, edit
files on disk, and pull runs beside serve. Against the session's real Label Studio (on
SQLite, which hands a deleted newest task's id to the next task made in the project)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import select
from typer.testing import CliRunner

from labelassist.cli import app
from labelassist.labels import parse_label_text
from labelassist.db.models import Annotation, File, Image, LSTask
from labelassist.ingest import ingest
from labelassist.labelstudio import ImageSource, choice_result, list_remote_tasks, pull, push
from labelassist.labelstudio.client import Connection, LabelStudioClient
from labelassist.predict.run import predict

from .test_labelstudio import LABELS, predicted

pytestmark = pytest.mark.labelstudio
runner = CliRunner()


@pytest.fixture
def client(label_studio):
    c = LabelStudioClient(Connection(label_studio.url, label_studio.token), retries=1)
    yield c
    c.close()


@pytest.fixture
def pushed(db, tiny_model, ls_photos, client, label_studio, request):
    version = predicted(db, tiny_model, ls_photos)
    summary = push(db, client, version, ImageSource("local", label_studio.root),
                   title=request.node.name[:50])
    return summary


def local_task_image(client, project_id: int, label_studio, path: Path) -> dict:
    """A task that a team member imports by hand (no sha256, no path: just the picture)."""
    rel = path.resolve().relative_to(label_studio.root.resolve()).as_posix()
    url = f"/data/local-files/?d={rel}"
    client.http.post(f"/api/projects/{project_id}/import", json=[{"image": url}]) \
        .raise_for_status()
    return next(t for t in list_remote_tasks(client, project_id) if t["data"]["image"] == url)


def blue_square(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new("RGB", (64, 64), (10, 20, 230)).save(path)
    return path


def annotate(client, task_id: int, label: str) -> int:
    return client.sdk.annotations.create(id=task_id, result=choice_result(label)).id


def image_of_task(db, ls_task_id: int) -> int | None:
    with db.read() as s:
        return s.scalar(select(LSTask.image_id).where(LSTask.ls_task_id == ls_task_id))


def live_reviews(db) -> list[Annotation]:
    with db.read() as s:
        return s.scalars(select(Annotation).where(Annotation.deleted_at.is_(None))).all()


def predicted_again(db, model):
    """A second prompt set: a new model_version for the same images."""
    from labelassist.db.queries import resolve_version

    predict(db, model, parse_label_text(LABELS.replace('"grey"]', '"grey", "white"]')))
    return resolve_version(db)


def serve_backend(db, server, tmp_path, task: dict | None = None, reviews: list[int] = ()):
    """An in-process serve backend whose Label Studio is the test's own server, with one
    project and (optionally) one task of ours, with its image and reviews."""
    from labelassist.db.models import LSProject
    from labelassist.serve.backend import Backend

    with db.write() as s:
        project = LSProject(url=server.url, ls_project_id=1, title="p", classes=["warm"],
                            image_mode="upload")
        s.add(project)
        s.flush()
        if task is not None:
            sha = task["data"]["sha256"]
            image = Image(sha256=sha, size_bytes=1, width=1, height=1)
            s.add(image)
            s.flush()
            s.add(LSTask(project_id=project.id, image_id=image.id, ls_task_id=task["id"],
                         image_key=f"sha256:{sha}"))
            s.add_all([Annotation(project_id=project.id, ls_annotation_id=n,
                                  image_id=image.id, label="warm") for n in reviews])
        s.flush()
        s.expunge(project)
    client = LabelStudioClient(Connection(server.url, "token"), retries=0)
    return Backend(db, client, project, load_model=None, fetch_dir=tmp_path, learn_every=0,
                   log=lambda line: None)


def reuse_newest_task_id(client, pushed, label_studio, ls_photos) -> tuple[dict, dict]:
    """Delete the newest task, import a picture by hand: Label Studio gives it the id."""
    tasks = list_remote_tasks(client, pushed.project_id)
    newest = max(tasks, key=lambda t: t["id"])
    client.http.delete(f"/api/tasks/{newest['id']}").raise_for_status()
    theirs = local_task_image(client, pushed.project_id, label_studio,
                              blue_square(ls_photos / "theirs" / "blue.png"))
    assert theirs["id"] == newest["id"]  # the Label Studio fact this file is about
    return newest, theirs


def test_a_review_of_a_task_that_reused_an_id_never_lands_on_the_old_image(
        db, db_url, pushed, client, label_studio, ls_photos, tmp_path):
    newest, theirs = reuse_newest_task_id(client, pushed, label_studio, ls_photos)
    old_image = image_of_task(db, newest["id"])
    annotate(client, theirs["id"], "cool")
    kept = min(t["id"] for t in list_remote_tasks(client, pushed.project_id))
    annotate(client, kept, "warm")  # one review of a task of ours, for the export

    summary = pull(db, client)

    assert summary.new == 1 and summary.unknown_tasks == 1
    assert [(a.image_id, a.label) for a in live_reviews(db)] == [
        (image_of_task(db, kept), "warm")]
    assert image_of_task(db, theirs["id"]) is None  # the stale row is forgotten
    out = tmp_path / "out"
    exported = runner.invoke(app, ["export", str(out), "--db", db_url, "--format", "jsonl"])
    assert exported.exit_code == 0, exported.output
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["warm"]
    with db.read() as s:
        old_sha = s.scalar(select(Image.sha256).where(Image.id == old_image))
    assert old_sha not in {r.get("sha256") for r in rows}


def test_a_deleted_task_does_not_stop_a_new_version_and_is_not_made_again(
        db, tiny_model, pushed, client, label_studio):
    tasks = list_remote_tasks(client, pushed.project_id)
    gone = sorted(t["id"] for t in tasks)[3]  # not the newest: its id is not handed out again
    client.http.delete(f"/api/tasks/{gone}").raise_for_status()
    second = predicted_again(db, tiny_model)
    title = client.sdk.projects.get(id=pushed.project_id).title

    summary = push(db, client, second, ImageSource("local", label_studio.root), title=title)

    assert (summary.tasks_created, summary.predictions_added) == (0, 11)
    after = list_remote_tasks(client, pushed.project_id)
    assert len(after) == 11
    assert all(second.name in {p["model_version"] for p in t["predictions"]} for t in after)
    again = push(db, client, second, ImageSource("local", label_studio.root), title=title)
    assert (again.tasks_created, again.predictions_added) == (0, 0)  # not made again


def test_a_new_version_never_lands_on_a_task_that_reused_an_id(
        db, tiny_model, pushed, client, label_studio, ls_photos):
    _, theirs = reuse_newest_task_id(client, pushed, label_studio, ls_photos)
    second = predicted_again(db, tiny_model)
    title = client.sdk.projects.get(id=pushed.project_id).title

    summary = push(db, client, second, ImageSource("local", label_studio.root), title=title)

    assert (summary.tasks_created, summary.predictions_added) == (0, 11)
    mine = {t["id"]: t for t in list_remote_tasks(client, pushed.project_id)}
    assert mine[theirs["id"]]["predictions"] == []  # their picture got nobody's prediction


def test_push_skips_a_file_replaced_since_ingest(db, tiny_model, ls_photos, client,
                                                 label_studio, request):
    version = predicted(db, tiny_model, ls_photos)
    replaced = sorted(ls_photos.rglob("*.png"))[0]
    blue_square(replaced)  # a camera name reused: other pixels at the same path

    summary = push(db, client, version, ImageSource("local", label_studio.root),
                   title=request.node.name[:50])

    tasks = list_remote_tasks(client, summary.project_id)
    assert summary.tasks_created == 11 and len(tasks) == 11
    assert str(replaced) not in {t["data"]["path"] for t in tasks}
    with db.read() as s:
        assert s.scalar(select(File.error).where(File.path == str(replaced))) == "changed"
    ingest(db, [ls_photos])  # read again: its new content is a new image, predicted anew
    predict(db, tiny_model, parse_label_text(LABELS))
    again = push(db, client, version, ImageSource("local", label_studio.root),
                 title=request.node.name[:50])
    assert again.tasks_created == 1
    (task,) = [t for t in list_remote_tasks(client, summary.project_id)
               if t["data"]["path"] == str(replaced)]
    import hashlib

    assert task["data"]["sha256"] == hashlib.sha256(replaced.read_bytes()).hexdigest()


def test_an_older_page_never_undoes_a_newer_review_or_deletes_a_fresh_one(
        db, pushed, client):
    """pull beside serve: a page read before serve stored a change is written after it."""
    from labelassist.db.models import LSProject, utcnow
    from labelassist.labelstudio.pull import PullSummary, store_annotations

    task = list_remote_tasks(client, pushed.project_id)[0]
    first = annotate(client, task["id"], "warm")
    read_at = utcnow()
    old_page = list_remote_tasks(client, pushed.project_id)  # what a slow pull holds
    time.sleep(1.1)  # Label Studio's updated_at has whole-second steps on some builds
    client.sdk.annotations.update(id=first, result=choice_result("cool"))
    second = annotate(client, task["id"], "plain")
    pull(db, client)  # serve's fresh read, stored first
    with db.read() as s:
        project = s.scalars(select(LSProject)).one()

    store_annotations(db, project, old_page, {}, PullSummary(), read_at)  # the stale pull

    reviews = {a.ls_annotation_id: a.label for a in live_reviews(db)}
    assert reviews == {first: "cool", second: "plain"}


@pytest.mark.slow
def test_serve_answers_a_reused_id_from_the_new_tasks_picture_and_adopts_no_made_up_id(
        tmp_path, label_studio, ls_photos, labels_file, tiny_clip_dir):
    import hashlib

    import httpx

    from .test_serve import auth, start_serve, stop

    served = start_serve(tmp_path, label_studio, ls_photos, labels_file, tiny_clip_dir)
    try:
        newest = max(t["id"] for t in served.tasks())
        with served.db.read() as s:
            old_image = s.scalar(select(LSTask.image_id).where(LSTask.ls_task_id == newest))
        served.http.delete(f"/api/tasks/{newest}").raise_for_status()
        blue = blue_square(ls_photos / "theirs" / "blue.png")
        url = "/data/local-files/?d=" + blue.relative_to(label_studio.root).as_posix()
        served.http.post(f"/api/projects/{served.project_id}/import",
                         json=[{"image": url}]).raise_for_status()
        (theirs,) = [t for t in served.tasks() if t["data"]["image"] == url]
        assert theirs["id"] == newest
        made_up = {"id": 2_000_000, "data": {"image": url}}

        answer = httpx.post(served.url + "/predict", headers=auth(), timeout=60, json={
            "tasks": [theirs, made_up], "project": f"{served.project_id}.0"})

        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][1]["result"] == []  # no such task: nothing adopted
        with served.db.read() as s:
            mapped = s.execute(select(LSTask.ls_task_id, Image.sha256).join(
                Image, Image.id == LSTask.image_id).where(
                LSTask.ls_task_id.in_([newest, 2_000_000]))).all()
            old_still_mapped = s.scalar(select(LSTask.id).where(LSTask.image_id == old_image))
        assert mapped == [(newest, hashlib.sha256(blue.read_bytes()).hexdigest())]
        assert old_still_mapped is None
        assert answer.json()["results"][0]["result"]  # predicted from its own picture
    finally:
        stop(served)


def test_one_event_that_always_fails_is_set_aside_and_the_others_go_on(db, tmp_path):
    """A task that Label Studio answers with 500 for ever: a server of the test's own (the
    real one cannot be made to), playing Label Studio for an in-process serve backend."""
    from labelassist.db.models import ReviewEventRecord
    from labelassist.serve.journal import MAX_ATTEMPTS

    from .hostile_server import JSON, HostileServer

    good = {"id": 8, "data": {"sha256": "b" * 64}, "predictions": [], "annotations": [
        {"id": 80, "result": choice_result("warm"), "completed_by": 1,
         "created_at": "2026-12-01T10:00:00Z", "updated_at": "2026-12-01T10:00:00Z"}]}
    routes = {"/api/tasks/7": lambda q: (500, JSON, {"detail": "server error"}),
              "/api/tasks/8": lambda q: (200, JSON, good)}
    with HostileServer(routes) as server:
        backend = serve_backend(db, server, tmp_path, good)
        # As an older serve journaled them: an id no database column can hold, unchecked
        with db.write() as s:
            s.add(ReviewEventRecord(project_id=backend.project.id, action="ANNOTATIONS_DELETED",
                                    tasks=[], orphans=[2**64], expect={}, attempts=0))
        assert backend.event({"action": "ANNOTATIONS_DELETED",
                              "annotations": [{"id": 2**64}]}) == 0  # refused at the door
        backend.event({"action": "ANNOTATION_CREATED", "task": {"id": 7},
                       "annotation": {"id": 70, "task": 7}})
        backend.event({"action": "ANNOTATION_CREATED", "task": {"id": 8},
                       "annotation": {"id": 80, "task": 8}})

        for _ in range(MAX_ATTEMPTS):
            backend.journal.replay()

        assert [(a.ls_annotation_id, a.label) for a in live_reviews(db)] == [(80, "warm")]
        assert backend.journal.pending_events()[0] == []  # nothing left that would block
        assert backend.journal.count_waiting() == (0, 1)  # the 500 one, set aside
        with db.read() as s:
            errors = s.scalars(select(ReviewEventRecord.last_error).where(
                ReviewEventRecord.done_at.is_(None))).all()
        assert len(errors) == 1 and "500" in errors[0]


@pytest.mark.slow
def test_a_task_with_an_odd_image_is_refused_alone_and_the_batch_is_answered(
        tmp_path, label_studio, ls_photos, labels_file, tiny_clip_dir):
    import httpx

    from .test_serve import auth, start_serve, stop

    served = start_serve(tmp_path, label_studio, ls_photos, labels_file, tiny_clip_dir)
    try:
        odd = ls_photos / "odd"
        odd.mkdir()
        (odd / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
        (odd / "scan.xyz").write_bytes(b"\x00\x01not an image at all" * 50)
        urls = ["/data/local-files/?d=" + (odd / name).relative_to(label_studio.root)
                .as_posix() for name in ("drawing.svg", "scan.xyz")]
        served.http.post(f"/api/projects/{served.project_id}/import",
                         json=[{"image": u} for u in urls]).raise_for_status()
        tasks = served.tasks()
        pushed = next(t for t in tasks if "sha256" in t["data"])
        odd_tasks = [t for t in tasks if t["data"]["image"] in urls]

        answer = httpx.post(served.url + "/predict", headers=auth(), timeout=60, json={
            "tasks": [*odd_tasks, pushed], "project": f"{served.project_id}.0"})

        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert [r["result"] for r in results[:2]] == [[], []]
        assert results[2]["result"] and results[2]["score"] > 0
    finally:
        stop(served)


def test_a_tasks_deleted_event_forgets_the_task_and_its_reviews(db, tmp_path):
    """Label Studio's TASKS_DELETED webhook: serve reads the task again (404 now), and its
    reviews stop counting at once, not at the next pull."""
    from labelassist.db.models import LSDeletedTask

    from .hostile_server import HostileServer

    with HostileServer({}) as server:  # every task answers 404: deleted
        backend = serve_backend(db, server, tmp_path, {"id": 9, "data": {"sha256": "c" * 64}},
                                reviews=[90])

        assert backend.event({"action": "TASKS_DELETED", "tasks": [{"id": 9}]}) == 1
        backend.journal.replay()

        assert live_reviews(db) == []
        with db.read() as s:
            assert s.scalar(select(LSTask.id)) is None
            assert s.scalar(select(LSDeletedTask.ls_task_id)) == 9


def test_a_review_made_then_deleted_at_once_is_read_once_not_twenty_times(db, tmp_path):
    """The created event names an annotation that is gone by the time serve reads the
    task: serve asks Label Studio about it once, instead of waiting for it to show up."""
    from .hostile_server import JSON, HostileServer

    task = {"id": 5, "data": {"sha256": "d" * 64}, "predictions": [], "annotations": []}
    with HostileServer({"/api/tasks/5": lambda q: (200, JSON, task)}) as server:
        backend = serve_backend(db, server, tmp_path)
        backend.event({"action": "ANNOTATION_CREATED", "task": {"id": 5},
                       "annotation": {"id": 50, "task": 5, "updated_at": "2026-12-06"}})

        backend.journal.replay()

        assert server.requests["/api/tasks/5"] == 1
        assert server.requests["/api/annotations/50"] == 1  # 404 here: deleted
        assert backend.journal.pending_events()[0] == []
