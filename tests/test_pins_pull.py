"""Fast, direct pins for pull (labelassist/labelstudio/pull.py), none needing Label Studio.

The pure parts (a choice read from a result, a time, an annotation's stored values, the
summary's counts) are called directly; store_annotations runs on tiny ledgers copied from
one built once; pull itself runs against a small HTTP server in this process that answers
like Label Studio (tests/hostile_server.py). Every expected value is written out by hand.
They are what scripts/mutate.sh runs for pull: a mutant costs a fraction of a second of
tests (issue 34).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import delete, insert, select, update

from labelassist.db import open_database
from labelassist.db.models import (Annotation, File, Image, LSDeletedTask, LSProject, LSTask,
                                   ModelVersion, as_utc, utcnow)
from labelassist.errors import LabelStudioError
from labelassist.labelstudio.client import Connection, LabelStudioClient
from labelassist.labelstudio.pull import (PullSummary, _annotation_values, _as_label, _choice,
                                          _parse_time, _timed, pull, store_annotations)
from labelassist.labelstudio.tasks import Forgotten

from .bigledger import add_images
from .hostile_server import JSON, HostileServer

# The SDK builds its client's parts on first use (seconds): once here, at collection, not
# in the first test that pulls (nor in each mutant's session: mutmut forks those from a
# process that collected this file). No request is made.
LabelStudioClient(Connection("http://127.0.0.1:9", "t"), retries=0).close()

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
STAMP = "2026-01-01T00:00:00Z"  # T0 as Label Studio writes it


def sha(image: int) -> str:
    return f"{image:064x}"  # as tests/bigledger.py makes them


def choice(label, from_name="label") -> list[dict]:
    return [{"from_name": from_name, "to_name": "image", "type": "choices",
             "value": {"choices": [label]}}]


def note(n, label="cat", *, updated=STAMP, parent=None, by=1, cancelled=False,
         from_name="label") -> dict:
    return {"id": n, "result": [] if label is None else choice(label, from_name),
            "completed_by": by, "lead_time": 3.5, "parent_prediction": parent,
            "was_cancelled": cancelled, "created_at": "2025-12-31T00:00:00Z",
            "updated_at": updated}


def task(ls_id, image, notes=(), *, version="v@2") -> dict:
    """A task of ours (its data names the image by its hash), with a prediction of
    `cat` (id 100 + ls_id) by `version`."""
    return {"id": ls_id, "data": {"sha256": sha(image)},
            "predictions": [{"id": 100 + ls_id, "model_version": version,
                             "result": choice("cat")}],
            "annotations": list(notes)}


# ---- the pure parts --------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (None, None), ("cat", "cat"), ("", ""), (3, "3"), (2.5, "2.5"), (True, "True"),
    (["b", "a"], '["b", "a"]'), ({"b": 1, "a": "é"}, '{"a": "é", "b": 1}')])
def test_a_choice_of_any_json_type_becomes_text(value, expected):
    assert _as_label(value) == expected


@pytest.mark.parametrize("result, expected", [
    ([], None), (None, None), (5, None), ({"from_name": "label"}, None),
    (choice("dog"), "dog"), (choice(7), "7"),
    (["junk", None, *choice("cat")], "cat"),  # items that are not objects are passed over
    (choice("dog", "other") + choice("cat"), "cat"),  # another control's choice
    ([{"from_name": "label", "type": "textarea", "value": {"text": ["x"]}}, *choice("cat")],
     "cat"),
    ([{"from_name": "label", "type": "choices", "value": None}], None),
    ([{"from_name": "label", "type": "choices", "value": {"choices": []}}], None),
    ([{"from_name": "label", "type": "choices", "value": {}}], None),
    ([{"from_name": "label", "type": "choices", "value": {"choices": ["dog", "cat"]}}], "dog"),
])
def test_the_choice_is_the_first_of_labelassists_own_control(result, expected):
    assert _choice(result) == expected


@pytest.fixture
def tokyo(monkeypatch):
    """This process's local time 9 hours ahead of UTC (a POSIX rule: no tz database)."""
    monkeypatch.setenv("TZ", "JST-9")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_times_are_read_into_utc_whatever_the_local_zone(tokyo):
    for text in ("2026-01-01T09:30:00+09:00", "2026-01-01T00:30:00Z",
                 "2026-01-01T00:30:00"):  # no offset: Label Studio's UTC
        parsed = _parse_time(text)
        assert parsed == T0 + timedelta(minutes=30)
        assert parsed.utcoffset() == timedelta(0), text  # SQLite keeps no offset
        assert parsed.replace(tzinfo=None) == datetime(2026, 1, 1, 0, 30)
    assert _parse_time(None) is None and _parse_time("") is None


