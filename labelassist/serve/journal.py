"""Reviews as they are made: Label Studio's webhook events are journaled in the ledger
(`ls_review_events`) before Label Studio gets its answer; a thread then re-reads the tasks
they name and stores their annotations by `pull`'s own rules. Events not yet stored (a
crash, Label Studio down) are replayed in order, at the next try or start; one that keeps
failing while Label Studio answers is set aside, so the rest goes on."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, func, select, update

from ..db import Database
from ..db.models import Annotation, LSProject, LSTask, ReviewEventRecord, as_utc, utcnow
from ..errors import LabelAssistError, LabelStudioError
from ..labelstudio import LabelStudioClient
from ..labelstudio.project import ChoicesControl, as_labelassist_choices, iter_remote_pages
from ..labelstudio.pull import PullSummary, store_annotations
from ..labelstudio.tasks import forget_tasks, is_id, match, task_rows
from .status import ServeStatus

ANNOTATION_ACTIONS = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED",
                      "ANNOTATIONS_DELETED"}
TASK_ACTIONS = {"TASKS_DELETED"}  # the tasks are re-read: a 404 forgets them
# An event that keeps failing while Label Studio answers is set aside after this many
# tries (with its error, in status and GET /), so one bad event never stops the rest.
MAX_ATTEMPTS = 5
_is_id = is_id  # an id this ledger can hold (no 2**64 from a webhook reaches SQLite)


def _author_id(annotation: dict):
    author = annotation.get("completed_by")
    return author.get("id") if isinstance(author, dict) else author


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


class ReviewJournal:
    """The review thread and the journal it works from. `after_reviews(n)` is told how
    many reviews each store added, changed or deleted (the learning loop counts them)."""

    def __init__(self, db: Database, client: LabelStudioClient, project: LSProject,
                 status: ServeStatus, *, note: Callable[[str], None],
                 after_reviews: Callable[[int], None], save_status: Callable[[], None],
                 control: ChoicesControl | None = None,
                 adopt: Callable[[list[int]], None] | None = None):
        self.db, self.client, self.project, self.status = db, client, project, status
        self.control, self.adopt = control or ChoicesControl(), adopt
        self.note, self.after_reviews, self.save_status = note, after_reviews, save_status
        self._wake = threading.Event()  # a new event is journaled, or stop()
        self._stopping = False
        self._users: dict = {}
        self._thread = threading.Thread(target=self._record_events, name="reviews",
                                        daemon=True)

    def start(self) -> None:
        """Start the review thread, which first replays what an earlier run journaled and
        did not store. Events stored more than a week ago are dropped from the journal."""
        with self.db.write() as s:
            s.execute(delete(ReviewEventRecord).where(
                ReviewEventRecord.done_at < datetime.now(timezone.utc) - timedelta(days=7)))
        self._wake.set()
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

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
                self.note(f"set aside a review event after {record.attempts} tries "
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

    def count_waiting(self) -> tuple[int, int]:
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
                self.note(f"storing reviews (tried again in {pause:.0f} s; nothing is lost, "
                           f"the events are journaled): {exc}")
            self.status.events_waiting, self.status.events_set_aside = self.count_waiting()
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
            self._adopt_reviewed(tasks)
            store_annotations(self.db, self.project, as_labelassist_choices(tasks, self.control),
                              self._users, summary, read_at)
        if gone:
            self._forget(gone, summary)
        changed = summary.new + summary.updated
        self.status.reviews_recorded += changed
        self.after_reviews(changed + summary.deleted)
        self.save_status()
        return summary

    def catch_up(self) -> PullSummary:
        """Reviews made while no server listened, read with the project's own Choices
        control: for a project whose control is not labelassist's `label`, stored before
        `pull` (which reads `label` only) sees them."""
        summary = PullSummary()
        since = self.project.last_pull_at
        pages = iter_remote_pages(self.client, self.project.ls_project_id,
                                  None if since is None else as_utc(since))
        users = {u["id"]: u.get("email") or u.get("username")
                 for u in self.client.get_json("/api/users", "listing users")}
        while True:
            read_at = utcnow()  # before the page is read (pull's rule)
            page = next(pages, None)
            if page is None:
                return summary
            store_annotations(self.db, self.project, as_labelassist_choices(
                page[0], self.control), users, summary, read_at)

    def _adopt_reviewed(self, tasks: list[dict]) -> None:
        """Reviewed tasks that no row of the ledger names, handed to `adopt` (when given);
        one that cannot be adopted is noted, and its review waits for a later event."""
        with self.db.read() as s:
            rows = task_rows(s, self.project.id, [t.get("id") for t in tasks])
        unknown = [t["id"] for t in tasks if t.get("annotations") and is_id(t.get("id"))
                   and match(rows.get(t["id"], []), t.get("data"))[0] is None]
        if unknown and self.adopt is not None:
            try:
                self.adopt(unknown)
            except LabelAssistError as exc:
                self.note(f"adopting reviewed tasks {unknown[:10]}: {exc}")

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
