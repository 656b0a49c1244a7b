"""Push predictions to Label Studio as pre-annotations; pull the reviewers' answers back.

Push is resumable: every import is journalled (ls_push_journal) before it is sent. A
push that died between Label Studio accepting a batch and our commit is reconciled on
the next push by asking Label Studio which journalled images it already has, so no task
or prediction is lost or sent twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote, urlparse
from xml.sax.saxutils import quoteattr

from sqlalchemy import delete, select

from .db import Database
from .db.models import (Annotation, File, Image, LSPrediction, LSProject, LSPushJournal, LSTask,
                        ModelVersion, Prediction, utcnow)
from .errors import LabelStudioError
from .lsclient import LabelStudioClient

FROM_NAME, TO_NAME = "label", "image"
BATCH = 500
UPLOAD_BATCH = 50
MAX_TITLE = 50
# The SDK retries 5xx on its own; an import that may have landed must not be re-sent.
NO_SDK_RETRIES = {"max_retries": 0}
Progress = Callable[[int, int], None]


def label_config(classes: list[str]) -> str:
    """An Image plus one single-choice Choices named `label`, from the classes."""
    choices = "\n    ".join(f"<Choice value={quoteattr(c)}/>" for c in classes)
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
            f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" '
            f'showInLine="true">\n    {choices}\n  </Choices>\n</View>')


def choice_result(label: str) -> list[dict]:
    return [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
             "value": {"choices": [label]}}]


@dataclass
class PushSummary:
    project_id: int
    project_url: str
    model_version: str
    tasks_created: int = 0
    predictions_added: int = 0
    recovered: int = 0
    already_there: int = 0


@dataclass(frozen=True)
class ImageSource:
    """How reviewers' browsers get the pixels: 'local' files under root, or 'upload'."""

    mode: str
    root: Path | None = None

    def check(self, conn_url: str) -> None:
        if self.mode == "local" and self.root is None:
            raise LabelStudioError("local files need Label Studio's LOCAL_FILES_DOCUMENT_ROOT: "
                                   "pass --ls-root DIR (or --image-mode upload)")


def resolve_image_source(mode: str, root: str | None, ls_url: str) -> ImageSource:
    root = root or os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT") \
        or os.environ.get("LOCAL_FILES_DOCUMENT_ROOT")
    if mode == "auto":
        local_host = urlparse(ls_url).hostname in ("127.0.0.1", "localhost", "::1")
        mode = "local" if root and local_host else "upload"
    if mode not in ("local", "upload"):
        raise LabelStudioError(f"--image-mode {mode!r}: use auto, local or upload")
    return ImageSource(mode, Path(root).resolve() if root else None)


def ensure_project(db: Database, client: LabelStudioClient, version: ModelVersion,
                   title: str | None, mode: str) -> LSProject:
    """The project for this label set: ours if we made it, else found by title, else new.
    Classes missing from an existing project's choices are added to its config."""
    classes = list(version.label_set["classes"])
    # Label Studio keeps at most 50 characters of a title; look up what it will store.
    title = (title or f"labelassist: {' / '.join(classes)}")[:MAX_TITLE]
    with db.read() as session:
        known = session.scalars(select(LSProject).where(
            LSProject.url == client.conn.url, LSProject.title == title)).first()
    remote = None
    if known is not None:
        remote = client.call("reading the project", _get_or_none, client, known.ls_project_id)
    if remote is None:
        remote = next((p for p in client.call("listing projects", lambda: list(
            client.sdk.projects.list(title=title))) if p.title == title), None)
    if remote is None:
        remote = client.call("creating the project", client.sdk.projects.create, title=title,
                             label_config=label_config(classes),
                             description="Pre-labelled by labelassist; model_version shows "
                                         "which prompt set made each prediction.")
    else:
        _add_missing_choices(client, remote, classes)
    with db.write() as session:
        row = session.scalars(select(LSProject).where(
            LSProject.url == client.conn.url, LSProject.ls_project_id == remote.id)).first()
        if row is None:
            row = LSProject(url=client.conn.url, ls_project_id=remote.id, title=title,
                            classes=classes, image_mode=mode)
            session.add(row)
        row.classes = sorted(set(row.classes) | set(classes), key=(row.classes + classes).index)
        session.flush()
        return row


def _get_or_none(client: LabelStudioClient, project_id: int):
    from label_studio_sdk.core.api_error import ApiError

    try:
        return client.sdk.projects.get(id=project_id)
    except ApiError as exc:
        if exc.status_code == 404:
            return None
        raise