def test_an_unreadable_time_names_what_it_was_for():
    with pytest.raises(LabelStudioError) as err:
        _parse_time("yesterday")
    assert str(err.value) == ("Label Studio sent an unreadable time 'yesterday' for a "
                              "timestamp; is --ls-url a Label Studio server?")
    with pytest.raises(LabelStudioError, match=r"time 'soon' for annotation 5;"):
        _parse_time("soon", "annotation 5")


PREDICTIONS = {101: {"id": 101, "model_version": "v@2", "result": choice("cat")},
               102: {"id": 102, "model_version": "gone@1", "result": choice("cat")}}
VERSIONS = {"v@1": 1, "v@2": 2}
USERS = {1: "a@b.c", 2: "bea"}


def values(remote) -> dict:
    return _annotation_values(remote, PREDICTIONS, VERSIONS, USERS)


def test_an_annotations_values_as_stored():
    assert values(note(5, "cat", parent=101)) == {
        "label": "cat", "cancelled": False, "model_version_id": 2,
        "accepted_prediction": True, "annotator": "a@b.c", "lead_time": 3.5,
        "ls_created_at": T0 - timedelta(days=1), "ls_updated_at": T0}
    # changed from the prediction; a version the ledger does not know
    changed = values(note(5, "dog", parent=102, by=2))
    assert (changed["model_version_id"], changed["accepted_prediction"],
            changed["annotator"]) == (None, False, "bea")
    # made without a prediction: nothing to accept, no version
    alone = values(note(5, "dog"))
    assert alone["accepted_prediction"] is None and alone["model_version_id"] is None
    # skipped with the prediction's own choice still in it: not an acceptance
    skipped = values(note(5, "cat", parent=101, cancelled=True))
    assert (skipped["cancelled"], skipped["accepted_prediction"]) == (True, False)
    assert skipped["label"] == "cat"


@pytest.mark.parametrize("by, expected", [
    (1, "a@b.c"), ({"id": 2, "email": "x@y.z"}, "bea"), (7, "7"), ({"id": 7}, "7"),
    (None, None)])
def test_the_author_by_id_or_object_and_a_bare_id_kept_as_text(by, expected):
    assert values(note(5, by=by))["annotator"] == expected


def test_an_annotation_without_result_or_author_or_times():
    assert values({"id": 5}) == {
        "label": None, "cancelled": False, "model_version_id": None,
        "accepted_prediction": None, "annotator": None, "lead_time": None,
        "ls_created_at": None, "ls_updated_at": None}


@pytest.mark.parametrize("field", ["created_at", "updated_at"])
def test_an_annotations_unreadable_time_names_the_annotation(field):
    with pytest.raises(LabelStudioError, match=r"time 'never' for annotation 5;"):
        values({**note(5), field: "never"})


def test_forgotten_tasks_are_counted_as_gone_or_replaced():
    summary = PullSummary(deleted=1, tasks_gone=1, tasks_replaced=1)
    summary.count_forgotten(Forgotten(tasks=2, reviews=3))
    assert (summary.deleted, summary.tasks_gone, summary.tasks_replaced) == (4, 3, 1)
    summary.count_forgotten(Forgotten(tasks=5, reviews=1), replaced=True)
    assert (summary.deleted, summary.tasks_gone, summary.tasks_replaced) == (5, 3, 6)


def test_each_page_comes_with_the_time_just_before_it_was_asked_for():
    asked = []

    def pages():
        for n in range(2):
            asked.append(utcnow())
            yield n

    got = list(_timed(pages()))
    assert [page for _, page in got] == [0, 1]
    assert got[0][0] <= asked[0] <= got[1][0] <= asked[1]


# ---- store_annotations on tiny ledgers -------------------------------------------------

