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
from ..db.models import (Annotation, File, LSProject, LSTask, ModelVersion, Prediction,
                         ReviewEventRecord)
from ..errors import LabelAssistError, LabelStudioError
from ..labelstudio import LabelStudioClient
from ..labelstudio.project import choice_result
from ..labelstudio.pull import PullSummary, _store_annotations, mark_tasks_deleted
from .fetch import RefusedImage, fetch_image

ANNOTATION_ACTIONS = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED",
                      "ANNOTATIONS_DELETED"}


def _author_id(annotation: dict):
    author = annotation.get("completed_by")
    return author.get("id") if isinstance(author, dict) else author


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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
        """task id -> image id; images of tasks that labelassist did not push are fetched
        through Label Studio, registered, encoded and predicted first."""
        ids = [t["id"] for t in tasks]
        with self.db.read() as s:
            known = dict(s.execute(select(LSTask.ls_task_id, LSTask.image_id).where(
                LSTask.project_id == self.project.id, LSTask.ls_task_id.in_(ids))).all())
        new = {}
        for task in tasks:
            if task["id"] in known:
                continue
            try:
                path = self.fetch(task)
            except RefusedImage as exc:
                self.status.images_refused += 1
                self._note(f"task {task['id']}: {exc}")
                continue
            except LabelAssistError as exc:
                self._note(f"task {task['id']}: {exc}")
                continue
            new[task["id"]] = path
        if new:
            known.update(self._register(new))
        return known

    def fetch(self, task: dict) -> Path:
        path = fetch_image(self.client, task, self.fetch_dir)
        self.status.images_fetched += 1
        return path

    def _register(self, paths: dict[int, Path]) -> dict[int, int]:
        """Ingest fetched files, predict them with this project's zero-shot version, and
        record their tasks as ours (so reviews of them count like any other)."""
        from ..ingest import ingest
        from ..predict import predict_version

        ingest(self.db, sorted(set(paths.values())))
        with self.db.read() as s:
            image_of = dict(s.execute(select(File.path, File.image_id).where(
                File.path.in_([str(p) for p in paths.values()]), File.error.is_(None))).all())
            version = self._zero_shot_version(s)
        found = {task: image_of[str(p)] for task, p in paths.items() if str(p) in image_of}
        if version is not None and found:
            predict_version(self.db, self.model(), version, only=sorted(set(found.values())))
        with self.db.write() as s:
            taken = set(s.scalars(select(LSTask.image_id).where(
                LSTask.project_id == self.project.id, LSTask.image_id.in_(found.values()))))
            rows, seen = [], set(taken)
            for task, image in found.items():
                if image not in seen:  # the same picture twice: the first task is its task
                    rows.append({"project_id": self.project.id, "image_id": image,
                                 "ls_task_id": task})
                    seen.add(image)
            insert_ignoring_duplicates(s, LSTask, rows)
        return found

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
        if payload.get("action") not in ANNOTATION_ACTIONS:
            return 0
        event = ReviewEvent()
        task = payload.get("task")
        if isinstance(task, dict) and _is_id(task.get("id")):
            event.tasks.add(task["id"])
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
                             .where(ReviewEventRecord.project_id == self.project.id,
                                    ReviewEventRecord.done_at.is_(None))
                             .order_by(ReviewEventRecord.id).limit(limit)).all()
        for _, tasks, orphans, expect in rows:
            merged.merge(ReviewEvent(set(tasks), set(orphans),
                                     {int(k): v for k, v in expect.items()}))
        return [row[0] for row in rows], merged

    def replay(self) -> int:
        """Store the reviews of every journaled event not yet stored, oldest first. Raises
        (and leaves them journaled, with the error) when Label Studio can't be read."""
        stored = 0
        while not self._stopping:
            ids, event = self.pending_events()
            if not ids:
                break
            try:
                self.record(event)
            except Exception as exc:
                with self.db.write() as s:
                    s.execute(update(ReviewEventRecord).where(ReviewEventRecord.id.in_(ids))
                              .values(attempts=ReviewEventRecord.attempts + 1,
                                      last_error=str(exc)[:500]))
                raise
            with self.db.write() as s:
                s.execute(update(ReviewEventRecord).where(ReviewEventRecord.id.in_(ids))
                          .values(done_at=datetime.now(timezone.utc)))
            stored += len(ids)
        return stored

    def _count_waiting(self) -> int:
        with self.db.read() as s:
            return s.scalar(select(func.count()).where(
                ReviewEventRecord.project_id == self.project.id,
                ReviewEventRecord.done_at.is_(None)))

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
            self.status.events_waiting = self._count_waiting()
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
            tasks, gone = self._read_tasks(sorted(tasks_ids))
            if event.seen_in(tasks) or attempt == 19:
                break
            time.sleep(0.25)
        summary = PullSummary()
        if tasks:
            authors = {_author_id(a) for t in tasks for a in t.get("annotations", [])}
            if authors - set(self._users):
                self._users = {u["id"]: u.get("email") or u.get("username")
                               for u in self.client.get_json("/api/users", "listing users")}
            _store_annotations(self.db, self.project, tasks, self._users, summary)
        if gone:
            self._forget(gone, summary)
        changed = summary.new + summary.updated
        self.status.reviews_recorded += changed
        self.status.reviews_since_learn += changed + summary.deleted
        if self.learn_every and self.status.reviews_since_learn >= self.learn_every:
            self.learn()
        self.save_status()
        return summary

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
        """A task deleted in Label Studio: its reviews no longer count (as in pull)."""
        with self.db.read() as s:
            images = s.scalars(select(LSTask.image_id).where(
                LSTask.project_id == self.project.id, LSTask.ls_task_id.in_(task_ids))).all()
        mark_tasks_deleted(self.db, self.project.id, list(images), summary)

    def learn(self) -> LearnRecord | None:
        with self._learn_lock:
            return self._learn()

    def _learn(self) -> LearnRecord | None:
        from ..learn import learn
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
        self.status.reviews_since_learn = 0
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
        from ..accept import BiasedSample, accept_trusted

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
