"""Push predictions to Label Studio as pre-annotations.

Push is resumable (resume.py): every import is journalled before it is sent, and the
next push reconciles what an interrupted one got into Label Studio. A task is checked
against Label Studio before a new version's predictions go to it (tasks.py).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import BigInteger, cast, select, update

from ..db import Database
from ..db.models import (
    File,
    Image,
    LSDeletedTask,
    LSPrediction,
    LSPushJournal,
    LSTask,
    ModelVersion,
    Prediction,
)
from ..errors import LabelStudioError
from ..images import BadImage
from ..objectstore import fetch_object, is_object_url, object_problem
from ..predict.workers import WorkerStats
from ..db.locks import hold
from .client import LabelStudioClient
from .project import (
    BATCH,
    NO_SDK_RETRIES,
    UPLOAD_BATCH,
    ImageSource,
    Progress,
    choice_result,
    ensure_project,
    project_title,
)
from .resume import reconcile_journal, record_predictions, record_tasks
from .tasks import check_task_rows, sha_key, task_rows


@dataclass
class PushSummary:
    project_id: int
    project_url: str
    model_version: str
    tasks_created: int = 0
    predictions_added: int = 0
    recovered: int = 0
    already_there: int = 0
    skipped_no_file: int = 0  # predictions of images whose every file is gone or edited
    skipped_changed: int = 0  # a file edited since ingest: its pixels are not the predicted ones
    skipped_deleted: int = 0  # images whose task was deleted in Label Studio: not made again
    tasks_gone: int = 0  # tasks deleted in Label Studio (or their ids reused) since last time


# Which images become tasks first: as ingested, least certain first, most confident first.
# random: a fixed shuffle (Knuth's multiplicative hash of the image id), the same on
# SQLite and PostgreSQL, so a resumed push keeps its order. Reviews of a random sample
# are what the audit's thresholds need (benchmarks/session.py: reviews in uncertainty
# order set thresholds that held 65% precision where 99% was asked).
# flagged: the images flagged out of set first (outofset.py), then the same shuffle.
# Not the default: in benchmarks/clean_cost.py it cost 200 more reviews on the 24 pairs
# (they lie outside the fair sample that accept's rules rest on) and saved none elsewhere.
# In 64 bits: PostgreSQL's 32-bit integer product overflows ("out of range").
RANDOM = (cast(Prediction.image_id, BigInteger) * 2654435761) % 4294967296
ORDERS = {"ingest": Prediction.image_id, "uncertain": Prediction.margin,
          "confident": Prediction.confidence.desc(), "random": RANDOM, "flagged": RANDOM}


def push(db: Database, client: LabelStudioClient, version: ModelVersion, source: ImageSource,
         *, title: str | None = None, order: str = "random", batch_size: int = BATCH,
         on_progress: Progress | None = None,
         on_wait: Callable[[str], None] | None = None) -> PushSummary:
    """Create a task per predicted image (with its prediction), and add this version's
    predictions to tasks that exist already. Safe to rerun, to interrupt, and to run
    twice at once: pushes to one project take turns (a lock in the database)."""
    if order not in ORDERS:  # refused before anything is made in Label Studio
        raise LabelStudioError(f"--order {order!r}: use {', '.join(ORDERS)}")
    source.check()
    client.check_server()
    title = project_title(version, title)
    with hold(db, f"push to {client.conn.url} project {title!r}", on_wait=on_wait) as lock:
        project = ensure_project(db, client, version, title, source.mode)
        summary = PushSummary(project.ls_project_id, f"{client.conn.url}/projects/"
                              f"{project.ls_project_id}", version.name)
        reconcile_journal(db, client, project, summary)
        pusher = _Pusher(db, client, project, version, source, summary)
        total = pusher.count_todo()
        summary.skipped_no_file = pusher.count_without_file()
        summary.skipped_deleted = pusher.count_deleted()
        done = 0
        for kind, batch in pusher.batches(order, batch_size):
            pusher.send(kind, batch)
            lock.refresh()
            done += len(batch)
            if on_progress:
                on_progress(done, total)
    return summary


class _Pusher:
    def __init__(self, db, client, project, version, source, summary):
        self.db, self.client, self.project = db, client, project
        self.version, self.source, self.summary = version, source, summary
        self.storages: set[Path] | None = None

    def new_task_query(self, *, with_file: bool = True, deleted: bool = False):
        """Predictions of images that have no task yet (and a file to show reviewers).
        An image whose task someone deleted in Label Studio is not made a task again."""
        has_file = select(File.id).where(File.image_id == Prediction.image_id,
                                         File.error.is_(None)).exists()
        tombstone = select(LSDeletedTask.id).where(
            LSDeletedTask.project_id == self.project.id,
            LSDeletedTask.image_id == Prediction.image_id).exists()
        return (select(Prediction, Image.sha256).join(Image, Image.id == Prediction.image_id)
                .where(Prediction.model_version_id == self.version.id, Image.error.is_(None),
                       has_file if with_file else ~has_file,
                       tombstone if deleted else ~tombstone,
                       ~select(LSTask.id).where(LSTask.project_id == self.project.id,
                                                LSTask.image_id == Prediction.image_id).exists()))

    def count_deleted(self) -> int:
        from sqlalchemy import func

        with self.db.read() as s:
            return s.scalar(select(func.count()).select_from(
                self.new_task_query(deleted=True).subquery()))

    def count_without_file(self) -> int:
        """An image edited and re-ingested keeps its old predictions, with no file left."""
        from sqlalchemy import func

        with self.db.read() as s:
            return s.scalar(select(func.count()).select_from(
                self.new_task_query(with_file=False).subquery()))

    def new_prediction_query(self):
        return (select(Prediction, LSTask).join(LSTask, LSTask.image_id == Prediction.image_id)
                .where(Prediction.model_version_id == self.version.id,
                       LSTask.project_id == self.project.id,
                       ~select(LSPrediction.id).where(
                           LSPrediction.task_id == LSTask.id,
                           LSPrediction.model_version_id == self.version.id).exists()))

    def count_todo(self) -> int:
        from sqlalchemy import func

        with self.db.read() as s:
            return sum(s.scalar(select(func.count()).select_from(q.subquery()))
                       for q in (self.new_task_query(), self.new_prediction_query()))

    def batches(self, order: str, batch_size: int):
        """In `order`; "flagged" puts the images that match none of the classes well
        (outofset.py) first, so that reviewers answer "other" for those first."""
        sort = [ORDERS[order], Prediction.image_id]
        if order == "flagged":
            from ..trust.outofset import class_bars, flagged_first

            sort.insert(0, flagged_first(self.db, self.version,
                                         class_bars(self.db, self.version)))
        for kind, query in (("tasks", self.new_task_query()),
                            ("predictions", self.new_prediction_query())):
            while True:
                with self.db.read() as s:
                    rows = s.execute(query.order_by(*sort).limit(batch_size)).all()
                if not rows:
                    break
                yield kind, rows

    def send(self, kind: str, rows) -> None:
        if kind == "tasks":
            self.send_tasks(rows)
        else:
            self.send_predictions(rows)

    def journal(self, kind: str, image_ids: list[int]) -> int:
        with self.db.write() as s:
            entry = LSPushJournal(project_id=self.project.id, kind=kind,
                                  model_version_id=self.version.id, image_ids=image_ids)
            s.add(entry)
            s.flush()
            return entry.id

    def send_tasks(self, rows) -> None:
        paths = self.unchanged_files([p.image_id for p, _ in rows])
        rows = [r for r in rows if r[0].image_id in paths]
        if not rows:
            return
        image_ids = [p.image_id for p, _ in rows]
        entry_id = self.journal("tasks", image_ids)
        payload = self.task_payloads(rows, paths)
        result = self.client.call("importing tasks", self.client.sdk.projects.import_tasks,
                                  id=self.project.ls_project_id, request=payload,
                                  return_task_ids=True, idempotent=False,
                                  request_options=NO_SDK_RETRIES)
        task_ids = list(result.task_ids or [])
        if len(task_ids) != len(rows):
            raise LabelStudioError(f"Label Studio created {len(task_ids)} tasks for "
                                   f"{len(rows)} images; run push again to reconcile")
        record_tasks(self.db, self.project.id, self.version.id, image_ids, task_ids,
                     entry_id, keys=[sha_key(sha) for _, sha in rows])
        self.summary.tasks_created += len(rows)

    def send_predictions(self, rows) -> None:
        """Add this version's predictions to tasks that still show their images. A task
        deleted in Label Studio, or whose id now names someone else's task, is forgotten
        first: Label Studio refuses a whole import that names a deleted task (400), and a
        reused id would put this image's prediction on another picture."""
        rows = self.live(rows)
        if not rows:
            return
        entry_id = self.journal("predictions", [p.image_id for p, _ in rows])
        try:
            self.import_predictions(rows)
        except LabelStudioError as exc:
            if "answered 400" not in str(exc):
                raise
            rows = self.live(rows)  # deleted since the check: nothing of the batch landed
            if rows:
                self.import_predictions(rows)
        record_predictions(self.db, self.version.id, [task.id for _, task in rows], entry_id)
        self.summary.predictions_added += len(rows)

    def import_predictions(self, rows) -> None:
        payload = [{"task": task.ls_task_id, **prediction_payload(p, self.version.name)}
                   for p, task in rows]
        self.client.call("importing predictions", self.client.sdk.projects.import_predictions,
                         id=self.project.ls_project_id, request=payload, idempotent=False,
                         request_options=NO_SDK_RETRIES)

    def live(self, rows):
        """The rows whose task Label Studio still has, showing the same image."""
        with self.db.read() as s:
            known = task_rows(s, self.project.id, [task.ls_task_id for _, task in rows])
        batch = {task.id for _, task in rows}
        mine = [r for rs in known.values() for r in rs if r.id in batch]
        live, forgotten = check_task_rows(self.db, self.client, self.project.id,
                                          self.project.ls_project_id, mine)
        self.summary.tasks_gone += forgotten.tasks
        keep = {r.id for r in live}
        return [(p, task) for p, task in rows if task.id in keep]

    def unchanged_files(self, image_ids: list[int]) -> dict[int, str]:
        """Per image, a file that still holds the ingested bytes (same size and mtime).
        A file edited or removed since ingest is marked so (ingest reads it again) and its
        image is left out: reviewers would see other pixels than the prediction's."""
        with self.db.read() as s:
            files = s.execute(select(File.id, File.image_id, File.path, File.raw_path,
                                     File.size_bytes, File.mtime_ns, File.etag)
                              .where(File.image_id.in_(image_ids), File.error.is_(None))
                              .order_by(File.id.desc())).all()
        good: dict[int, str] = {}
        stale: dict[int, tuple[str, str]] = {}
        for f in files:
            if f.image_id in good:
                continue
            problem = _file_problem(f.raw_path or f.path, f.size_bytes, f.mtime_ns, f.etag)
            if problem is None:
                good[f.image_id] = f.path
            else:
                stale[f.id] = problem
        if stale:
            with self.db.write() as s:
                for file_id, (reason, detail) in stale.items():
                    s.execute(update(File).where(File.id == file_id)
                              .values(error=reason, error_detail=detail))
        self.summary.skipped_changed += len(set(image_ids) - set(good))
        return good

    def task_payloads(self, rows, paths: dict[int, str]) -> list[dict]:
        urls = self.image_urls([paths[p.image_id] for p, _ in rows])
        return [{"data": {"image": url, "sha256": sha, "path": paths[p.image_id]},
                 "predictions": [prediction_payload(p, self.version.name)]}
                for (p, sha), url in zip(rows, urls)]

    def image_urls(self, paths: list[str]) -> list[str]:
        """Each image's address for reviewers: a local file, named through the folder (or
        the link to a --root) in the root that holds it; or, for an image that serve
        fetched from Label Studio (kept outside the root) or an object in storage
        (s3://...), an upload."""
        if self.source.mode == "upload":
            return upload_images(self.client, self.project.ls_project_id, paths)
        folders = self.source.folders()
        places = [None if is_object_url(path) else self.source.locate(path, folders)
                  for path in paths]
        for path, place in zip(paths, places):
            if place is None and not (is_object_url(path)
                                      or self.source.came_from_label_studio(path)):
                raise LabelStudioError(
                    f"{path} is not inside a folder under Label Studio's local-files root "
                    f"{self.source.root}: start Label Studio with a folder above it linked "
                    f"in (`labelassist studio --root {Path(path).resolve().parent.parent}`), "
                    "or push with --image-mode upload. (--ls-root must name Label Studio's "
                    "own document root: any other folder gets a 400 from it)")
        self.ensure_storages({place[1] for place in places if place})
        fetched = [path for path, place in zip(paths, places) if place is None]
        uploaded = iter(upload_images(self.client, self.project.ls_project_id, fetched)
                        if fetched else [])
        return [f"/data/local-files/?d={quote(place[0], safe='/')}" if place
                else next(uploaded) for place in places]

    def ensure_storages(self, folders: set[Path]) -> None:
        """One local storage per folder in the root, or per top folder below a link in it
        (Label Studio refuses the root itself and serves a file only when a storage of a
        project the user may see covers its folder, links unresolved)."""
        if self.storages is None:
            existing = self.client.call("listing storages", self.client.sdk.import_storage.local
                                        .list, project=self.project.ls_project_id)
            self.storages = {Path(st.path) for st in existing if st.path}
        for folder in sorted(folders - self.storages):
            name = folder.relative_to(self.source.root).as_posix()
            self.client.call("adding a local-files storage",
                             self.client.sdk.import_storage.local.create,
                             project=self.project.ls_project_id, path=str(folder),
                             title=f"labelassist: {name}"[:256], use_blob_urls=True)
            self.storages.add(folder)