@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Images 1-4; versions v@1 (id 1) and v@2 (id 2); project p (id 1, Label Studio's
    project 1) with tasks 1-4 for images 1-4; project q (id 2) on another server, whose
    task 7 is image 2."""
    path = tmp_path_factory.mktemp("pull") / "template.db"
    url = f"sqlite:///{path}"
    open_database(url).dispose()
    add_images(url, 4)
    db = open_database(url)
    with db.write() as s:
        for name in ("v@1", "v@2"):
            s.execute(insert(ModelVersion).values(
                name=name, model_id="m", model_key="k", label_set={"classes": ["cat", "dog"]},
                created_at=T0))
        for title, url_ in (("p", "http://ls"), ("q", "http://elsewhere")):
            s.execute(insert(LSProject).values(url=url_, ls_project_id=1, title=title,
                                               classes=["cat", "dog"], image_mode="local",
                                               created_at=T0))
        s.execute(insert(LSTask), [
            {"project_id": 1, "image_id": i, "ls_task_id": i, "image_key": f"sha256:{sha(i)}",
             "created_at": T0} for i in range(1, 5)]
            + [{"project_id": 2, "image_id": 2, "ls_task_id": 7,
                "image_key": f"sha256:{sha(2)}", "created_at": T0}])
    db.dispose()
    return path


@pytest.fixture
def ledger(template, tmp_path):
    path = tmp_path / "l.db"
    shutil.copy(template, path)
    db = open_database(f"sqlite:///{path}")
    yield db
    db.dispose()


def stored_note(n, image, *, project=1, updated=T0, deleted=None, pulled=T0, label="cat"):
    return {"project_id": project, "ls_annotation_id": n, "image_id": image, "label": label,
            "cancelled": False, "ls_updated_at": updated, "deleted_at": deleted,
            "pulled_at": pulled}


def add_notes(db, *notes) -> None:
    with db.write() as s:
        s.execute(insert(Annotation), list(notes))


def annotations(db, project=1) -> dict[int, Annotation]:
    with db.read() as s:
        return {a.ls_annotation_id: a for a in s.scalars(
            select(Annotation).where(Annotation.project_id == project))}


def store(db, tasks, read_at=None, project=1) -> PullSummary:
    summary = PullSummary()
    with db.read() as s:
        row = s.get(LSProject, project)
    store_annotations(db, row, tasks, USERS, summary, read_at or utcnow())
    return summary


def counts(summary: PullSummary) -> dict:
    return {k: v for k, v in vars(summary).items() if k != "projects" and v}


def test_a_page_stores_new_reviews_and_passes_over_tasks_not_ours(ledger):
    page = [task(1, 1, [note(11, "cat", parent=101), note(12, None, cancelled=True)]),
            task(98, 3, [note(981, "dog")]),  # made in Label Studio by hand
            {"id": 2, "data": {"sha256": sha(2)},  # no predictions at all
             "annotations": [note(21, "dog", by=7, cancelled=True, parent=102)]},
            {"id": 99, "data": {"image": "/x.png"}, "annotations": [note(991)]},
            {"id": 3, "data": {"sha256": sha(3)}}]  # not reviewed: no annotations key
    summary = store(ledger, page)
    assert counts(summary) == {"tasks_seen": 5, "new": 3, "cancelled": 2, "unknown_tasks": 2}
    assert {n: (a.image_id, a.label, a.cancelled, a.model_version_id, a.accepted_prediction,
                a.annotator, a.lead_time, as_utc(a.ls_created_at), as_utc(a.ls_updated_at),
                a.deleted_at)
            for n, a in annotations(ledger).items()} == {
        11: (1, "cat", False, 2, True, "a@b.c", 3.5, T0 - timedelta(days=1), T0, None),
        12: (1, None, True, None, None, "a@b.c", 3.5, T0 - timedelta(days=1), T0, None),
        21: (2, "dog", True, None, None, "7", 3.5, T0 - timedelta(days=1), T0, None)}
    assert annotations(ledger, project=2) == {}


def test_a_review_is_written_over_only_when_newer_or_deleted_before_the_read(ledger):
    read_at = utcnow() - timedelta(minutes=5)
    before, after = read_at - timedelta(hours=1), read_at + timedelta(hours=1)
    day = timedelta(days=1)
    add_notes(ledger,
              stored_note(41, 1), stored_note(42, 1), stored_note(43, 1),
              stored_note(44, 1, updated=None), stored_note(45, 1),
              stored_note(46, 1, deleted=before),   # deleted, then undone in Label Studio
              stored_note(47, 1, deleted=after),    # deleted after this page was read
              stored_note(48, 1, deleted=read_at),
              stored_note(51, 1, pulled=before), stored_note(52, 2, pulled=before),
              stored_note(53, 2, deleted=T0),       # deleted before: not again
              stored_note(54, 2, pulled=read_at),   # stored as the page was read
              stored_note(55, 2, pulled=after),     # stored by serve after the read
              stored_note(41, 1, project=2, pulled=before))  # another project's review
    stamp = {41: "2026-01-02T00:00:00Z", 42: STAMP, 43: "2025-12-31T00:00:00Z", 44: STAMP,
             45: None, 46: STAMP, 47: STAMP, 48: STAMP}
    page = [task(1, 1, [note(n, "dog", updated=s) for n, s in stamp.items()]),
            task(2, 2, [])]
    started = utcnow()
    summary = store(ledger, page, read_at)
    assert counts(summary) == {"tasks_seen": 2, "updated": 3, "unchanged": 5, "deleted": 2}
    rows = annotations(ledger)
    assert {n: a.label for n, a in rows.items() if n < 50} == {
        41: "dog", 42: "cat", 43: "cat", 44: "dog", 45: "cat", 46: "dog", 47: "cat",
        48: "cat"}
    assert as_utc(rows[41].ls_updated_at) == T0 + day and as_utc(rows[44].ls_updated_at) == T0
    assert as_utc(rows[43].ls_updated_at) == T0 and as_utc(rows[45].ls_updated_at) == T0
    for n in (41, 44, 46):  # written over: live, pulled now
        assert rows[n].deleted_at is None and as_utc(rows[n].pulled_at) >= started
    for n in (42, 43, 45):
        assert as_utc(rows[n].pulled_at) == T0
    assert as_utc(rows[47].deleted_at) == after and as_utc(rows[48].deleted_at) == read_at
    for n in (51, 52):
        assert as_utc(rows[n].deleted_at) >= started
    assert as_utc(rows[53].deleted_at) == T0
    assert rows[54].deleted_at is None and rows[55].deleted_at is None
    (other,) = annotations(ledger, project=2).values()
    assert (other.label, other.deleted_at) == ("cat", None)


def test_a_task_id_reused_for_another_image_forgets_the_old_task(ledger):
    add_notes(ledger, stored_note(11, 1), stored_note(21, 2), stored_note(22, 2),
              stored_note(31, 3))
    page = [task(1, 4, [note(61)]),   # task 1 now shows image 4: a task made after 1 went
            task(2, 3, [note(62)]),   # and task 2 image 3
            task(3, 3, [note(31, "dog", updated="2026-01-02T00:00:00Z")])]
    summary = store(ledger, page)
    assert counts(summary) == {"tasks_seen": 3, "unknown_tasks": 2, "updated": 1,
                               "deleted": 3, "tasks_replaced": 2}
    rows = annotations(ledger)
    assert {n for n, a in rows.items() if a.deleted_at is None} == {31}
    assert rows[31].label == "dog"
    with ledger.read() as s:
        assert s.scalars(select(LSTask.ls_task_id).where(LSTask.project_id == 1)
                         .order_by(LSTask.ls_task_id)).all() == [3, 4]
        assert s.execute(select(LSDeletedTask.ls_task_id, LSDeletedTask.image_id)
                         .order_by(LSDeletedTask.ls_task_id)).all() == [(1, 1), (2, 2)]


# ---- pull, against a server of our own -------------------------------------------------

class StudioServer(HostileServer):
    """Label Studio as pull sees it: each project's tasks (a page at a time, as many as
    asked for), the id listing (`listed`: the ids it shows, `id_page`: how many a page,
    `extra`: added to its total), the users and the projects' labeling configs. Every
    task listing's query is kept."""

    def __init__(self):
        super().__init__({"/api/tasks": self.list_tasks,
                          "/api/users": lambda q: (200, JSON, self.users)})
        self.tasks: dict[int, list[dict]] = {}
        self.listed: dict[int, list[int]] = {}
        self.id_page = None
        self.extra = 0
        self.users = [{"id": 1, "email": "a@b.c", "username": "ann"},
                      {"id": 2, "email": "", "username": "bea"}]
        self.queries = []

    def __enter__(self) -> "StudioServer":
        # polled every 10 ms, not 0.5 s: shutting down waits for the next poll
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01},
                         daemon=True).start()
        return self

    def config(self, ls_project_id: int, label_config: str | None) -> None:
        self.routes[f"/api/projects/{ls_project_id}"] = lambda q: (
            200, JSON, {"id": ls_project_id, "title": "made here",
                        **({} if label_config is None else {"label_config": label_config})})

    def list_tasks(self, query):
        self.queries.append(query)
        project = int(query.get("project", ["0"])[0])
        page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
        if query.get("include") == ["id"]:
            ids = self.listed.get(project, [t["id"] for t in self.tasks.get(project, [])])
            size = self.id_page or size
            return 200, JSON, {"total": len(ids) + self.extra,
                               "tasks": [{"id": i} for i in ids[(page - 1) * size:page * size]]}
        tasks = self.tasks.get(project, [])
        return 200, JSON, {"total": len(tasks), "tasks": tasks[(page - 1) * size:page * size]}


