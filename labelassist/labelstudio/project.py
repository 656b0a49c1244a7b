"""The Label Studio project: its labeling config, where its images come from, and
listing its tasks."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse
from xml.sax.saxutils import quoteattr

from sqlalchemy import select

from ..db import Database
from ..db.models import LSProject, ModelVersion
from ..errors import LabelStudioError
from .client import LabelStudioClient

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



@dataclass(frozen=True)
class ImageSource:
    """How reviewers' browsers get the pixels: 'local' files under root, or 'upload'."""

    mode: str
    root: Path | None = None

    def check(self) -> None:
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


