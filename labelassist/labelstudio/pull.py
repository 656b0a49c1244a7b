"""Pull reviewers' answers back: new, changed, deleted and skipped annotations."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from ..db import Database
from ..db.models import Annotation, Image, LSProject, LSTask, ModelVersion, as_utc, utcnow
from ..errors import LabelStudioError
from ..db.queries import rows_in_chunks
from .client import LabelStudioClient
from .project import (BATCH, FROM_NAME, MADE_IN_STUDIO, ChoicesControl, Progress,
                      as_labelassist_choices, iter_remote_pages, iter_remote_task_ids,
                      read_choices)
from .tasks import Forgotten, TaskRow, forget_tasks, match, task_rows


@dataclass
class PullSummary:
    tasks_seen: int = 0
    new: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    cancelled: int = 0
    unknown_tasks: int = 0
    tasks_gone: int = 0  # deleted in Label Studio: their annotations no longer count
    tasks_replaced: int = 0  # their id now names another task (Label Studio reused it)
    projects: list[str] = field(default_factory=list)

    def count_forgotten(self, forgotten: Forgotten, *, replaced: bool = False) -> None:
        self.deleted += forgotten.reviews
        if replaced:
            self.tasks_replaced += forgotten.tasks
        else:
            self.tasks_gone += forgotten.tasks


# A change whose request began before the pull started may commit a moment later with an
# older updated_at: the next pull looks back this far before this pull's start.
MARGIN = timedelta(seconds=2)


def pull(db: Database, client: LabelStudioClient, *, full: bool = False,
         page_size: int = BATCH, on_progress: Progress | None = None) -> PullSummary:
    """Store annotations that are new or changed since the last pull, in every project we
    pushed to on this server; mark the ones deleted in Label Studio, and the annotations
    of tasks deleted there. Works a page at a time; progress is (tasks seen, total)."""
    client.check_server()
    with db.read() as s:
        projects = s.scalars(select(LSProject).where(LSProject.url == client.conn.url)).all()
    if not projects:
        raise LabelStudioError(f"nothing was pushed to {client.conn.url} yet: run labelassist "
                               "push first")
    summary = PullSummary()
    users = {u["id"]: u.get("email") or u.get("username")
             for u in client.get_json("/api/users", "listing users")}
    for project in projects:
        # The watermark is the server's clock when this pull began (minus a margin), not
        # the newest change seen: a change committed while pages are read has a later
        # updated_at than the start, so the next pull sees it. Clock skew between this
        # machine and Label Studio does not matter either.
        started = client.server_time()
        since = None if full or project.last_pull_at is None else as_utc(project.last_pull_at)
        control = project_choices(client, project)  # a project made in Label Studio names
        for read_at, (tasks, total) in _timed(iter_remote_pages(  # its control as it likes
                client, project.ls_project_id, since, page_size=page_size)):
            store_annotations(db, project, as_labelassist_choices(tasks, control), users,
                              summary, read_at)
            if on_progress:
                on_progress(summary.tasks_seen, total)
        _forget_deleted_tasks(db, client, project, summary)
        with db.write() as s:
            s.get(LSProject, project.id).last_pull_at = started - MARGIN
        summary.projects.append(project.title)
    return summary


def project_choices(client: LabelStudioClient, project: LSProject) -> ChoicesControl:
    """The project's Choices control, as its labeling config has it now: read for a
    project made in Label Studio (serve adopted it); a project labelassist pushed has its
    own `label` (and then nothing to read). Labelassist's `label` when the config has none
    that labels an image."""
    if project.image_mode != MADE_IN_STUDIO:
        return ChoicesControl()
    remote = client.get_json(f"/api/projects/{project.ls_project_id}", "reading the project")
    try:
        return read_choices(remote.get("label_config") or "", repr(project.title))
    except LabelStudioError:
        return ChoicesControl()


def _timed(pages):
    """Each page with the ledger's time just before it was asked for: what the ledger
    stored before then and the page lacks was deleted; anything stored later (serve,
    beside this pull) is newer than the page and is left alone."""
    while True:
        read_at = utcnow()
        try:
            page = next(pages)
        except StopIteration:
            return
        yield read_at, page


def _forget_deleted_tasks(db: Database, client: LabelStudioClient, project: LSProject,
                          summary: PullSummary) -> None:
    """A task deleted in Label Studio is absent from every listing; it is forgotten (its
    annotations here marked deleted, so audit, learn and export stop counting them)."""
    with db.read() as s:  # reviewed tasks; each one the listing shows is crossed off
        gone = {row.ls_task_id: TaskRow(*row) for row in s.execute(
            select(LSTask.id, LSTask.image_id, LSTask.ls_task_id, LSTask.image_key,
                   Image.sha256).distinct()
            .join(Image, Image.id == LSTask.image_id)
            .join(Annotation, (Annotation.image_id == LSTask.image_id)
                  & (Annotation.project_id == LSTask.project_id))
            .where(LSTask.project_id == project.id, Annotation.deleted_at.is_(None)))}
    if not gone:
        return
    listed, total = 0, 0
    for ids, total in iter_remote_task_ids(client, project.ls_project_id):
        listed += len(ids)
        for ls_task_id in ids:
            gone.pop(ls_task_id, None)
    if listed < total:
        return  # an incomplete listing proves nothing: never drop a review on a guess
    if gone:
        summary.count_forgotten(forget_tasks(db, project.id, list(gone.values())))


def _parse_time(value, what: str = "a timestamp") -> datetime | None:
    """An ISO 8601 time from Label Studio, in UTC (SQLite keeps no offset)."""
    if value is None or value == "":
        return None
    try:
        return as_utc(datetime.fromisoformat(str(value).replace("Z", "+00:00"))) \
            .astimezone(timezone.utc)
    except ValueError:
        raise LabelStudioError(f"Label Studio sent an unreadable time {value!r} for {what}; "
                               "is --ls-url a Label Studio server?") from None


def store_annotations(db: Database, project: LSProject, tasks: list[dict], users: dict,
                      summary: PullSummary, read_at: datetime) -> None:
    """Store a page of tasks' annotations (read from Label Studio at `read_at`, ledger
    time): new ones added, newer ones written over older, and stored ones the page lacks
    marked deleted. A task is ours only while its data names the image we recorded; a
    row whose id now names another task is forgotten. Pull and serve both write here, so
    an older read never undoes a newer one."""
    versions_by_name = {}
    with db.read() as s:
        rows = task_rows(s, project.id, [t.get("id") for t in tasks])
    local_tasks, stale = {}, []
    for task in tasks:
        found, old = match(rows.get(task.get("id"), []), task.get("data"))
        stale += old
        if found is not None:
            local_tasks[task["id"]] = found
    if stale:
        summary.count_forgotten(forget_tasks(db, project.id, stale), replaced=True)
    with db.write() as s:
        for name, vid in s.execute(select(ModelVersion.name, ModelVersion.id)):
            versions_by_name[name] = vid
        # The page's stored annotations in one query per chunk, not one per task
        stored_by_image: dict[int, dict] = {}
        for row in rows_in_chunks(s, lambda chunk: select(Annotation).where(
                Annotation.project_id == project.id, Annotation.image_id.in_(chunk)),
                [t.image_id for t in local_tasks.values()], scalars=True):
            stored_by_image.setdefault(row.image_id, {})[row.ls_annotation_id] = row
        for task in tasks:
            summary.tasks_seen += 1
            local = local_tasks.get(task.get("id"))
            if local is None:
                summary.unknown_tasks += 1  # made in Label Studio by hand: not ours to audit
                continue
            predictions = {p["id"]: p for p in task.get("predictions", [])}
            stored = stored_by_image.get(local.image_id, {})
            seen = set()
            for remote in task.get("annotations", []):
                seen.add(remote["id"])
                values = _annotation_values(remote, predictions, versions_by_name, users)
                _store_one(s, project, local.image_id, stored.get(remote["id"]), remote["id"],
                           values, read_at, summary)
                summary.cancelled += bool(values["cancelled"])
            for ls_id, row in stored.items():
                # Believed only when the row was stored before the page was read: a review
                # serve stored a moment ago is not on an older page, and is not deleted.
                if ls_id not in seen and row.deleted_at is None \
                        and as_utc(row.pulled_at) < read_at:
                    row.deleted_at = utcnow()
                    summary.deleted += 1


def _store_one(s, project: LSProject, image_id: int, row: Annotation | None, ls_id: int,
               values: dict, read_at: datetime, summary: PullSummary) -> None:
    """One annotation: added when new; written over when the page's copy is newer, or when
    it was marked deleted before the page was read; else left as it is."""
    if row is None:
        s.add(Annotation(project_id=project.id, ls_annotation_id=ls_id, image_id=image_id,
                         **values))
        summary.new += 1
        return
    stored, remote = row.ls_updated_at, values["ls_updated_at"]  # either may be missing
    newer = remote is not None and (stored is None or remote > as_utc(stored))
    revived = row.deleted_at is not None and as_utc(row.deleted_at) < read_at
    if newer or revived:
        for key, value in values.items():
            setattr(row, key, value)
        row.deleted_at, row.pulled_at = None, utcnow()
        summary.updated += 1
    else:
        summary.unchanged += 1


def _annotation_values(remote: dict, predictions: dict, versions_by_name: dict,
                       users: dict) -> dict:
    label = _choice(remote.get("result") or [])
    parent = predictions.get(remote.get("parent_prediction"))
    accepted = None
    version_id = None
    if parent is not None:
        version_id = versions_by_name.get(parent.get("model_version"))
        accepted = (not remote.get("was_cancelled")) and label == _choice(parent["result"])
    author = remote.get("completed_by")
    author = author.get("id") if isinstance(author, dict) else author
    return {"label": label, "cancelled": bool(remote.get("was_cancelled")),
            "model_version_id": version_id, "accepted_prediction": accepted,
            "annotator": users.get(author, str(author) if author is not None else None),
            "lead_time": remote.get("lead_time"),
            "ls_created_at": _parse_time(remote.get("created_at"),
                                         f"annotation {remote.get('id')}"),
            "ls_updated_at": _parse_time(remote.get("updated_at"),
                                         f"annotation {remote.get('id')}")}


def _choice(result: list[dict]) -> str | None:
    for item in result if isinstance(result, list) else []:
        if isinstance(item, dict) and item.get("from_name") == FROM_NAME \
                and item.get("type") == "choices":
            choices = (item.get("value") or {}).get("choices") or []
            return _as_label(choices[0]) if choices else None
    return None


def _as_label(value) -> str | None:
    """A choice as text: what a reviewer picked is a string, but a hand-made task or an
    API client can send anything."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)