@pytest.fixture
def server(ledger):
    with StudioServer() as srv:
        with ledger.write() as s:
            s.execute(update(LSProject).where(LSProject.id == 1).values(url=srv.url))
        yield srv


def run_pull(db, server, **kwargs) -> PullSummary:
    client = LabelStudioClient(Connection(server.url, "t"), retries=0)
    try:
        return pull(db, client, **kwargs)
    finally:
        client.close()


def watermark(db, project=1):
    with db.read() as s:
        value = s.get(LSProject, project).last_pull_at
    return None if value is None else as_utc(value)


def test_pull_reads_every_page_names_reviewers_and_keeps_a_watermark(ledger, server):
    server.tasks[1] = [task(1, 1, [note(11, "cat", parent=101)]),
                       task(2, 2, [note(21, "dog", by=2)]), task(3, 3, [note(31, by=3)])]
    seen = []
    before = datetime.now(timezone.utc).replace(microsecond=0)
    summary = run_pull(ledger, server, page_size=2,
                       on_progress=lambda done, total: seen.append((done, total)))
    after = utcnow()
    assert counts(summary) == {"tasks_seen": 3, "new": 3}
    assert summary.projects == ["p"]  # project q is on another server
    assert seen == [(2, 3), (3, 3)]
    pages = [q for q in server.queries if q.get("include") != ["id"]]
    assert [(q["page"], q["page_size"], "query" in q) for q in pages] == [
        (["1"], ["2"], False), (["2"], ["2"], False)]
    assert {n: (a.annotator, a.model_version_id, a.accepted_prediction)
            for n, a in annotations(ledger).items()} == {
        11: ("a@b.c", 2, True), 21: ("bea", None, None), 31: ("3", None, None)}
    # the server's clock when the pull began, less 2 s (the Date header: whole seconds)
    mark = watermark(ledger)
    assert before - timedelta(seconds=3) <= mark <= after - timedelta(seconds=1)
    assert watermark(ledger, project=2) is None

    server.queries.clear()
    again = run_pull(ledger, server)  # only what changed since the watermark
    assert counts(again) == {"tasks_seen": 3, "unchanged": 3}
    (query,) = [q for q in server.queries if q.get("include") != ["id"]]
    assert query["page_size"] == ["500"]
    (item,) = json.loads(query["query"][0])["filters"]["items"]
    assert item["value"] == mark.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    server.queries.clear()
    server.tasks[1][1]["annotations"] = []  # 21 deleted in Label Studio
    full = run_pull(ledger, server, full=True)  # everything again
    assert ["query" in q for q in server.queries] == [False, False]
    assert counts(full) == {"tasks_seen": 3, "unchanged": 2, "deleted": 1}
    assert annotations(ledger)[21].deleted_at is not None


