"""Pull reviewers' answers back: new, changed, deleted and skipped annotations."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from ..db import Database
from ..db.models import Annotation, LSProject, LSTask, ModelVersion, utcnow
from ..errors import LabelStudioError
from ..queries import rows_in_chunks
from .client import LabelStudioClient
from .project import FROM_NAME, Progress, list_remote_tasks


@dataclass
class PullSummary:
    tasks_seen: int = 0
    new: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    cancelled: int = 0
    unknown_tasks: int = 0
    projects: list[str] = field(default_factory=list)


OVERLAP = timedelta(seconds=1)  # re-read a task saved while the last pull was listing


def pull(db: Database, client: LabelStudioClient, *, full: bool = False,
         on_progress: Progress | None = None) -> PullSummary:
    """Store annotations that are new or changed since the last pull, in every project we
    pushed to on this server; mark the ones deleted in Label Studio."""
    client.check_server()
    with db.read() as s:
        projects = s.scalars(select(LSProject).where(LSProject.url == client.conn.url)).all()
    if not projects:
        raise LabelStudioError(f"nothing was pushed to {client.conn.url} yet: run labelassist "
                               "push first")
    summary = PullSummary()
    users = {u["id"]: u.get("email") or u.get("username")
             for u in client.get_json("/api/users", "listing users")}
    for done, project in enumerate(projects, start=1):
        since = None if full or project.last_pull_at is None else \
            _aware(project.last_pull_at) - OVERLAP
        tasks = list_remote_tasks(client, project.ls_project_id, since)
        _store_annotations(db, project, tasks, users, summary)
        # The watermark is the server's own clock (the newest updated_at seen), so clock
        # skew between this machine and Label Studio cannot hide a change.
        stamps = [_parse_time(t.get("updated_at")) for t in tasks if t.get("updated_at")]
        if stamps:
            with db.write() as s:
                s.get(LSProject, project.id).last_pull_at = max(stamps)
        summary.projects.append(project.title)
        if on_progress:
            on_progress(done, len(projects))
    return summary


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _store_annotations(db: Database, project: LSProject, tasks: list[dict], users: dict,
                       summary: PullSummary) -> None:
    versions_by_name = {}
    with db.write() as s:
        local_tasks = {t.ls_task_id: t for t in rows_in_chunks(s, lambda chunk: select(LSTask)
                       .where(LSTask.project_id == project.id, LSTask.ls_task_id.in_(chunk)),
                       [t["id"] for t in tasks], scalars=True)}
        for name, vid in s.execute(select(ModelVersion.name, ModelVersion.id)):
            versions_by_name[name] = vid
        for task in tasks:
            summary.tasks_seen += 1
            local = local_tasks.get(task["id"])
            if local is None:
                summary.unknown_tasks += 1  # made in Label Studio by hand: not ours to audit
                continue
            predictions = {p["id"]: p for p in task.get("predictions", [])}
            stored = {a.ls_annotation_id: a for a in s.scalars(select(Annotation).where(
                Annotation.project_id == project.id, Annotation.image_id == local.image_id))}
            seen = set()
            for remote in task.get("annotations", []):
                seen.add(remote["id"])
                values = _annotation_values(remote, predictions, versions_by_name, users)
                row = stored.get(remote["id"])
                if row is None:
                    s.add(Annotation(project_id=project.id, ls_annotation_id=remote["id"],
                                     image_id=local.image_id, **values))
                    summary.new += 1
                elif row.deleted_at is not None or _aware(row.ls_updated_at) != \
                        values["ls_updated_at"]:
                    for key, value in values.items():
                        setattr(row, key, value)
                    row.deleted_at, row.pulled_at = None, utcnow()
                    summary.updated += 1
                else:
                    summary.unchanged += 1
                summary.cancelled += bool(values["cancelled"])
            for ls_id, row in stored.items():
                if ls_id not in seen and row.deleted_at is None:
                    row.deleted_at = utcnow()
                    summary.deleted += 1


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
            "ls_created_at": _parse_time(remote.get("created_at")),
            "ls_updated_at": _parse_time(remote.get("updated_at"))}


def _choice(result: list[dict]) -> str | None:
    for item in result:
        if item.get("from_name") == FROM_NAME and item.get("type") == "choices":
            choices = item.get("value", {}).get("choices") or []
            return choices[0] if choices else None
    return None