def _add_missing_choices(client: LabelStudioClient, remote, classes: list[str]) -> None:
    import re

    have = re.findall(r'<Choice\s+value="([^"]*)"', remote.label_config or "")
    from xml.sax.saxutils import unescape

    have = [unescape(h, {"&quot;": '"'}) for h in have]
    missing = [c for c in classes if c not in have]
    if missing:
        client.call("updating the labeling config", client.sdk.projects.update, id=remote.id,
                    label_config=label_config(have + missing))


def push(db: Database, client: LabelStudioClient, version: ModelVersion, source: ImageSource,
         *, title: str | None = None, order: str = "ingest", batch_size: int = BATCH,
         on_progress: Progress | None = None) -> PushSummary:
    """Create a task per predicted image (with its prediction), and add this version's
    predictions to tasks that exist already. Safe to rerun and to interrupt."""
    source.check(client.conn.url)
    client.check_server()
    project = ensure_project(db, client, version, title, source.mode)
    summary = PushSummary(project.ls_project_id, f"{client.conn.url}/projects/"
                          f"{project.ls_project_id}", version.name)
    _reconcile_journal(db, client, project, summary)
    pusher = _Pusher(db, client, project, version, source, summary)
    total = pusher.count_todo()
    done = 0
    for kind, batch in pusher.batches(order, batch_size):
        pusher.send(kind, batch)
        done += len(batch)
        if on_progress:
            on_progress(done, total)
    return summary


class _Pusher:
    def __init__(self, db, client, project, version, source, summary):
        self.db, self.client, self.project = db, client, project
        self.version, self.source, self.summary = version, source, summary
        self.storages: set[Path] | None = None

    def new_task_query(self):
        return (select(Prediction, Image.sha256).join(Image, Image.id == Prediction.image_id)
                .where(Prediction.model_version_id == self.version.id, Image.error.is_(None),
                       ~select(LSTask.id).where(LSTask.project_id == self.project.id,
                                                LSTask.image_id == Prediction.image_id).exists()))

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
        sort = {"ingest": Prediction.image_id, "uncertain": Prediction.margin,
                "confident": Prediction.confidence.desc()}.get(order)
        if sort is None:
            raise LabelStudioError(f"--order {order!r}: use ingest, uncertain or confident")
        for kind, query in (("tasks", self.new_task_query()),
                            ("predictions", self.new_prediction_query())):
            while True:
                with self.db.read() as s:
                    rows = s.execute(query.order_by(sort, Prediction.image_id)
                                     .limit(batch_size)).all()
                if not rows:
                    break
                yield kind, rows

    def send(self, kind: str, rows) -> None:
        image_ids = [r[0].image_id for r in rows]
        with self.db.write() as s:
            entry = LSPushJournal(project_id=self.project.id, kind=kind,
                                  model_version_id=self.version.id, image_ids=image_ids)
            s.add(entry)
            s.flush()
            entry_id = entry.id
        if kind == "tasks":
            payload = self.task_payloads(rows)
            result = self.client.call("importing tasks", self.client.sdk.projects.import_tasks,
                                      id=self.project.ls_project_id, request=payload,
                                      return_task_ids=True, idempotent=False,
                                      request_options=NO_SDK_RETRIES)
            task_ids = list(result.task_ids or [])
            if len(task_ids) != len(rows):
                raise LabelStudioError(f"Label Studio created {len(task_ids)} tasks for "
                                       f"{len(rows)} images; run push again to reconcile")
            record_tasks(self.db, self.project.id, self.version.id, image_ids, task_ids,
                         entry_id)
            self.summary.tasks_created += len(rows)
        else:
            payload = [{"task": task.ls_task_id, **prediction_payload(p, self.version.name)}
                       for p, task in rows]
            self.client.call("importing predictions", self.client.sdk.projects.import_predictions,
                             id=self.project.ls_project_id, request=payload, idempotent=False,
                             request_options=NO_SDK_RETRIES)
            record_predictions(self.db, self.version.id, [task.id for _, task in rows], entry_id)
            self.summary.predictions_added += len(rows)

    def task_payloads(self, rows) -> list[dict]:
        with self.db.read() as s:
            paths = dict(s.execute(select(File.image_id, File.path).where(
                File.image_id.in_([p.image_id for p, _ in rows]), File.error.is_(None))
                .order_by(File.id.desc())).all())
        urls = self.image_urls([paths[p.image_id] for p, _ in rows])
        return [{"data": {"image": url, "sha256": sha, "path": paths[p.image_id]},
                 "predictions": [prediction_payload(p, self.version.name)]}
                for (p, sha), url in zip(rows, urls)]

    def image_urls(self, paths: list[str]) -> list[str]:
        if self.source.mode == "upload":
            return upload_images(self.client, self.project.ls_project_id, paths)
        root = self.source.root
        rels = []
        for path in paths:
            resolved = Path(path).resolve()
            if root not in resolved.parents or resolved.parent == root:
                raise LabelStudioError(
                    f"{path} is not inside a folder under Label Studio's local-files root "
                    f"{root}: pass --ls-root with a parent of your images, or "
                    "--image-mode upload")
            rels.append(resolved.relative_to(root))
        self.ensure_storages({root / rel.parts[0] for rel in rels})
        return [f"/data/local-files/?d={quote(rel.as_posix(), safe='/')}" for rel in rels]

    def ensure_storages(self, folders: set[Path]) -> None:
        """One local storage per top-level folder under the root (Label Studio refuses the
        root itself and serves a file only when some storage covers it)."""
        if self.storages is None:
            existing = self.client.call("listing storages", self.client.sdk.import_storage.local
                                        .list, project=self.project.ls_project_id)
            self.storages = {Path(st.path) for st in existing if st.path}
        for folder in sorted(folders - self.storages):
            self.client.call("adding a local-files storage",
                             self.client.sdk.import_storage.local.create,
                             project=self.project.ls_project_id, path=str(folder),
                             title=f"labelassist: {folder.name}", use_blob_urls=True)
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
            handles = [open(p, "rb") for p in chunk]
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


