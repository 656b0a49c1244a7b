"""The README's loop, turned twice in one workspace against a real Label Studio, with no
--version anywhere (issue 32: on its second turn learn stopped with "probe@... is a probe;
pass --version")."""

import random

import pytest
from typer.testing import CliRunner

from labelassist.cli import app
from labelassist.labelstudio.client import Connection, LabelStudioClient
from labelassist.labelstudio.project import list_remote_tasks
from labelassist.toy import world as toyworld

from .test_labelstudio import annotate


def truth_of(task) -> str:
    colour = task["data"]["path"].rsplit("/", 1)[-1].split("_")[0]
    return "warm" if colour in toyworld.WARM else "cool"


@pytest.mark.slow
@pytest.mark.labelstudio
def test_the_loop_turns_twice_without_naming_a_version(ls_env, toy_model_dir, tmp_path,
                                                       monkeypatch, request):
    photos = ls_env.root / "twice"
    toyworld.write_images(photos, 120, seed=81)
    vague = tmp_path / "vague.toml"
    vague.write_text('templates = ["a photo of a {} thing."]\n[classes]\n'
                     'warm = ["warm colour"]\ncool = ["cool colour"]\n')
    title = request.node.name[:40]
    monkeypatch.delenv("LABELASSIST_DB", raising=False)
    runner = CliRunner()

    def labelassist(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, f"labelassist {' '.join(map(str, args))}:\n{result.output}"
        return result.output

    labelassist("init", tmp_path / "ws", "--labels", vague, "--model", toy_model_dir)
    monkeypatch.chdir(tmp_path / "ws")
    labelassist("run", photos)
    labelassist("push", "--project", title)
    client = LabelStudioClient(Connection(ls_env.url, ls_env.token), retries=1)
    project = next(p for p in client.sdk.projects.list() if p.title == title)
    tasks = list_remote_tasks(client, project.id)
    order = random.Random(5).sample(tasks, len(tasks))
    probes = []
    for turn in range(2):
        for task in order[40 * turn:40 * (turn + 1)]:
            annotate(client, task, truth_of(task))
        assert "40 new annotations" in labelassist("pull")
        learned = labelassist("learn")
        assert "probe@" in learned and " holds 120 predictions" in learned, learned
        probes.append(learned.split(" holds ")[0].rsplit("\n", 1)[-1].strip())
        labelassist("push", "--project", title)  # the newest version: the probe
        shown = {p["model_version"] for t in list_remote_tasks(client, project.id)
                 for p in t["predictions"]}
        assert probes[-1] in shown
    assert probes[0] != probes[1]  # the second turn learned from 80 reviews, not 40
    suggested = labelassist("suggest")
    assert "Traceback" not in suggested
    labelassist("report")
