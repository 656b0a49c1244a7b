"""Which image a Label Studio task names, and forgetting tasks that are gone.

A task id alone names nothing for long: anyone on the project may delete a task or import
their own, and Label Studio on SQLite gives a deleted newest task's id to the next task
made in the project. So a task is taken for one of our images only while its data says so
(the sha256 that push puts in every task, or the image address of a task labelassist
fetched), and a task that is gone, or whose id now names another task, is forgotten: its
reviews stop counting, its row leaves the task map, and a tombstone keeps push from making
it again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import delete, select, update

from ..db import Database, insert_ignoring_duplicates
from ..db.models import Annotation, Image, LSDeletedTask, LSPrediction, LSTask, utcnow
from ..db.queries import rows_in_chunks
from .client import LabelStudioClient

# Ids are Integer columns here (32 bits on PostgreSQL): a larger one names no task of ours.
MAX_ID = 2**31 - 1


def is_id(value) -> bool:
    """A Label Studio id as this ledger can hold one (webhooks and callers send anything)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_ID


def image_value(data) -> str | None:
    """The task's image address: `image`, else its first text value (a hand-made config
    may name its image field otherwise)."""
    if not isinstance(data, dict):
        return None
    value = data.get("image")
    if value is None:
        value = next((v for v in data.values() if isinstance(v, str)), None)
    return value if isinstance(value, str) and value else None


def task_key(data) -> str | None:
    """What a task's data says its image is: the content hash push sent, else the image
    address (a task imported straight into Label Studio)."""
    sha = data.get("sha256") if isinstance(data, dict) else None
    if isinstance(sha, str) and sha:
        return f"sha256:{sha}"
    image = image_value(data)
    return None if image is None else f"image:{image}"


def sha_key(sha256: str) -> str:
    return f"sha256:{sha256}"


@dataclass(frozen=True)
class TaskRow:
    id: int  # the ledger's row
    image_id: int
    ls_task_id: int
    image_key: str | None
    sha256: str

    def names(self, data) -> bool:
        """Does a task with this data still show this row's image?"""
        if self.image_key is not None:
            return task_key(data) == self.image_key
        # Recorded before keys were kept: a pushed task carries its image's hash; a task
        # that serve fetched carried none, and is taken as it was.
        sha = data.get("sha256") if isinstance(data, dict) else None
        return sha is None or sha == self.sha256


def task_rows(session, project_id: int, ls_task_ids) -> dict[int, list[TaskRow]]:
    """The ledger's rows for these Label Studio task ids (a reused id may have two)."""
    rows: dict[int, list[TaskRow]] = {}
    for row in rows_in_chunks(session, lambda chunk: select(
            LSTask.id, LSTask.image_id, LSTask.ls_task_id, LSTask.image_key, Image.sha256)
            .join(Image, Image.id == LSTask.image_id)
            .where(LSTask.project_id == project_id, LSTask.ls_task_id.in_(chunk)),
            sorted({i for i in ls_task_ids if is_id(i)})):
        rows.setdefault(row.ls_task_id, []).append(TaskRow(*row))
    return rows


def match(rows: list[TaskRow], data) -> tuple[TaskRow | None, list[TaskRow]]:
    """The row this task's data names, and the stale rows of its id (a task that was
    deleted, whose id Label Studio gave to the task that has it now)."""
    found = next((r for r in rows if r.names(data)), None)
    return found, [r for r in rows if r is not found]


@dataclass
class Forgotten:
    tasks: int = 0
    reviews: int = 0  # annotations that stopped counting


def forget_tasks(db: Database, project_id: int, rows: list[TaskRow]) -> Forgotten:
    """Tasks that are gone from Label Studio: their images' reviews in this project stop
    counting, their rows leave the task map, and a tombstone keeps push from sending the
    image again. Rows are named by the ledger's id: a reused task id may name a live row."""
    done = Forgotten()
    if not rows:
        return done
    with db.write() as s:
        for start in range(0, len(rows), 500):
            chunk = rows[start:start + 500]
            row_ids, image_ids = [r.id for r in chunk], [r.image_id for r in chunk]
            done.reviews += s.execute(update(Annotation).where(
                Annotation.project_id == project_id, Annotation.image_id.in_(image_ids),
                Annotation.deleted_at.is_(None)).values(deleted_at=utcnow())).rowcount
            s.execute(delete(LSPrediction).where(LSPrediction.task_id.in_(row_ids)))
            done.tasks += s.execute(delete(LSTask).where(LSTask.id.in_(row_ids))).rowcount
            insert_ignoring_duplicates(s, LSDeletedTask, [
                {"project_id": project_id, "image_id": r.image_id, "ls_task_id": r.ls_task_id,
                 "deleted_at": utcnow()} for r in chunk])
    return done


def read_tasks(client: LabelStudioClient, project_id: int, ids: list[int],
               include: str = "id,data") -> dict[int, dict]:
    """These tasks as Label Studio has them now (absent: deleted), in one request per
    1,000 ids, with only the fields named."""
    found: dict[int, dict] = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start:start + 1000]
        query = json.dumps({"selectedItems": {"all": False, "included": chunk}})
        body = client.get_json("/api/tasks", "reading tasks", project=project_id,
                               page_size=len(chunk), include=include, query=query)
        tasks = body.get("tasks", []) if isinstance(body, dict) else body
        found.update({t["id"]: t for t in tasks if isinstance(t, dict) and t.get("id") in chunk})
    return found


def check_task_rows(db: Database, client: LabelStudioClient, project_id: int,
                    ls_project_id: int, rows: list[TaskRow]) -> tuple[list[TaskRow], Forgotten]:
    """Of these rows, the ones whose task still shows their image; the others (deleted,
    or their id reused by another task) are forgotten."""
    remote = read_tasks(client, ls_project_id, sorted({r.ls_task_id for r in rows}))
    live = [r for r in rows if r.ls_task_id in remote and r.names(remote[r.ls_task_id].get("data"))]
    keep = {r.id for r in live}
    return live, forget_tasks(db, project_id, [r for r in rows if r.id not in keep])
