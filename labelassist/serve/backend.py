"""The model in the loop, without the web: what `labelassist serve` does for Label Studio.

- predict (here): a task labelassist pushed is answered from the ledger (the newest
  prediction of its image); a task imported straight into Label Studio is read again from
  Label Studio, its image fetched, registered by content hash, encoded and predicted like
  any other image;
- reviews (journal.py): annotation events are journaled, then stored by `pull`'s rules;
- learning (learning.py): every `learn_every` new reviews `learn` runs, and a winning
  probe's predictions reach Label Studio as a new model_version.
"""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import delete, select

from ..db import Database, insert_ignoring_duplicates
from ..db.models import (File, LSDeletedTask, LSPrediction, LSProject, LSTask, ModelVersion,
                          Prediction)
from ..errors import LabelAssistError
from ..labelstudio import LabelStudioClient
from ..labelstudio.project import MADE_IN_STUDIO, ChoicesControl, choice_result
from ..labelstudio.tasks import forget_tasks, is_id, match, read_tasks, task_key, task_rows
from .fetch import RefusedImage, fetch_image
from .journal import ReviewJournal
from .learning import LearningLoop
from .status import ServeStatus, StatusFile


class Backend:
    """Answers Label Studio's predict requests, and holds the review journal and the
    learning loop that the web routes reach through it."""

    def __init__(self, db: Database, client: LabelStudioClient, project: LSProject, *,
                 load_model, fetch_dir: Path, learn_every: int = 20,
                 target_precision: float = 0.99, log=print, status_file: Path | None = None,
                 control: ChoicesControl | None = None, zero_shot: ModelVersion | None = None,
                 model=None):
        """`control`: the project's Choices (default: labelassist's own `label`);
        `zero_shot` and its loaded `model`: what to predict with (default: the newest
        zero-shot version with predictions of the project's images)."""
        self.db, self.client, self.project = db, client, project
        self.load_model, self.fetch_dir, self.log = load_model, fetch_dir, log
        self.control = control or ChoicesControl()
        self.pinned = zero_shot
        self.status = ServeStatus(project.title, self.newest_version_name(),
                                  learn_every=learn_every)
        self.status_file = StatusFile(status_file, log)  # `labelassist status` reads it
        self._model = model
        self._model_lock = threading.Lock()  # one encode at a time; the model loads once
        self.learning = LearningLoop(
            db, client, project, self.status, model=self.model,
            zero_shot_version=self.zero_shot_version, learn_every=learn_every,
            target_precision=target_precision, log=log, note=self._note,
            control=self.control)
        # a review of a task serve never answered, in a project made in Label Studio:
        # the task is adopted then, so that the review counts
        adopt = self.adopt if project.image_mode == MADE_IN_STUDIO else None
        self.journal = ReviewJournal(db, client, project, self.status, note=self._note,
                                     control=self.control, adopt=adopt,
                                     after_reviews=self.learning.after_reviews,
                                     save_status=self.save_status)

    def pin(self, version: ModelVersion, model) -> None:
        """Predict with this zero-shot version (and its loaded model) from now on."""
        with self._model_lock:
            self.pinned, self._model = version, model
        self.status.model_version = self.newest_version_name()

    def start(self) -> None:
        self.journal.start()

    def stop(self) -> None:
        self.journal.stop()
        self.save_status(running=False)

    def save_status(self, running: bool = True, at_most_every: float = 0.0) -> None:
        self.status_file.save(self.status, running, at_most_every)

    def event(self, payload: dict) -> int:
        """A webhook event: journaled (journal.py); returns what it names."""
        return self.journal.event(payload)

    def learn(self):
        """Learn now (Label Studio's "Start training", or /train)."""
        return self.learning.learn()

    def model(self):
        """The zero-shot version's model, loaded on first use (a server that only answers
        from the ledger never loads it)."""
        with self._model_lock:
            if self._model is None:
                version = self.zero_shot_version()
                if version is None:
                    raise LabelAssistError("no zero-shot predictions in this project yet")
                self._model = self.load_model(version.model_id,
                                              version.model_key.partition("+")[2])
            return self._model

    def newest_version_name(self) -> str | None:
        """The newest model_version that reached this project in Label Studio (its
        predictions were sent onto the project's tasks), or the one serve was told to
        predict with when that is newer. A version only stored (a probe `learn` made and
        nobody pushed) is not named: Label Studio never saw it. With nothing sent yet,
        the newest with predictions of the project's images."""
        sent = select(LSPrediction.id).join(LSTask, LSTask.id == LSPrediction.task_id).where(
            LSPrediction.model_version_id == ModelVersion.id,
            LSTask.project_id == self.project.id).exists()
        predicted = select(Prediction.id).join(
            LSTask, LSTask.image_id == Prediction.image_id).where(
            Prediction.model_version_id == ModelVersion.id,
            LSTask.project_id == self.project.id).exists()
        newest = self._newest_version(sent) or self._newest_version(predicted)
        if self.pinned is not None and (newest is None or newest.id < self.pinned.id):
            return self.pinned.name
        return None if newest is None else newest.name

    def _newest_version(self, condition):
        """(id, name) of the newest model_version meeting `condition`, or None."""
        with self.db.read() as s:
            return s.execute(select(ModelVersion.id, ModelVersion.name).where(condition)
                             .order_by(ModelVersion.id.desc()).limit(1)).first()

    def predict(self, tasks: list[dict]) -> list[dict]:
        """One answer per task, in order: the newest prediction of its image among the
        versions whose classes this project offers (an image may also be predicted for
        another label set, whose labels this project has no choice for)."""
        images = self._images_of(tasks)
        self._predict_pinned(set(images.values()))
        with self.db.read() as s:
            offered = set(self.project.classes) | set(self.control.choices)
            versions = {v.id: v.name for v in s.scalars(select(ModelVersion))
                        if set(v.label_set["classes"]) <= offered}
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
            answers.append({"result": choice_result(prediction.label, self.control),
                            "score": round(prediction.confidence, 6),
                            "model_version": versions[prediction.model_version_id]})
            self.status.predictions_served += 1
        self.save_status(at_most_every=1.0)  # not a file write per request
        return answers

    def _predict_pinned(self, image_ids: set[int]) -> None:
        """Images known from an earlier run that have no prediction of the version serve
        was told to predict with (nor of a newer one): predicted with it now."""
        if self.pinned is None or not image_ids:
            return
        with self.db.read() as s:
            done = set(s.scalars(select(Prediction.image_id).where(
                Prediction.image_id.in_(sorted(image_ids)),
                Prediction.model_version_id >= self.pinned.id)))
        if image_ids - done:
            from ..predict.run import predict_version

            predict_version(self.db, self.model(), self.pinned, only=sorted(image_ids - done))

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

    def adopt(self, task_ids: list[int]) -> None:
        """These tasks, if serve does not know them yet: read from Label Studio, their
        images fetched, registered and predicted."""
        with self.db.read() as s:
            rows = task_rows(s, self.project.id, task_ids)
        self._adopt(task_ids, rows)

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
        path = fetch_image(self.client, task, self.fetch_dir, key=self.control.image_key)
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
        version = self.zero_shot_version()
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

    def zero_shot_version(self) -> ModelVersion | None:
        """The version serve was told to predict with, else the newest zero-shot version
        with predictions of this project's images."""
        if self.pinned is not None:
            return self.pinned
        with self.db.read() as s:
            return s.scalars(select(ModelVersion).where(
                ModelVersion.kind == "zeroshot",
                select(Prediction.id).join(LSTask, LSTask.image_id == Prediction.image_id)
                .where(Prediction.model_version_id == ModelVersion.id,
                       LSTask.project_id == self.project.id).exists())
                .order_by(ModelVersion.id.desc()).limit(1)).first()

    def _note(self, message: str) -> None:
        self.log(message)
        self.status.add_error(message)