def record_tasks(db: Database, project_id: int, version_id: int, image_ids: list[int],
                 task_ids: list[int], journal_id: int | None) -> None:
    with db.write() as s:
        for image_id, task_id in zip(image_ids, task_ids):
            task = LSTask(project_id=project_id, image_id=image_id, ls_task_id=task_id)
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


def _reconcile_journal(db: Database, client: LabelStudioClient, project: LSProject,
                       summary: PushSummary) -> None:
    """Record what an interrupted push got into Label Studio; drop the rest of the entry."""
    with db.read() as s:
        entries = s.scalars(select(LSPushJournal).where(
            LSPushJournal.project_id == project.id).order_by(LSPushJournal.id)).all()
    if not entries:
        return
    remote = list_remote_tasks(client, project.ls_project_id)
    by_sha = {t["data"].get("sha256"): t for t in remote}
    for entry in entries:
        version_name = _version_name(db, entry.model_version_id)
        with db.read() as s:
            if entry.kind == "tasks":
                shas = dict(s.execute(select(Image.id, Image.sha256).where(
                    Image.id.in_(entry.image_ids))).all())
                found = [(i, by_sha[shas[i]]["id"]) for i in entry.image_ids
                         if shas.get(i) in by_sha]
            else:
                tasks = s.scalars(select(LSTask).where(
                    LSTask.project_id == project.id, LSTask.image_id.in_(entry.image_ids))).all()
                remote_by_id = {t["id"]: t for t in remote}
                found = [t.id for t in tasks if any(
                    p.get("model_version") == version_name
                    for p in remote_by_id.get(t.ls_task_id, {}).get("predictions", []))]
        if entry.kind == "tasks":
            with db.read() as s:
                recorded = set(s.scalars(select(LSTask.image_id).where(
                    LSTask.project_id == project.id, LSTask.image_id.in_(entry.image_ids))))
            found = [(i, t) for i, t in found if i not in recorded]
            record_tasks(db, project.id, entry.model_version_id, [i for i, _ in found],
                         [t for _, t in found], entry.id)
        else:
            record_predictions(db, entry.model_version_id, found, entry.id)
        summary.recovered += len(found)


def _version_name(db: Database, version_id: int) -> str:
    with db.read() as s:
        return s.get(ModelVersion, version_id).name


def list_remote_tasks(client: LabelStudioClient, project_id: int, since: datetime | None = None):
    """Every task of the project (or those updated after `since`), with annotations and
    predictions, page by page."""
    query = None
    if since is not None:
        value = since.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        query = json.dumps({"filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime",
             "value": value}]}})
    tasks, page = [], 1
    while True:
        body = client.get_json("/api/tasks", "listing tasks", project=project_id, page=page,
                               page_size=500, fields="all", **({"query": query} if query else {}))
        batch = body.get("tasks", []) if isinstance(body, dict) else body
        tasks += batch
        total = body.get("total", len(tasks)) if isinstance(body, dict) else len(tasks)
        if not batch or len(tasks) >= total:  # a page past the end would be a 404
            return tasks
        page += 1


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
        local_tasks = {t.ls_task_id: t for t in s.scalars(select(LSTask).where(
            LSTask.project_id == project.id,
            LSTask.ls_task_id.in_([t["id"] for t in tasks])))}
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