def prediction_payload(prediction: Prediction, version_name: str) -> dict:
    return {"model_version": version_name, "score": round(prediction.confidence, 6),
            "result": choice_result(prediction.label)}


def upload_images(client: LabelStudioClient, project_id: int, paths: list[str]) -> list[str]:
    """Upload image bytes (Label Studio cannot see our disk); returns their /data/ URLs."""
    urls = []
    for start in range(0, len(paths), UPLOAD_BATCH):
        chunk = paths[start:start + UPLOAD_BATCH]

        def send():
            handles = [_open_for_upload(p) for p in chunk]
            try:
                files = [(f"file{i}", (Path(p).name, fh)) for i, (p, fh) in
                         enumerate(zip(chunk, handles))]
                response = client.http.post(f"/api/projects/{project_id}/import",
                                            params={"commit_to_project": "false"}, files=files)
                response.raise_for_status()
                return response.json()["file_upload_ids"]
            finally:
                for fh in handles:
                    fh.close()

        ids = client.call("uploading images", send)
        uploads = client.get_json(f"/api/projects/{project_id}/file-uploads",
                                  "reading uploads", ids=json.dumps(ids))
        by_id = {u["id"]: u["file"] for u in uploads}
        urls += [f"/data/{by_id[i]}" for i in ids]
    return urls


