"""`labelassist serve` for a project labelassist never pushed (issue 33, item 1): a project
made in Label Studio with a labeling config of its own (its Choices and Image named as
its maker chose) and a local-files storage, served by a real `labelassist serve` process
started with --project TITLE --labels FILE --model DIR. Label Studio asks for the
predictions itself ("Retrieve predictions"), and reviews reach the ledger through its
webhook, never a pull."""

from __future__ import annotations

import io
import json
import uuid

import httpx
import pytest
from PIL import Image
from sqlalchemy import select
from typer.testing import CliRunner

from labelassist.cli import app
from labelassist.db.models import Annotation, File, LSTask

from .imagegen import write_shape_images
from .served_project import SECRET, StudioProject, wait_for

# one project and one serve process for the module: its tests run in one worker
pytestmark = [pytest.mark.labelstudio, pytest.mark.slow,
              pytest.mark.xdist_group("serve_any_project")]
CONFIG = """<View>
  <Header value="Which colour?"/>
  <Image name="photo" value="$picture"/>
  <Choices name="colour" toName="photo" choice="single">
    <Choice value="warm"/><Choice value="cool"/><Choice value="other"/>
  </Choices>
</View>"""
LOCAL_FILES = ["file:///etc/passwd", "/etc/passwd"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, label_studio, tiny_clip_dir):
    tmp = tmp_path_factory.mktemp("any-project")
    folder = label_studio.root / "any_project"
    write_shape_images(folder, 6)
    labels = tmp / "labels.toml"
    labels.write_text('[classes]\nwarm = ["red", "orange"]\ncool = ["blue"]\n')
    title = f"made in Label Studio {uuid.uuid4().hex[:8]}"
    project = StudioProject(label_studio, tmp, title, CONFIG)
    project.add_storage("localfiles", {"path": str(folder), "use_blob_urls": True,
                                       "recursive_scan": True, "title": "photos"}, expect=6)
    project.http.post(f"/api/projects/{project.id}/import", json=[
        {"picture": value} for value in LOCAL_FILES]).raise_for_status()
    project.args = ("--project", title, "--labels", str(labels), "--model", str(tiny_clip_dir))
    project.serve(*project.args)
    project.retrieve_predictions()
    yield project
    project.stop()


def annotate(project, task_id: int, label: str) -> int:
    made = project.http.post(f"/api/tasks/{task_id}/annotations", json={"result": [
        {"from_name": "colour", "to_name": "photo", "type": "choices",
         "value": {"choices": [label]}}]})
    made.raise_for_status()
    return made.json()["id"]


def test_the_project_lists_labelassist_as_its_model(served):
    backends = served.http.get("/api/ml", params={"project": served.id}).json()
    (mine,) = [b for b in backends if b["url"] == served.url]
    assert mine["title"] == "labelassist" and mine["auth_method"] == "BASIC_AUTH"
    assert mine["state"] == "CO"  # Label Studio reached it with the secret


def test_every_task_gets_a_prediction_from_retrieve_predictions(served):
    stored = [t for t in served.tasks() if t["data"]["picture"] not in LOCAL_FILES]
    assert len(stored) == 6
    for task in stored:
        (prediction,) = task["predictions"]
        assert prediction["model_version"].startswith("tiny-clip@")
        assert 0.5 <= prediction["score"] <= 1  # the better of two classes
        (result,) = prediction["result"]
        assert (result["from_name"], result["to_name"]) == ("colour", "photo")
        assert result["value"]["choices"][0] in ("warm", "cool")
    # each image fetched through Label Studio and registered by content hash
    assert served.count(LSTask) == 6 and served.count(File, File.error.is_(None)) == 6
    assert served.status()["images_fetched"] == 6