def test_pull_reads_the_choice_of_a_project_made_in_label_studio(ledger, server):
    from labelassist.labelstudio.project import label_config

    with ledger.write() as s:
        s.execute(update(LSProject).where(LSProject.id == 1).values(image_mode="studio"))
    server.config(1, label_config(["cat", "dog"]).replace('name="label"', 'name="answer"'))
    server.tasks[1] = [task(1, 1, [note(11, "dog", from_name="answer")])]
    run_pull(ledger, server)
    assert annotations(ledger)[11].label == "dog"

    server.config(1, "<View>not closed")  # a config it cannot read: labelassist's `label`
    server.tasks[1] = [task(2, 2, [note(21, "dog")]), task(3, 3, [note(31, "dog",
                                                                          from_name="answer")])]
    run_pull(ledger, server)
    assert (annotations(ledger)[21].label, annotations(ledger)[31].label) == ("dog", None)
    server.config(1, None)  # no config at all: the same
    server.tasks[1] = [task(4, 4, [note(41, "cat")])]
    run_pull(ledger, server, full=True)
    assert annotations(ledger)[41].label == "cat"


def test_a_project_labelassist_pushed_is_not_asked_for_its_config(ledger, server):
    server.config(1, "<View/>")
    server.tasks[1] = [task(1, 1, [note(11, "dog")])]
    run_pull(ledger, server)
    assert server.requests["/api/projects/1"] == 0
    assert annotations(ledger)[11].label == "dog"


