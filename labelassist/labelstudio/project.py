"""The Label Studio project: its labeling config, where its images come from, and
listing its tasks."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
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


def with_other(classes: list[str]) -> list[str]:
    """The classes and the reviewers' "none of these" (outofset.OTHER), unless a class has
    that name already."""
    from ..trust.outofset import OTHER

    return list(classes) + ([] if OTHER in classes else [OTHER])


def label_config(classes: list[str]) -> str:
    """An Image plus one single-choice Choices named `label`, from the classes (pass
    with_other(classes) to offer "other")."""
    choices = "\n    ".join(f"<Choice value={quoteattr(c)}/>" for c in classes)
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
            f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" '
            f'showInLine="true">\n    {choices}\n  </Choices>\n</View>')


def choice_result(label: str, control: ChoicesControl | None = None) -> list[dict]:
    """A prediction's result: one choice of the project's Choices control (labelassist's
    own `label` unless told which)."""
    from_name, to_name = (control.from_name, control.to_name) if control else (FROM_NAME,
                                                                                TO_NAME)
    return [{"from_name": from_name, "to_name": to_name, "type": "choices",
             "value": {"choices": [label]}}]


@dataclass(frozen=True)
class ChoicesControl:
    """The single choice a project asks of each image: its Choices control's name, the
    Image it labels, the choices it offers, and the task data key that image comes from."""

    from_name: str = FROM_NAME
    to_name: str = TO_NAME
    choices: tuple[str, ...] = ()
    image_key: str = "image"


def as_labelassist_choices(tasks: list[dict], control: ChoicesControl) -> list[dict]:
    """The tasks with the project's own Choices control named as labelassist names its
    own (`label`), which is where the ledger reads a reviewer's choice from."""
    if control.from_name == FROM_NAME:
        return tasks

    def renamed(results):
        if not isinstance(results, list):
            return results
        return [{**r, "from_name": FROM_NAME} if isinstance(r, dict)
                and r.get("from_name") == control.from_name else r for r in results]

    return [{**t, **{kind: [{**item, "result": renamed(item.get("result"))}
                            if isinstance(item, dict) else item
                            for item in t.get(kind) or []]
                     for kind in ("annotations", "predictions")}} for t in tasks]


def read_choices(config: str, title: str = "the project") -> ChoicesControl:
    """The Choices control of a labeling config that labels an Image: the one named
    `label` (what labelassist makes) when there is one, else the first."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(config or "")
    except ET.ParseError as exc:
        raise LabelStudioError(f"{title}'s labeling config is not valid XML ({exc}); fix it "
                               "in Label Studio's settings") from None
    images = {e.get("name"): str(e.get("value") or "") for e in root.iter("Image")
              if e.get("name")}  # an unnamed Image cannot be labelled
    controls = [c for c in root.iter("Choices")
                if (c.get("toName") or "").split(",")[0] in images and c.get("name")]
    control = next((c for c in controls if c.get("name") == FROM_NAME), None) or \
        next(iter(controls), None)
    if control is None:
        raise LabelStudioError(f"{title}'s labeling config has no <Choices> for an <Image>: "
                               "labelassist predicts one choice per image; add one in the "
                               "project's Settings > Labeling Interface")
    to_name = control.get("toName").split(",")[0]
    choices = tuple(c.get("alias") or c.get("value") for c in control.iter("Choice")
                    if c.get("alias") or c.get("value"))
    return ChoicesControl(control.get("name"), to_name, choices,
                          images[to_name].lstrip("$") or "image")



@dataclass(frozen=True)
class ImageSource:
    """How reviewers' browsers get the pixels: 'local' files under root (Label Studio's
    LOCAL_FILES_DOCUMENT_ROOT: its folders, or links to folders as `labelassist studio`
    makes one per --root), or 'upload'."""

    mode: str
    root: Path | None = None

    def check(self) -> None:
        if self.mode == "local" and self.root is None:
            raise LabelStudioError("local files need Label Studio's LOCAL_FILES_DOCUMENT_ROOT: "
                                   "pass --ls-root DIR (or --image-mode upload)")

    def folders(self) -> list[tuple[str, Path, bool]]:
        """(name, the folder it leads to, is a link) for each folder in root, the deepest
        first: a file is named through the nearest one that holds it."""
        try:
            entries = [(e.name, e.resolve(), e.is_symlink()) for e in self.root.iterdir()
                       if e.is_dir()]
        except OSError as exc:
            raise LabelStudioError(f"cannot read Label Studio's local-files root {self.root}: "
                                   f"{exc.strerror or exc}; check --ls-root") from None
        return sorted(entries, key=lambda e: (-len(e[1].parts), e[0]))

    def locate(self, path: str, folders) -> tuple[str, Path] | None:
        """The file's name below root, as Label Studio joins it (`?d=`, links unresolved),
        and the folder its local storage covers: a folder in root, or for a link (a whole
        --root) the top folder below it. None: no folder of root holds the file."""
        resolved = Path(path).resolve()
        for name, target, linked in folders:
            if target in resolved.parents:
                inner = resolved.relative_to(target)
                top = f"{name}/{inner.parts[0]}" if linked and len(inner.parts) > 1 else name
                return f"{name}/{inner.as_posix()}", self.root / top
        return None

    @staticmethod
    def came_from_label_studio(path: str) -> bool:
        """An image that serve fetched through Label Studio (serve/fetch.py keeps each as
        <sha256[:2]>/<sha256><suffix>), outside Label Studio's files: it goes by upload."""
        file = Path(path)
        return len(file.stem) == 64 and set(file.stem) <= set("0123456789abcdef") and \
            file.parent.name == file.stem[:2]