def _open_for_upload(path: str):
    """A file, or an object's bytes (read from the bucket with this machine's credentials)."""
    if not is_object_url(path):
        return open(path, "rb")  # noqa: SIM115 - upload_images closes it
    try:
        return io.BytesIO(fetch_object(path))
    except BadImage as bad:
        raise LabelStudioError(f"{bad}; run push again") from None


def _file_problem(fs_path: str | bytes, size: int, mtime_ns: int,
                  etag: str | None = None) -> tuple[str, str] | None:
    if is_object_url(fs_path):  # an object: its ETag and size, one HEAD request
        return object_problem(fs_path, size, etag)
    shown = os.fsdecode(fs_path)
    try:
        st = os.stat(fs_path)
    except FileNotFoundError:
        return "missing", shown
    except OSError as exc:
        return "unreadable", f"{shown}: {exc.strerror}"
    if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
        return "changed", f"{shown} changed since ingest; run labelassist ingest again"
    return None


def push_after_rounds(db: Database, client: LabelStudioClient, source: ImageSource,
                      log: Callable[[str], None] = lambda line: None
                      ) -> Callable[[WorkerStats], None]:
    """`worker --push`: after a round that predicted something, push those versions."""
    from ..db.queries import resolve_version

    seen = {"predicted": 0}

    def after_round(stats: WorkerStats) -> None:
        if stats.predicted == seen["predicted"]:
            return
        seen["predicted"] = stats.predicted
        for name in stats.per_version:
            summary = push(db, client, resolve_version(db, name), source)
            stats.pushed_tasks += summary.tasks_created
            if summary.tasks_created or summary.predictions_added:
                log(f"pushed {summary.tasks_created:,} tasks, "
                    f"{summary.predictions_added:,} predictions ({name})")

    return after_round