def test_pull_says_what_it_was_doing_when_the_server_refuses(ledger, server):
    with ledger.write() as s:
        s.execute(update(LSProject).where(LSProject.id == 1).values(image_mode="studio"))
    with pytest.raises(LabelStudioError, match="answered 404 while reading the project: "):
        run_pull(ledger, server)  # no such project
    server.routes["/api/users"] = lambda q: (404, JSON, {"detail": "no"})
    with pytest.raises(LabelStudioError, match="answered 404 while listing users: "):
        run_pull(ledger, server)


def test_pull_asks_for_a_push_first_on_a_server_it_never_pushed_to(ledger, server):
    with ledger.write() as s:
        s.execute(update(LSProject).where(LSProject.id == 1).values(url="http://gone"))
    with pytest.raises(LabelStudioError) as err:
        run_pull(ledger, server)
    assert str(err.value) == (f"nothing was pushed to {server.url} yet: run labelassist "
                              "push first")


def test_a_task_deleted_in_label_studio_is_forgotten_with_its_reviews(ledger, server):
    # one image only, every task gone: an empty listing
    with ledger.write() as s:
        s.execute(delete(LSTask).where(LSTask.image_id != 1))
        s.execute(delete(File).where(File.image_id != 1))
        s.execute(delete(Image).where(Image.id != 1))
    add_notes(ledger, stored_note(11, 1), stored_note(12, 1))
    summary = run_pull(ledger, server)
    assert counts(summary) == {"deleted": 2, "tasks_gone": 1}
    assert all(a.deleted_at is not None for a in annotations(ledger).values())
    with ledger.read() as s:
        assert s.scalars(select(LSTask.ls_task_id)).all() == []


def test_only_a_complete_listing_of_ids_forgets_a_task(ledger, server):
    add_notes(ledger, stored_note(11, 1), stored_note(21, 2), stored_note(31, 3))
    server.listed[1] = [1, 2, 4]  # 3 is gone; 4 was never reviewed
    server.id_page = 1  # a page of one id at a time
    summary = run_pull(ledger, server)
    assert counts(summary) == {"deleted": 1, "tasks_gone": 1}
    assert {n for n, a in annotations(ledger).items() if a.deleted_at is None} == {11, 21}
    ids = [q for q in server.queries if q.get("include") == ["id"]]
    assert [q["page"] for q in ids] == [["1"], ["2"], ["3"]]

    add_notes(ledger, stored_note(41, 4))
    server.listed[1] = [1, 2]  # 4 gone too, but the total says 3: a listing cut short
    server.extra = 1
    assert counts(run_pull(ledger, server)) == {}
    assert annotations(ledger)[41].deleted_at is None


def test_only_this_projects_reviewed_tasks_can_be_forgotten(ledger, server):
    add_notes(ledger, stored_note(11, 1), stored_note(31, 3, deleted=T0),
              stored_note(71, 2, project=2))  # image 2 reviewed in project q only
    server.listed[1] = [1]  # tasks 2, 3 and 4 are not listed
    summary = run_pull(ledger, server)
    assert counts(summary) == {}
    with ledger.read() as s:
        assert s.execute(select(LSTask.project_id, LSTask.ls_task_id)
                         .order_by(LSTask.id)).all() == [(1, 1), (1, 2), (1, 3), (1, 4),
                                                         (2, 7)]
    assert annotations(ledger, project=2)[71].deleted_at is None


def test_a_review_first_sent_without_a_time_is_updated_when_it_gets_one(ledger):
    """Label Studio's annotations carry updated_at, but a hand-made one or another API
    client may not: it is stored without, and a later copy that has one is newer."""
    assert counts(store(ledger, [task(1, 1, [note(11, "cat", updated=None)])])) == {
        "tasks_seen": 1, "new": 1}
    assert annotations(ledger)[11].ls_updated_at is None
    assert counts(store(ledger, [task(1, 1, [note(11, "dog", updated=None)])])) == {
        "tasks_seen": 1, "unchanged": 1}
    assert counts(store(ledger, [task(1, 1, [note(11, "dog")])])) == {
        "tasks_seen": 1, "updated": 1}
    assert annotations(ledger)[11].label == "dog"