def test_a_task_pointing_at_a_local_file_reads_nothing(served):
    local = [t for t in served.tasks() if t["data"]["picture"] in LOCAL_FILES]
    assert len(local) == 2
    for task in local:  # answered, empty: no file was read
        assert [p["result"] for p in task["predictions"]] in ([], [[]])
    with served.db.read() as s:
        paths = s.scalars(select(File.path)).all()
    assert not any("passwd" in path for path in paths)
    assert served.status()["images_refused"] == 2
    assert all("passwd" not in p.read_bytes().decode("latin-1")
               for p in (served.tmp / "labelassist-fetched").rglob("*") if p.is_file())


def test_an_unauthenticated_webhook_gets_401(served):
    task = served.tasks()[0]
    event = {"action": "ANNOTATION_CREATED", "task": {"id": task["id"]},
             "annotation": {"id": 1, "task": task["id"]}}
    for auth in (None, ("labelassist", "wrong-secret-of-enough-length")):
        response = httpx.post(served.url + "/webhook", json=event, auth=auth, timeout=10)
        assert response.status_code == 401


def test_reviews_reach_the_ledger_without_a_pull_and_count_in_report_and_export(
        served, tmp_path):
    tasks = sorted((t for t in served.tasks() if t["data"]["picture"] not in LOCAL_FILES),
                   key=lambda t: t["id"])
    made = [annotate(served, tasks[0]["id"], "cool"),
            annotate(served, tasks[1]["id"], "warm")]
    wait_for(lambda: served.count(Annotation, Annotation.ls_annotation_id.in_(made),
                                  Annotation.label.is_not(None)) == 2,
             what="the webhook to record both reviews")
    with served.db.read() as s:
        labels = dict(s.execute(select(Annotation.ls_annotation_id, Annotation.label)).all())
    assert labels == {made[0]: "cool", made[1]: "warm"}

    learned = httpx.post(served.url + "/train", json={}, auth=("labelassist", SECRET),
                         timeout=60).json()
    assert learned["status"] == "ok"
    assert served.status()["last_learn"]["reviews"] == 2

    report = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["report", "--db", served.db_url, "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["reviewed"] == 2
    out = tmp_path / "dataset"
    result = CliRunner().invoke(app, ["export", str(out), "--db", served.db_url,
                                      "--format", "csv"])
    assert result.exit_code == 0, result.output
    exported = (out / "labels.csv").read_text() if (out / "labels.csv").exists() else \
        "".join(p.read_text() for p in out.rglob("*.csv"))
    assert exported.count("cool") == 1 and exported.count("warm") == 1


def test_a_review_of_a_task_serve_never_answered_counts_too(served):
    """A task added after Retrieve predictions, reviewed before anyone asked serve: the
    review's event makes serve adopt it (its picture fetched and registered)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (250, 20, 20)).save(buffer, "PNG")
    served.http.post(f"/api/projects/{served.id}/import", files={
        "file": ("late red.png", buffer.getvalue(), "image/png")}).raise_for_status()
    task = max(served.tasks(), key=lambda t: t["id"])
    assert task["predictions"] == []

    made = annotate(served, task["id"], "warm")

    wait_for(lambda: served.count(Annotation, Annotation.ls_annotation_id == made,
                                  Annotation.label == "warm"), what="the adopted review")
    assert served.status()["images_fetched"] == 7


def test_a_label_file_that_does_not_match_the_choices_is_refused_in_one_line(served,
                                                                              tmp_path):
    labels = tmp_path / "labels.toml"
    labels.write_text('[classes]\nwarm = ["red"]\nplain = ["grey"]\n')
    result = CliRunner().invoke(app, [
        "serve", "--db", served.db_url, "--project", str(served.id), "--labels", str(labels),
        "--no-connect"], env={"LABEL_STUDIO_URL": served.ls.url, "LABELASSIST_SERVE_SECRET":
                              SECRET, "LABEL_STUDIO_API_KEY": served.ls.token})
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert "--labels" in line and "missing the project's choices 'cool'" in line
    assert "not choices of the project: 'plain'" in line


def test_the_choices_come_from_the_control_that_labels_an_image():
    from labelassist.labelstudio.project import read_choices
    from labelassist.serve.project import classes_of

    control = read_choices(CONFIG)
    assert (control.from_name, control.to_name, control.image_key) == ("colour", "photo",
                                                                        "picture")
    assert classes_of(control) == ["warm", "cool"]  # "other" is none of these
    ours = read_choices('<View><Image name="i" value="$img"/><Choices name="mood" '
                        'toName="i"><Choice value="a"/></Choices><Choices name="label" '
                        'toName="i"><Choice value="x" alias="y"/></Choices></View>')
    assert (ours.from_name, ours.choices) == ("label", ("y",))  # labelassist's own first
    with pytest.raises(Exception, match="no <Choices> for an <Image>"):
        read_choices('<View><Text name="t" value="$t"/><Choices name="c" toName="t">'
                     '<Choice value="a"/></Choices></View>')
    # an unnamed Image and a Choices with no toName (found by Hypothesis): AttributeError
    with pytest.raises(Exception, match="no <Choices> for an <Image>"):
        read_choices('<Cie0><Image name="" A=""/><Choices name="0" o=""></Choices></Cie0>')


def test_a_new_version_goes_onto_the_tasks_with_the_projects_own_control(served):
    """What learning sends when its probe wins, for a project made in Label Studio: the
    version's predictions onto the tasks serve answered (here the zero-shot version sent
    again), named as the project names its control; no task or choice is added."""
    from labelassist.db.models import LSProject, ModelVersion
    from labelassist.labelstudio import Connection, LabelStudioClient
    from labelassist.labelstudio.project import read_choices
    from labelassist.serve.learning import send_predictions

    client = LabelStudioClient(Connection(served.ls.url, served.ls.token), retries=0)
    with served.db.read() as s:
        project = s.scalars(select(LSProject).where(LSProject.ls_project_id == served.id)).one()
        version = s.scalars(select(ModelVersion)).one()
    before = {t["id"]: len(t["predictions"]) for t in served.tasks()}

    sent = send_predictions(served.db, client, project, version, read_choices(CONFIG))

    after = served.tasks()
    assert sent == served.count(LSTask) and len(after) == len(before)
    grown = [t for t in after if len(t["predictions"]) == before[t["id"]] + 1]
    assert len(grown) == sent
    for task in grown:
        (result,) = task["predictions"][-1]["result"]
        assert result["from_name"] == "colour" and task["predictions"][-1]["model_version"] \
            == version.name
    project_config = served.http.get(f"/api/projects/{served.id}").json()["label_config"]
    assert project_config == CONFIG
    client.close()


def test_reviews_made_while_serve_was_down_are_caught_up_with_their_label(served):
    """Last: it restarts the module's server. The project's control is not named as
    labelassist names its own, so the catch-up reads it as the project names it."""
    served.stop_serving()
    task = min((t for t in served.tasks() if t["data"]["picture"] not in LOCAL_FILES),
               key=lambda t: t["id"])
    made = annotate(served, task["id"], "warm")  # nobody listens: the webhook fails

    served.serve(*served.args)

    assert any("caught up: 1 new" in line for line in served.said), served.said
    assert served.count(Annotation, Annotation.ls_annotation_id == made,
                        Annotation.label == "warm") == 1


def test_a_pull_run_by_hand_reads_the_projects_own_control(served, monkeypatch):
    """`labelassist pull` read only a result named `label`: for a project whose Choices
    is named otherwise, a review came back with no label."""
    served.stop_serving()
    task = max((t for t in served.tasks() if t["data"]["picture"] not in LOCAL_FILES),
               key=lambda t: t["id"])
    made = annotate(served, task["id"], "cool")  # nobody listens: only pull can read it
    monkeypatch.setenv("LABEL_STUDIO_URL", served.ls.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", served.ls.token)

    pulled = CliRunner().invoke(app, ["pull", "--db", served.db_url])

    assert pulled.exit_code == 0, pulled.output
    with served.db.read() as s:
        assert s.scalar(select(Annotation.label).where(
            Annotation.ls_annotation_id == made)) == "cool"