def resolve_image_source(mode: str, root: str | None, ls_url: str) -> ImageSource:
    root = root or os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT") \
        or os.environ.get("LOCAL_FILES_DOCUMENT_ROOT")
    if mode == "auto":
        local_host = urlparse(ls_url).hostname in ("127.0.0.1", "localhost", "::1")
        mode = "local" if root and local_host else "upload"
    if mode not in ("local", "upload"):
        raise LabelStudioError(f"--image-mode {mode!r}: use auto, local or upload")
    return ImageSource(mode, Path(root).resolve() if root else None)


def project_title(version: ModelVersion, title: str | None) -> str:
    # Label Studio keeps at most 50 characters of a title; look up what it will store.
    classes = list(version.label_set["classes"])
    return (title or f"labelassist: {' / '.join(classes)}")[:MAX_TITLE]


def ensure_project(db: Database, client: LabelStudioClient, version: ModelVersion,
                   title: str | None, mode: str) -> LSProject:
    """The project for this label set: ours if we made it, else found by title, else new.
    Classes missing from an existing project's choices are added to its config."""
    classes = list(version.label_set["classes"])
    title = project_title(version, title)
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
                             label_config=label_config(with_other(classes)),
                             description="Pre-labelled by labelassist; model_version shows "
                                         "which prompt set made each prediction.")
    else:
        _add_missing_choices(client, remote, with_other(classes))
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
    """Add the classes the project lacks as Choices of its `label` control, leaving every
    other control, attribute and choice as it is."""
    config = remote.label_config or ""
    updated = config_with_choices(config, classes)
    if updated is not None:
        client.call("updating the labeling config", client.sdk.projects.update, id=remote.id,
                    label_config=updated)


