"""Learning in the loop: every `learn_every` new reviews `learn` runs; when the probe
beats zero-shot, its predictions go to Label Studio as a new model_version and the project
shows it, so the next task a reviewer opens shows the better guess."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timezone

from sqlalchemy import select

from ..db import Database
from ..db.models import LSProject, ModelVersion
from ..errors import LabelAssistError
from ..labelstudio import LabelStudioClient
from ..labelstudio.project import MADE_IN_STUDIO, ChoicesControl
from .status import LearnRecord, ServeStatus


class LearningLoop:
    def __init__(self, db: Database, client: LabelStudioClient, project: LSProject,
                 status: ServeStatus, *, model: Callable, zero_shot_version: Callable,
                 learn_every: int, target_precision: float, log: Callable[[str], None],
                 note: Callable[[str], None], control: ChoicesControl | None = None):
        self.db, self.client, self.project, self.status = db, client, project, status
        self.control = control or ChoicesControl()
        self.model, self.zero_shot_version = model, zero_shot_version
        self.learn_every, self.target_precision = learn_every, target_precision
        self.log, self.note = log, note
        self._lock = threading.Lock()  # /train and the review thread: one learn at a time

    def after_reviews(self, count: int) -> None:
        """Reviews stored (added, changed or deleted): learn once enough have come."""
        self.status.reviews_since_learn += count
        if self.learn_every and self.status.reviews_since_learn >= self.learn_every:
            self._learn_now()

    def learn(self) -> LearnRecord | None:
        with self._lock:
            return self._learn()

    def _learn(self) -> LearnRecord | None:
        from ..trust.learn import learn

        base = self.zero_shot_version()
        if base is None:
            return None
        try:
            summary = learn(self.db, self.model(), base)
        except LabelAssistError as exc:  # one class only so far: tried again next review
            self.note(f"learn: {exc}")
            return None
        record = LearnRecord(datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             summary.reviews, summary.zero_shot_accuracy,
                             summary.probe_accuracy, summary.stored_version)
        if summary.stored_version:
            with self.db.read() as s:
                stored = s.scalars(select(ModelVersion).where(
                    ModelVersion.name == summary.stored_version)).one()
            record.pushed_tasks = self.send(stored)
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

    def send(self, version: ModelVersion) -> int:
        """The new version's predictions to Label Studio: by push for a project labelassist
        pushed; for one made in Label Studio, onto the tasks serve answered, with the
        project's own Choices control (push would add tasks and choices of its own)."""
        from ..labelstudio import push, resolve_image_source

        if self.project.image_mode == MADE_IN_STUDIO:
            return send_predictions(self.db, self.client, self.project, version,
                                    self.control)
        source = resolve_image_source(self.project.image_mode, None, self.client.conn.url)
        if source.mode == "local" and source.root is None:
            source = resolve_image_source("upload", None, self.client.conn.url)
        pushed = push(self.db, self.client, version, source, title=self.project.title)
        return pushed.predictions_added + pushed.tasks_created

    def _learn_now(self) -> None:
        """Learn from the reviews stored: a failure (Label Studio refusing the new version)
        is noted and tried again at the next review; the reviews stay stored."""
        try:
            self.learn()
        except LabelAssistError as exc:
            self.note(f"learn: {exc} (tried again at the next review)")

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
        from ..trust.audit import TrustOptions

        name = self.status.model_version
        if name is None:
            return None
        self.status.accept_refused = None
        try:
            would = accept_trusted(self.db, name, TrustOptions(self.target_precision),
                                   write=False)
        except BiasedSample as exc:
            self.status.accept_refused = str(exc)
            return 0.0
        except LabelAssistError:  # no reviews of this version yet
            return None
        if would.bound and would.bound["threshold"] is None:  # e.g. too few fair reviews
            self.status.accept_refused = would.bound["reason"]
        return sum(would.accepted.values()) / would.unreviewed if would.unreviewed else None


def send_predictions(db: Database, client: LabelStudioClient, project: LSProject,
                     version: ModelVersion, control: ChoicesControl) -> int:
    """This version's predictions onto the project's tasks that still show their image,
    500 a request; returns how many were sent."""
    from ..db.models import Image, LSTask, Prediction
    from ..labelstudio.project import choice_result
    from ..labelstudio.tasks import TaskRow, check_task_rows

    with db.read() as s:
        found = s.execute(select(LSTask.id, LSTask.image_id, LSTask.ls_task_id,
                                 LSTask.image_key, Image.sha256, Prediction.label,
                                 Prediction.confidence)
                          .join(Image, Image.id == LSTask.image_id)
                          .join(Prediction, Prediction.image_id == LSTask.image_id)
                          .where(LSTask.project_id == project.id,
                                 Prediction.model_version_id == version.id)).all()
    guesses = {row.ls_task_id: (row.label, row.confidence) for row in found}
    live, _ = check_task_rows(db, client, project.id, project.ls_project_id,
                              [TaskRow(*row[:5]) for row in found])
    payload = [{"task": r.ls_task_id, "result": choice_result(guesses[r.ls_task_id][0], control),
                "score": round(guesses[r.ls_task_id][1], 6), "model_version": version.name}
               for r in live]
    for start in range(0, len(payload), 500):
        client.call("importing predictions", client.sdk.projects.import_predictions,
                    id=project.ls_project_id, request=payload[start:start + 500])
    return len(payload)
