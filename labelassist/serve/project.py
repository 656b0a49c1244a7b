"""Which Label Studio project serve answers for, and what it predicts there: a project
labelassist pushed, or any project the token can read (made in Label Studio, never
pushed), whose classes come from its labeling config's Choices and whose descriptions
come from --labels, else one per choice with the default template."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import or_, select

from ..db import Database
from ..db.models import LSProject, ModelVersion
from ..errors import ConfigError
from ..labels import LabelSet
from ..labelstudio import LabelStudioClient
from ..labelstudio.project import ChoicesControl, adopt_project, find_remote_project, read_choices
from ..trust.outofset import OTHER


def find_project(db: Database, client: LabelStudioClient, id_or_title: str | None
                 ) -> LSProject:
    """The project to serve: one the ledger knows (by title or Label Studio id), else the
    one Label Studio has by that id or title (recorded in the ledger from then on); with
    neither given, the one labelassist pushed to last."""
    with db.read() as s:
        query = select(LSProject).where(LSProject.url == client.conn.url)
        if id_or_title:
            named = LSProject.title == id_or_title
            if id_or_title.isdigit():
                named = or_(named, LSProject.ls_project_id == int(id_or_title))
            query = query.where(named)
        project = s.scalars(query.order_by(LSProject.id.desc())).first()
    if project is not None:
        return project
    if not id_or_title:
        raise ConfigError(f"nothing was pushed to {client.conn.url} yet: pass --project "
                          "with the id or title of the Label Studio project to serve")
    remote = find_remote_project(client, id_or_title)
    if remote is None:
        raise ConfigError(f"no project with the id or title {id_or_title!r} that this token "
                          f"can read at {client.conn.url}: check --project (and --ls-token)")
    control = read_choices(remote.get("label_config") or "", repr(remote.get("title")))
    return adopt_project(db, client, remote, classes_of(control))


def project_control(client: LabelStudioClient, project: LSProject) -> ChoicesControl:
    """The project's Choices control as its labeling config has it now."""
    remote = client.get_json(f"/api/projects/{project.ls_project_id}", "reading the project")
    return read_choices(remote.get("label_config") or "", repr(project.title))


def classes_of(control: ChoicesControl) -> list[str]:
    """The classes a project's choices offer: every choice but "other" (none of these)."""
    return [c for c in control.choices if c != OTHER]


def served_label_set(control: ChoicesControl, given: LabelSet | None,
                     title: str) -> LabelSet:
    """What to predict with: the classes of the project's choices, described by the label
    file when given (its classes must be those choices; "other" is one only if the file
    describes it), else each by its own name."""
    classes = classes_of(control)
    if len(classes) < 2:
        raise ConfigError(f"project {title!r} offers {len(classes)} choice(s) besides "
                          f"{OTHER!r} ({', '.join(control.choices) or 'none'}): a prediction "
                          "needs two or more; add choices in its labeling config")
    if given is None:
        return LabelSet(classes={c: (c,) for c in classes}, source=f"project {title!r}")
    missing = [c for c in classes if c not in given.classes]
    extra = [c for c in given.classes if c not in control.choices]
    if missing or extra:
        said = []
        if missing:
            said.append(f"missing the project's choices {', '.join(map(repr, missing))}")
        if extra:
            said.append(f"has classes that are not choices of the project: "
                        f"{', '.join(map(repr, extra))}")
        raise ConfigError(f"--labels {given.source} does not match project {title!r}: "
                          f"{'; '.join(said)} (its choices: {', '.join(control.choices)})")
    # "other" described in the file is a class like any other, as in a pushed project
    return LabelSet(classes={c: given.classes[c] for c in control.choices
                             if c in given.classes},
                    templates=given.templates, model=given.model, source=given.source)


def pin_zero_shot(db: Database, label_set: LabelSet, load: Callable[[LabelSet], object]
                  ) -> tuple[ModelVersion, object]:
    """The zero-shot version of this label set (made when new) and its loaded model."""
    from ..predict.run import ensure_model_version

    model = load(label_set)
    return ensure_model_version(db, model, label_set), model