def config_with_choices(config: str, classes: list[str]) -> str | None:
    """The config with missing classes added, or None when nothing is missing."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(config, parser=ET.XMLParser(
            target=ET.TreeBuilder(insert_comments=True)))
    except ET.ParseError as exc:
        raise LabelStudioError(f"the project's labeling config is not valid XML ({exc}); "
                               "fix it in Label Studio's settings") from None
    control = next((c for c in root.iter("Choices") if c.get("name") == FROM_NAME), None)
    if control is None:
        raise LabelStudioError(f"the project's labeling config has no <Choices name="
                               f"\"{FROM_NAME}\">: labelassist predictions need one")
    have = {c.get("value") for c in control.iter("Choice")}
    missing = [c for c in classes if c not in have]
    if not missing:
        return None
    indent = (list(control)[-1].tail if len(control) else None) or "\n    "
    for name in missing:
        if len(control):
            control[-1].tail = indent
        element = ET.SubElement(control, "Choice", {"value": name})
        element.tail = "\n  "
    return ET.tostring(root, encoding="unicode")


def iter_remote_pages(client: LabelStudioClient, project_id: int,
                      since: datetime | None = None, *, page_size: int = BATCH,
                      include: str | None = None) -> Iterator[tuple[list[dict], int]]:
    """The project's tasks (or those updated after `since`), a page at a time, with the
    total the server reports. A server that serves fewer tasks a page than asked is read
    to the end; one whose `total` is wrong cannot make this loop (see the stop below)."""
    query = None
    if since is not None:
        value = since.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        query = json.dumps({"filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime",
             "value": value}]}})
    params = {"project": project_id, "page_size": page_size,
              **({"include": include} if include else {"fields": "all"}),
              **({"query": query} if query else {})}
    # Memory stays flat on any project: the last page's ids (pages may overlap when tasks
    # are added during the listing), and a fingerprint of each page (8 bytes a page).
    previous: set = set()
    fingerprints: set[int] = set()
    page, last_page, count = 1, None, 0
    while True:
        body = client.get_json("/api/tasks", "listing tasks", page=page, **params)
        batch = body.get("tasks", []) if isinstance(body, dict) else body
        if not isinstance(batch, list):
            raise LabelStudioError("Label Studio sent a task list that is not a list: check "
                                   "--ls-url")
        total = body.get("total") if isinstance(body, dict) else None
        total = total if isinstance(total, int) else count + len(batch)
        tasks = [t for t in batch if isinstance(t, dict)]
        ids = [repr(t.get("id")) for t in tasks]
        fingerprint = hash(tuple(ids))
        if fingerprint in fingerprints:
            return  # a page seen before: the server is going round in circles
        fingerprints.add(fingerprint)
        fresh = [t for t, key in zip(tasks, ids) if key not in previous]
        previous = set(ids)
        count += len(fresh)
        if fresh:
            yield fresh, max(total, count)
        if last_page is None and batch:  # the server may serve fewer per page than asked
            last_page = -(-total // len(batch)) + 1
        # Stop at the end, at a page that brings nothing new (a server that repeats
        # itself), or past the pages that `total` needs (one that invents tasks).
        if not fresh or count >= total or page >= (last_page or 0):
            return  # a page past the end would be a 404
        page += 1


def list_remote_tasks(client: LabelStudioClient, project_id: int, since: datetime | None = None,
                      *, page_size: int = BATCH) -> list[dict]:
    """Every task of the project (or those updated after `since`), with annotations and
    predictions, all in one list: for a look at a small project (the tests use it);
    code that must scale reads iter_remote_pages."""
    return [task for page, _ in iter_remote_pages(client, project_id, since,
                                                  page_size=page_size) for task in page]


def iter_remote_task_ids(client: LabelStudioClient, project_id: int
                         ) -> Iterator[tuple[list[int], int]]:
    """The ids of every task the project still has (ids only: cheap), a page at a time,
    with the total the server reports."""
    for page, total in iter_remote_pages(client, project_id, page_size=1000, include="id"):
        yield [t["id"] for t in page], total


# A project made in Label Studio that labelassist serves without ever pushing to it: its
# tasks and their images are Label Studio's (the row's image_mode says so).
MADE_IN_STUDIO = "studio"


def find_remote_project(client: LabelStudioClient, id_or_title: str) -> dict | None:
    """A project the token can read, by its id or its exact title (None: no such one)."""
    if id_or_title.isdigit():
        try:
            return client.get_json(f"/api/projects/{int(id_or_title)}", "reading the project")
        except LabelStudioError as exc:
            if "answered 404" not in str(exc):
                raise
    body = client.get_json("/api/projects", "listing projects", title=id_or_title,
                           page_size=100)
    found = [p for p in (body.get("results", []) if isinstance(body, dict) else body)
             if isinstance(p, dict) and p.get("title") == id_or_title]
    if len(found) > 1:
        raise LabelStudioError(f"{len(found)} projects are titled {id_or_title!r} (ids "
                               f"{', '.join(str(p['id']) for p in found)}): pass --project ID")
    return found[0] if found else None


def adopt_project(db: Database, client: LabelStudioClient, remote: dict,
                  classes: list[str]) -> LSProject:
    """The ledger's row for a project labelassist did not make (made once; a project it
    knows already is returned as it is)."""
    with db.write() as session:
        row = session.scalars(select(LSProject).where(
            LSProject.url == client.conn.url, LSProject.ls_project_id == remote["id"])).first()
        if row is None:
            row = LSProject(url=client.conn.url, ls_project_id=remote["id"],
                            title=str(remote.get("title") or remote["id"]), classes=classes,
                            image_mode=MADE_IN_STUDIO)
            session.add(row)
        elif row.image_mode == MADE_IN_STUDIO:
            row.classes = classes  # its labeling config, as it is now
        session.flush()
        return row
