"""The model in the loop, without the web: what `labelassist serve` does for Label Studio.

- predict: a task labelassist pushed is answered from the ledger (the newest prediction
  of its image); a task imported straight into Label Studio has its image fetched through
  Label Studio, registered by content hash, encoded and predicted like any other image;
- reviews: annotation events name tasks; each event is journaled in the ledger before
  Label Studio gets its answer, then those tasks are re-read from Label Studio and stored
  by the same rules as `pull` (accepted vs fixed, annotator, deletions, skips). Events not
  yet stored (a crash, Label Studio down) are replayed in order, at the next try or start;
- learning: every `learn_every` new reviews `learn` runs; when the probe wins, its
  predictions go to Label Studio as a new model_version, which reviewers see next.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from sqlalchemy import delete, func, select, update

from ..db import Database, insert_ignoring_duplicates
from ..db.models import (Annotation, File, LSDeletedTask, LSProject, LSTask, ModelVersion,
                         Prediction, ReviewEventRecord, utcnow)
from ..errors import LabelAssistError, LabelStudioError
from ..labelstudio import LabelStudioClient
from ..labelstudio.project import choice_result
from ..labelstudio.pull import PullSummary, store_annotations
from ..labelstudio.tasks import (forget_tasks, is_id, match, read_tasks, task_key,
                                 task_rows)
from .fetch import RefusedImage, fetch_image

ANNOTATION_ACTIONS = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED",
                      "ANNOTATIONS_DELETED"}
TASK_ACTIONS = {"TASKS_DELETED"}  # the tasks are re-read: a 404 forgets them
# An event that keeps failing while Label Studio answers is set aside after this many
# tries (with its error, in status and GET /), so one bad event never stops the rest.
MAX_ATTEMPTS = 5


def _author_id(annotation: dict):
    author = annotation.get("completed_by")
    return author.get("id") if isinstance(author, dict) else author


_is_id = is_id  # an id this ledger can hold (no 2**64 from a webhook reaches SQLite)


@dataclass
class ReviewEvent:
    """What one or more webhook events name: tasks to re-read, annotations known only by
    id (a deletion), and annotations that must show up in the re-read (id -> updated_at)."""

    tasks: set[int] = field(default_factory=set)
    orphans: set[int] = field(default_factory=set)
    expect: dict[int, str] = field(default_factory=dict)

    def merge(self, other: "ReviewEvent") -> None:
        self.tasks |= other.tasks
        self.orphans |= other.orphans
        self.expect.update(other.expect)

    def seen_in(self, tasks: list[dict]) -> bool:
        remote = {a.get("id"): str(a.get("updated_at") or "")
                  for t in tasks for a in t.get("annotations", [])}
        return all(i in remote and remote[i] >= stamp for i, stamp in self.expect.items())


@dataclass
class LearnRecord:
    at: str
    reviews: int
    zero_shot_accuracy: float
    probe_accuracy: float
    stored_version: str | None
    pushed_tasks: int = 0


@dataclass
class ServeStatus:
    project: str
    model_version: str | None
    reviews_recorded: int = 0
    reviews_since_learn: int = 0
    events_waiting: int = 0  # journaled, not yet stored (Label Studio unreachable?)
    events_set_aside: int = 0  # failed MAX_ATTEMPTS times while Label Studio answered
    learn_every: int = 0
    predictions_served: int = 0
    images_fetched: int = 0
    images_refused: int = 0
    last_learn: LearnRecord | None = None
    auto_accept_share: float | None = None
    accept_refused: str | None = None  # why accept would refuse, when it would
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


class Backend:
    def __init__(self, db: Database, client: LabelStudioClient, project: LSProject, *,
                 load_model, fetch_dir: Path, learn_every: int = 20,
                 target_precision: float = 0.99, log=print, status_file: Path | None = None):
        self.db, self.client, self.project = db, client, project
        self.load_model, self.fetch_dir = load_model, fetch_dir
        self.learn_every, self.target_precision, self.log = learn_every, target_precision, log
        self.status_file = status_file  # `labelassist status` reads it
        self._saved_at = float("-inf")
        self.status = ServeStatus(project.title, self.newest_version_name(),
                                  learn_every=learn_every)
        self._model = None
        self._model_lock = threading.Lock()  # one encode at a time; the model loads once
        self._learn_lock = threading.Lock()  # /train and the review thread: one learn
        self._wake = threading.Event()  # a new event is journaled, or stop()
        self._stopping = False
        self._users: dict = {}
        self._worker = threading.Thread(target=self._record_events, name="reviews",
                                        daemon=True)

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the review thread, which first replays what an earlier run journaled and
        did not store. Events stored more than a week ago are dropped from the journal."""
        from datetime import timedelta

        with self.db.write() as s:
            s.execute(delete(ReviewEventRecord).where(
                ReviewEventRecord.done_at < datetime.now(timezone.utc) - timedelta(days=7)))
        self._wake.set()
        self._worker.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._worker.join(timeout=30)
        self.save_status(running=False)

    def save_status(self, running: bool = True, at_most_every: float = 0.0) -> None:
        """The status as JSON beside the ledger, written whole (temp file, rename)."""
        if self.status_file is None or time.monotonic() - self._saved_at < at_most_every:
            return
        import json
        import os

        self._saved_at = time.monotonic()

        data = {**self.status.to_json(), "running": running, "pid": os.getpid(),
                "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        partial = self.status_file.with_name(self.status_file.name + f".{os.getpid()}")
        try:
            partial.write_text(json.dumps(data, indent=1))
            partial.replace(self.status_file)
        except OSError as exc:
            self.log(f"cannot write {self.status_file}: {exc}")

    def model(self):
        """The zero-shot version's model, loaded on first use (a server that only answers
        from the ledger never loads it)."""
        with self._model_lock:
            if self._model is None:
                with self.db.read() as s:
                    version = self._zero_shot_version(s)
                if version is None:
                    raise LabelAssistError("no zero-shot predictions in this project yet")
                self._model = self.load_model(version.model_id,
                                              version.model_key.partition("+")[2])
            return self._model

    # ---- what Label Studio asks --------------------------------------------------------

    def newest_version_name(self) -> str | None:
        """The newest model_version with predictions for this project's images."""
        with self.db.read() as s:
            return s.scalar(select(ModelVersion.name).where(
                select(Prediction.id).join(LSTask, LSTask.image_id == Prediction.image_id)
                .where(Prediction.model_version_id == ModelVersion.id,
                       LSTask.project_id == self.project.id).exists())
                .order_by(ModelVersion.id.desc()).limit(1))

    def predict(self, tasks: list[dict]) -> list[dict]:
        """One answer per task, in order: the newest prediction of its image among the
        versions whose classes this project offers (an image may also be predicted for
        another label set, whose labels this project has no choice for)."""
        images = self._images_of(tasks)
        with self.db.read() as s:
            versions = {v.id: v.name for v in s.scalars(select(ModelVersion))
                        if set(v.label_set["classes"]) <= set(self.project.classes)}
            newest: dict[int, Prediction] = {}
            for p in s.scalars(select(Prediction).where(
                    Prediction.image_id.in_(sorted(set(images.values()))),
                    Prediction.model_version_id.in_(list(versions)))):
                if p.model_version_id > getattr(newest.get(p.image_id), "model_version_id", 0):
                    newest[p.image_id] = p
        answers = []
        for task in tasks:
            prediction = newest.get(images.get(task["id"]))
            if prediction is None:
                answers.append({"result": [], "score": 0.0,
                                "model_version": self.status.model_version or ""})
                continue
            answers.append({"result": choice_result(prediction.label),
                            "score": round(prediction.confidence, 6),
                            "model_version": versions[prediction.model_version_id]})
            self.status.predictions_served += 1
        self.save_status(at_most_every=1.0)  # not a file write per request
        return answers

    def _images_of(self, tasks: list[dict]) -> dict[int, int]:
        """task id -> image id, for the tasks whose data names an image recorded for that
        task; the others (imported straight into Label Studio, or an id that Label Studio
        gave again to a new task) are adopted: read again from Label Studio, their image
        fetched, registered, encoded and predicted. A task that fails is answered empty
        and noted; the others are answered all the same."""
        ids = [t["id"] for t in tasks if is_id(t["id"])]
        with self.db.read() as s:
            rows = task_rows(s, self.project.id, ids)
        known, unknown = {}, []
        for task in tasks:
            found, _ = match(rows.get(task["id"], []), task.get("data"))
            if found is not None:
                known[task["id"]] = found.image_id
            elif is_id(task["id"]):
                unknown.append(task["id"])
        if unknown:
            try:
                known.update(self._adopt(unknown, rows))
            except Exception as exc:  # noqa: BLE001 - the known tasks are answered anyway
                self._note(f"tasks {', '.join(map(str, unknown[:10]))}: {exc}")
        return known

    def _adopt(self, ids: list[int], rows: dict) -> dict[int, int]:
        """Tasks as Label Studio has them (never as the caller says: an id may be made up,
        or deleted since), their images fetched and registered."""
        remote = read_tasks(self.client, self.project.ls_project_id, ids, include="id,data")
        found, stale, fetched = {}, [], {}
        for task_id in ids:
            task = remote.get(task_id)
            if task is None:  # not a task of this project (any more)
                stale += rows.get(task_id, [])
                continue
            mine, old = match(rows.get(task_id, []), task.get("data"))
            stale += old
            if mine is not None:
                found[task_id] = mine.image_id
                continue
            try:
                fetched[task_id] = (self.fetch(task), task_key(task.get("data")))
            except RefusedImage as exc:
                self.status.images_refused += 1
                self._note(f"task {task_id}: {exc}")
            except LabelAssistError as exc:
                self._note(f"task {task_id}: {exc}")
        if stale:
            forget_tasks(self.db, self.project.id, stale)
        if fetched:
            found.update(self._register(fetched))
        return found

    def fetch(self, task: dict) -> Path:
        path = fetch_image(self.client, task, self.fetch_dir)
        self.status.images_fetched += 1
        return path

    def _register(self, fetched: dict[int, tuple[Path, str | None]]) -> dict[int, int]:
        """Ingest fetched files, predict them with this project's zero-shot version, and
        record their tasks as ours (so reviews of them count like any other)."""
        from ..ingest import ingest
        from ..predict.run import predict_version

        paths = {task: path for task, (path, _) in fetched.items()}
        ingest(self.db, sorted(set(paths.values())))
        with self.db.read() as s:
            image_of = dict(s.execute(select(File.path, File.image_id).where(
                File.path.in_([str(p) for p in paths.values()]), File.error.is_(None))).all())
            version = self._zero_shot_version(s)
        found = {task: image_of[str(p)] for task, p in paths.items() if str(p) in image_of}
        if version is not None and found:
            predict_version(self.db, self.model(), version, only=sorted(set(found.values())))
        self._record_tasks({task: (image, fetched[task][1]) for task, image in found.items()})
        return found

    def _record_tasks(self, tasks: dict[int, tuple[int, str | None]]) -> None:
        """Task -> (image, what its data names): the first task that shows a picture is
        its task; a tombstone of that picture (a deleted task) gives way to it."""
        images = [image for image, _ in tasks.values()]
        with self.db.write() as s:
            taken = set(s.scalars(select(LSTask.image_id).where(
                LSTask.project_id == self.project.id, LSTask.image_id.in_(images))))
            rows, seen = [], set(taken)
            for task, (image, key) in tasks.items():
                if image not in seen:
                    rows.append({"project_id": self.project.id, "image_id": image,
                                 "ls_task_id": task, "image_key": key})
                    seen.add(image)
            s.execute(delete(LSDeletedTask).where(
                LSDeletedTask.project_id == self.project.id,
                LSDeletedTask.image_id.in_([r["image_id"] for r in rows])))
            insert_ignoring_duplicates(s, LSTask, rows)

    def _zero_shot_version(self, s) -> ModelVersion | None:
        return s.scalars(select(ModelVersion).where(
            ModelVersion.kind == "zeroshot",
            select(Prediction.id).join(LSTask, LSTask.image_id == Prediction.image_id)
            .where(Prediction.model_version_id == ModelVersion.id,
                   LSTask.project_id == self.project.id).exists())
            .order_by(ModelVersion.id.desc()).limit(1)).first()

    # ---- reviews as they happen ----------------------------------------------------------

    def event(self, payload: dict) -> int:
        """Journal what an event names, in the ledger, before Label Studio (which waits 1 s
        for a webhook) gets its answer; a background thread stores the reviews. Returns the
        tasks and annotations named."""
        action = payload.get("action")
        if action not in ANNOTATION_ACTIONS | TASK_ACTIONS:
            return 0
        event = ReviewEvent()
        task = payload.get("task")
        if isinstance(task, dict) and _is_id(task.get("id")):
            event.tasks.add(task["id"])
        if action in TASK_ACTIONS:
            event.tasks |= {t.get("id") for t in payload.get("tasks") or []
                            if isinstance(t, dict) and _is_id(t.get("id"))}
        items = [payload.get("annotation")] + list(payload.get("annotations") or [])
        for item in items:
            if not isinstance(item, dict) or not _is_id(item.get("id")):
                continue
            owner = item.get("task")
            owner = owner.get("id") if isinstance(owner, dict) else owner
            if _is_id(owner):
                event.tasks.add(owner)
            else:
                event.orphans.add(item["id"])  # a deletion may name the annotation only
            if payload["action"] != "ANNOTATIONS_DELETED":
                event.expect[item["id"]] = str(item.get("updated_at") or "")[:64]
        if not (event.tasks or event.orphans):
            return 0
        with self.db.write() as s:
            s.add(ReviewEventRecord(
                project_id=self.project.id, action=payload["action"],
                tasks=sorted(event.tasks), orphans=sorted(event.orphans),
                expect={str(k): v for k, v in event.expect.items()}, attempts=0))
        self._wake.set()
        return len(event.tasks) + len(event.orphans)

    def pending_events(self, limit: int = 500) -> tuple[list[int], ReviewEvent]:
        """The oldest journaled events not yet stored, merged into one (one read of their
        tasks, one write): their ids, in the order they arrived, and what they name."""
        merged = ReviewEvent()
        with self.db.read() as s:
            rows = s.execute(select(ReviewEventRecord.id, ReviewEventRecord.tasks,
                                    ReviewEventRecord.orphans, ReviewEventRecord.expect)
                             .where(*self._waiting())
                             .order_by(ReviewEventRecord.id).limit(limit)).all()
        for _, tasks, orphans, expect in rows:
            # ids as an older version journaled them (unchecked): what no task can be is
            # dropped here, not sent to the database on every try
            merged.merge(ReviewEvent({i for i in tasks if _is_id(i)},
                                     {i for i in orphans if _is_id(i)},
                                     {int(k): v for k, v in expect.items()
                                      if str(k).isdigit() and _is_id(int(k))}))
        return [row[0] for row in rows], merged

    def _waiting(self):
        return (ReviewEventRecord.project_id == self.project.id,
                ReviewEventRecord.done_at.is_(None),
                ReviewEventRecord.attempts < MAX_ATTEMPTS)

    def replay(self) -> int:
        """Store the reviews of every journaled event not yet stored, oldest first, many
        events in one read. When that fails, each event is tried on its own: one that
        fails while Label Studio answers counts a try, and after MAX_ATTEMPTS it is set
        aside, so the events after it go on. Raises (leaving them journaled, with the
        error, no try counted) while Label Studio can't be read."""
        stored = 0
        while not self._stopping:
            ids, event = self.pending_events()
            if not ids:
                break
            try:
                self.record(event)
            except Exception as exc:  # noqa: BLE001 - which event is it? each on its own
                self._keep_error(ids, exc)
                if len(ids) == 1:
                    self._failed(ids[0], exc)
                    continue
                for one in ids:
                    stored += self._replay_one(one)
                continue
            self._mark_done(ids)
            stored += len(ids)
        return stored

    def _replay_one(self, event_id: int) -> int:
        ids, event = self.pending_events(limit=1)
        if ids != [event_id]:
            return 0
        try:
            self.record(event)
        except Exception as exc:  # noqa: BLE001 - judged in _failed
            self._failed(event_id, exc)
            return 0
        self._mark_done(ids)
        return 1

    def _failed(self, event_id: int, exc: Exception) -> None:
        """One event failed on its own: a try counts only while Label Studio answers (down,
        it says nothing about the event, and everything waits)."""
        try:
            self.client.check_server()
        except LabelAssistError:
            raise exc from None
        with self.db.write() as s:
            s.execute(update(ReviewEventRecord).where(ReviewEventRecord.id == event_id)
                      .values(attempts=ReviewEventRecord.attempts + 1,
                              last_error=str(exc)[:500]))
            record = s.get(ReviewEventRecord, event_id)
            if record.attempts >= MAX_ATTEMPTS:
                self._note(f"set aside a review event after {record.attempts} tries "
                           f"({record.action}, tasks {record.tasks[:5]}): {record.last_error}")

    def _keep_error(self, ids: list[int], exc: Exception) -> None:
        """The events stay journaled with the error (no try counted: Label Studio may be
        down, which says nothing about them)."""
        with self.db.write() as s:
            s.execute(update(ReviewEventRecord).where(ReviewEventRecord.id.in_(ids))
                      .values(last_error=str(exc)[:500]))

    def _mark_done(self, ids: list[int]) -> None:
        with self.db.write() as s:
            s.execute(update(ReviewEventRecord).where(ReviewEventRecord.id.in_(ids))
                      .values(done_at=datetime.now(timezone.utc), last_error=None))

    def _count_waiting(self) -> tuple[int, int]:
        """Events journaled and not stored yet, and those set aside."""
        with self.db.read() as s:
            base = (ReviewEventRecord.project_id == self.project.id,
                    ReviewEventRecord.done_at.is_(None))
            waiting = s.scalar(select(func.count()).where(*self._waiting()))
            aside = s.scalar(select(func.count()).where(
                *base, ReviewEventRecord.attempts >= MAX_ATTEMPTS))
        return waiting, aside

    def _record_events(self) -> None:
        """The review thread: replay the journal whenever an event arrives, and retry with
        a growing pause (1 s up to 30 s) while Label Studio can't be read."""
        pause = None
        while not self._stopping:
            self._wake.wait(timeout=pause)
            self._wake.clear()
            if self._stopping:
                break
            try:
                self.replay()
                pause = None
            except Exception as exc:  # noqa: BLE001 - the server goes on; the journal keeps it
                pause = min(30.0, (pause or 0.5) * 2)
                self._note(f"storing reviews (tried again in {pause:.0f} s; nothing is lost, "
                           f"the events are journaled): {exc}")
            self.status.events_waiting, self.status.events_set_aside = self._count_waiting()
            self.save_status()

    def record(self, event: "ReviewEvent") -> PullSummary:
        """Re-read the tasks an event names and store their annotations as `pull` would.
        Label Studio may send the event before its own write is visible: the read is
        repeated (for a few seconds) until the annotations the event names show up."""
        tasks_ids = set(event.tasks)
        if event.orphans:
            with self.db.read() as s:
                tasks_ids |= set(s.scalars(select(LSTask.ls_task_id).join(
                    Annotation, (Annotation.image_id == LSTask.image_id)
                    & (Annotation.project_id == LSTask.project_id))
                    .where(LSTask.project_id == self.project.id,
                           Annotation.ls_annotation_id.in_(event.orphans))))
        for attempt in range(20):
            read_at = utcnow()
            tasks, gone = self._read_tasks(sorted(tasks_ids))
            if event.seen_in(tasks) or attempt == 19:
                break
            if attempt == 0:  # made, then deleted at once: waiting would never see it
                self._drop_deleted(event, tasks)
                if event.seen_in(tasks):
                    break
            time.sleep(0.25)
        summary = PullSummary()
        if tasks:
            authors = {_author_id(a) for t in tasks for a in t.get("annotations", [])}
            if authors - set(self._users):
                self._users = {u["id"]: u.get("email") or u.get("username")
                               for u in self.client.get_json("/api/users", "listing users")}
            store_annotations(self.db, self.project, tasks, self._users, summary, read_at)
        if gone:
            self._forget(gone, summary)
        changed = summary.new + summary.updated
        self.status.reviews_recorded += changed
        self.status.reviews_since_learn += changed + summary.deleted
        if self.learn_every and self.status.reviews_since_learn >= self.learn_every:
            self._learn_now()
        self.save_status()
        return summary

    def _drop_deleted(self, event: "ReviewEvent", tasks: list[dict]) -> None:
        """Expected annotations that the read lacks and Label Studio no longer has."""
        shown = {a.get("id") for t in tasks for a in t.get("annotations", [])}
        for annotation_id in [i for i in event.expect if i not in shown]:
            try:
                self.client.get_json(f"/api/annotations/{annotation_id}", "reading a review")
            except LabelStudioError as exc:
                if "answered 404" not in str(exc):
                    raise
                event.expect.pop(annotation_id)

    def _learn_now(self) -> None:
        """Learn from the reviews stored: a failure (Label Studio refusing the new version)
        is noted and tried again at the next review; the reviews stay stored."""
        try:
            self.learn()
        except LabelAssistError as exc:
            self._note(f"learn: {exc} (tried again at the next review)")

    def _read_tasks(self, task_ids: list[int]) -> tuple[list[dict], list[int]]:
        tasks, gone = [], []
        for task_id in task_ids:
            try:
                tasks.append(self.client.get_json(f"/api/tasks/{task_id}", "reading a task"))
            except LabelStudioError as exc:
                if "answered 404" not in str(exc):
                    raise
                gone.append(task_id)
        return tasks, gone

    def _forget(self, task_ids: list[int], summary: PullSummary) -> None:
        """Tasks deleted in Label Studio (404): forgotten, as pull forgets them."""
        with self.db.read() as s:
            rows = [r for rs in task_rows(s, self.project.id, task_ids).values() for r in rs]
        summary.count_forgotten(forget_tasks(self.db, self.project.id, rows))

    def learn(self) -> LearnRecord | None:
        with self._learn_lock:
            return self._learn()

    def _learn(self) -> LearnRecord | None:
        from ..trust.learn import learn
        from ..labelstudio import push, resolve_image_source

        with self.db.read() as s:
            base = self._zero_shot_version(s)
        if base is None:
            return None
        try:
            summary = learn(self.db, self.model(), base)
        except LabelAssistError as exc:  # one class only so far: tried again next review
            self._note(f"learn: {exc}")
            return None
        record = LearnRecord(datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             summary.reviews, summary.zero_shot_accuracy,
                             summary.probe_accuracy, summary.stored_version)
        if summary.stored_version:
            with self.db.read() as s:
                stored = s.scalars(select(ModelVersion).where(
                    ModelVersion.name == summary.stored_version)).one()
            source = resolve_image_source(self.project.image_mode, None, self.client.conn.url)
            if source.mode == "local" and source.root is None:
                source = resolve_image_source("upload", None, self.client.conn.url)
            pushed = push(self.db, self.client, stored, source, title=self.project.title)
            record.pushed_tasks = pushed.predictions_added + pushed.tasks_created
            self.show_version(stored.name)
        # Counted from here on only: a version that never reached Label Studio (push
        # raised) leaves the count as it was, so the next review learns and sends again.
        self.status.reviews_since_learn = 0
        share = self.auto_accept_share()
        self.status.last_learn, self.status.auto_accept_share = record, share  # seen together
        self.log(f"learned from {record.reviews} reviews: zero-shot "
                 f"{record.zero_shot_accuracy:.1%}, probe {record.probe_accuracy:.1%}"
                 + (f"; {record.stored_version} sent to Label Studio"
                    if record.stored_version else "; zero-shot kept"))
        return record

    def show_version(self, name: str) -> None:
        """Make Label Studio show this version's predictions to reviewers."""
        self.client.call("setting the project's model_version", lambda: self.client.http.patch(
            f"/api/projects/{self.project.ls_project_id}",
            json={"model_version": name}).raise_for_status())
        self.status.model_version = name

    def auto_accept_share(self) -> float | None:
        """The share of this version's unreviewed predictions that `accept` would take: its
        own dry run. 0 when accept would refuse the reviews (and status says why)."""
        from ..trust.accept import BiasedSample, accept_trusted

        name = self.status.model_version
        if name is None:
            return None
        self.status.accept_refused = None
        try:
            would = accept_trusted(self.db, name, target_precision=self.target_precision,
                                   write=False)
        except BiasedSample as exc:
            self.status.accept_refused = str(exc)
            return 0.0
        except LabelAssistError:  # no reviews of this version yet
            return None
        return sum(would.accepted.values()) / would.unreviewed if would.unreviewed else None

    def _note(self, message: str) -> None:
        self.log(message)
        self.status.errors = (self.status.errors + [f"{time.strftime('%H:%M:%S')} {message}"]
                              )[-20:]
