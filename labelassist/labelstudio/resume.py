"""What a push records, and how an interrupted push resumes: every import is journalled
(ls_push_journal) before it is sent; a push that died between Label Studio accepting a
batch and our commit is reconciled on the next push by asking Label Studio which
journalled images it already has, so no task or prediction is lost or sent twice."""

from __future__ import annotations

from sqlalchemy import delete, select

from ..db import Database
from ..db.models import Image, LSPrediction, LSProject, LSPushJournal, LSTask, ModelVersion
from ..db.queries import rows_in_chunks
from .client import LabelStudioClient
from .project import iter_remote_pages
from .tasks import sha_key


def record_tasks(db: Database, project_id: int, version_id: int, image_ids: list[int],
                 task_ids: list[int], journal_id: int | None, *,
                 keys: list[str | None] | None = None) -> None:
    """Tasks made for these images; `keys` is what each task's data says its image is
    (labelstudio/tasks.py), so a reused task id is never taken for this image."""
    keys = keys or [None] * len(image_ids)
    with db.write() as s:
        for image_id, task_id, key in zip(image_ids, task_ids, keys):
            task = LSTask(project_id=project_id, image_id=image_id, ls_task_id=task_id,
                          image_key=key)
            s.add(task)
            s.flush()
            s.add(LSPrediction(task_id=task.id, model_version_id=version_id))
        if journal_id is not None:
            s.execute(delete(LSPushJournal).where(LSPushJournal.id == journal_id))


def record_predictions(db: Database, version_id: int, task_row_ids: list[int],
                       journal_id: int | None) -> None:
    with db.write() as s:
        s.add_all([LSPrediction(task_id=t, model_version_id=version_id) for t in task_row_ids])
        if journal_id is not None:
            s.execute(delete(LSPushJournal).where(LSPushJournal.id == journal_id))


def reconcile_journal(db: Database, client: LabelStudioClient, project: LSProject,
                       summary) -> None:
    """Record what an interrupted push got into Label Studio; drop the rest of the entry.
    The project's tasks are read a page at a time, keeping only the journalled ones."""
    with db.read() as s:
        entries = s.scalars(select(LSPushJournal).where(
            LSPushJournal.project_id == project.id).order_by(LSPushJournal.id)).all()
        if not entries:
            return
        journalled = {i for e in entries for i in e.image_ids}
        shas = dict(rows_in_chunks(s, lambda chunk: select(Image.id, Image.sha256).where(
            Image.id.in_(chunk)), journalled))
        tasks = {t.image_id: t for t in rows_in_chunks(s, lambda chunk: select(LSTask).where(
            LSTask.project_id == project.id, LSTask.image_id.in_(chunk)), journalled,
            scalars=True)}
    wanted_shas, wanted_tasks = set(shas.values()), {t.ls_task_id for t in tasks.values()}
    task_by_sha, versions_of_task = {}, {}
    for page, _ in iter_remote_pages(client, project.ls_project_id):
        for remote in page:
            sha = (remote.get("data") or {}).get("sha256")
            if sha in wanted_shas:
                task_by_sha.setdefault(sha, remote["id"])
            if remote["id"] in wanted_tasks:
                versions_of_task[remote["id"]] = {p.get("model_version")
                                                  for p in remote.get("predictions", [])}
    for entry in entries:
        if entry.kind == "tasks":
            found = [(i, task_by_sha[shas[i]]) for i in entry.image_ids
                     if shas.get(i) in task_by_sha and i not in tasks]
            record_tasks(db, project.id, entry.model_version_id, [i for i, _ in found],
                         [t for _, t in found], entry.id,
                         keys=[sha_key(shas[i]) for i, _ in found])
        else:
            name = _version_name(db, entry.model_version_id)
            found = [tasks[i].id for i in entry.image_ids if i in tasks
                     and name in versions_of_task.get(tasks[i].ls_task_id, ())]
            record_predictions(db, entry.model_version_id, found, entry.id)
        summary.recovered += len(found)


def _version_name(db: Database, version_id: int) -> str:
    with db.read() as s:
        return s.get(ModelVersion, version_id).name
