import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from labelassist.cli import app
from labelassist.errors import ConfigError
from labelassist.model.load import cpu_identity
from labelassist.toy import world as toyworld

EXAMPLES = Path(__file__).parent.parent / "examples" / "toyworld"


def test_toy_clip_classifies_held_out_colour_shape_pairs_zero_shot(toy_model_dir, capsys):
    scores = toyworld.evaluate(toy_model_dir)
    with capsys.disabled():
        print(f"\ntoy world zero-shot on held-out pairs: {scores}")
    chance = 1 / (len(toyworld.COLOURS) * len(toyworld.SHAPES))
    assert scores["pair"] > 5 * chance  # never-seen pairs, 24-way: chance is 4.2%
    assert scores["colour"] > 0.9


def accuracy_through_cli(runner, env, labels_file, photos, model_dir):
    result = runner.invoke(app, ["run", str(photos), "--labels", str(labels_file),
                                 "--model", str(model_dir), "--exact"], env=env)
    assert result.exit_code == 0, result.output
    version = re.search(r"^(\S+@[0-9a-f]{8}): \d+ predicted", result.output, re.M).group(1)
    out = runner.invoke(app, ["predictions", "--version", version], env=env).stdout
    records = [json.loads(line) for line in out.splitlines()]
    truth = {"warm": toyworld.WARM, "cool": toyworld.COOL}
    right = sum(Path(r["path"]).name.split("_")[0] in truth[r["label"]] for r in records)
    return right / len(records), len(records)


def test_describing_a_class_by_its_members_beats_a_vague_description(
        toy_model_dir, tmp_path, capsys):
    photos = tmp_path / "photos"
    toyworld.write_images(photos, 120, seed=5)
    runner = CliRunner()
    env = {"LABELASSIST_DB": f"sqlite:///{tmp_path / 'toy.db'}"}

    members, n = accuracy_through_cli(runner, env, EXAMPLES / "labels.toml", photos,
                                      toy_model_dir)
    vague, _ = accuracy_through_cli(runner, env, EXAMPLES / "labels-vague.toml", photos,
                                    toy_model_dir)

    with capsys.disabled():
        print(f"\nwarm/cool over {n} pictures: members {members:.1%}, vague {vague:.1%}")
    assert members >= 0.95
    assert members - vague >= 0.2


TRAIN_COUNTING = """
import sys
from labelassist.toy import world as toyworld
real = toyworld.train
def counting(*args, **kwargs):
    print("TRAINING", flush=True)
    return real(*args, **kwargs)
toyworld.train = counting
print(toyworld.cached_model(sys.argv[1], steps=40, log=lambda message: None))
"""


@pytest.mark.slow
def test_two_processes_share_one_cache_and_train_once(tmp_path):
    """Two test runs at once (two pytest sessions, or xdist) must not corrupt the cache:
    before the lock, both trained into the same .partial folder and one removed the
    other's."""
    import subprocess
    import sys

    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / f"toyworld-{toyworld.recipe_hash(40, 0)}.partial-999999"
    stale.mkdir()  # what a killed run leaves behind
    runs = [subprocess.Popen([sys.executable, "-c", TRAIN_COUNTING, str(cache)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [run.communicate(timeout=600) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in outs]
    assert sum(out.count("TRAINING") for out, _ in outs) == 1
    paths = {out.split()[-1] for out, _ in outs}
    assert len(paths) == 1 and (Path(paths.pop()) / "model.safetensors").is_file()
    assert not list(cache.glob("*.partial*"))


def test_the_cache_key_changes_with_the_code_and_versions(monkeypatch):
    import transformers

    key = toyworld.recipe_hash(1600, 0)
    assert toyworld.recipe_hash(1600, 1) != key
    monkeypatch.setattr(transformers, "__version__", "0.0.0")
    assert toyworld.recipe_hash(1600, 0) != key


def test_the_toy_model_comes_from_the_shipped_weights_without_training(tmp_path, monkeypatch):
    """The demo and the tests need the model at once: with the recipe unchanged, the cache
    is filled from the weights shipped in the package, and nothing is trained."""
    manifest = toyworld.shipped_manifest(1600, 0)
    assert manifest, "no shipped weights for this recipe: run python -m labelassist.toy.world ship"

    def no_training(*args, **kwargs):
        raise AssertionError("trained although shipped weights fit the recipe")

    monkeypatch.setattr(toyworld, "train", no_training)
    model_dir = toyworld.cached_model(tmp_path, log=lambda message: None)
    assert model_dir.name == f"toyworld-shipped-{manifest['sha256'][:12]}"
    assert toyworld.cached_model(tmp_path) == model_dir  # the second time, from the cache
    scores = toyworld.evaluate(model_dir)
    assert scores == pytest.approx(manifest["metrics"], abs=1e-9)
    assert scores["warm_cool_members"] > scores["warm_cool_vague"] + 0.2


def test_a_changed_recipe_never_uses_the_shipped_weights(monkeypatch):
    assert toyworld.shipped_manifest(1600, 0)
    assert toyworld.shipped_manifest(1600, 1) is None  # another seed: another model
    assert toyworld.shipped_manifest(800, 0) is None
    monkeypatch.setattr(toyworld, "RECIPE_VERSION", toyworld.RECIPE_VERSION + 1)
    assert toyworld.shipped_manifest(1600, 0) is None


def _shipped_on_this_kind_of_cpu(manifest: dict) -> bool:
    """Whether this machine computes as the one that trained the shipped weights did."""
    import torch
    import transformers

    return (torch.__version__, transformers.__version__, cpu_identity()) == (
        manifest["torch"], manifest["transformers"], manifest["cpu"])


@pytest.mark.slow
def test_training_reproduces_the_shipped_runs_first_steps_bit_for_bit(tmp_path):
    """On the kind of CPU the shipped weights were trained on, training for their first
    PREFIX_STEPS steps (under a minute, not three) gives the very weights that run had
    then: same code, same seed, same kernels, bit for bit. The whole run, when asked for,
    is the next test."""
    from transformers import CLIPModel

    manifest = toyworld.shipped_manifest(1600, 0)
    if not _shipped_on_this_kind_of_cpu(manifest):
        pytest.skip(f"the shipped weights come from a {manifest['cpu']} CPU, this is a "
                    f"{cpu_identity()}: the next test retrains them whole")
    prefix = manifest["prefix"]
    trained_dir = toyworld.train(tmp_path / "trained", steps=1600, seed=0,
                                 log=lambda message: None, stop_after=prefix["steps"])
    record = json.loads((trained_dir / "training.json").read_text())
    assert record["steps_done"] == prefix["steps"] == toyworld.PREFIX_STEPS
    assert record["prefix"] == prefix
    # and the digest is that of the weights saved, not only of the ones in memory
    saved = CLIPModel.from_pretrained(trained_dir)
    assert toyworld.weights_digest(saved) == prefix["digest"]


@pytest.mark.slow
@pytest.mark.longest
def test_training_reproduces_the_shipped_weights(tmp_path):
    """The shipped weights are the project's own deterministic output. Training again
    (about 3 minutes) on the kind of CPU they were trained on gives them back bit for bit,
    after fp16 rounding, with the same metrics. Before training pinned its thread count,
    two runs in one test session gave weights 0.1 apart (a test had changed torch's
    threads), and suggest's proposal changed with them. On that kind of CPU the test
    above checks the first steps, and this one runs only with LABELASSIST_FULL_RETRAIN=1
    (python -m labelassist.toy.world ship checks the whole run too: the weights it writes
    must be byte for byte the ones in git).

    On another kind of CPU (an Intel Xeon with AMX against the AMD EPYC of the shipped
    weights), the kernels sum in another order, and 1,600 steps carry that apart: a
    weight that the loss does not pin (an attention key's bias) ends up elsewhere, and
    two of the 240 held-out pairs flip (61% against 67%). What must hold there is what
    the toy world teaches: the same accuracies within 0.08, members far above vague."""
    import os

    import torch
    from safetensors.torch import load_file

    manifest = toyworld.shipped_manifest(1600, 0)
    same_kind = _shipped_on_this_kind_of_cpu(manifest)
    if same_kind and os.environ.get("LABELASSIST_FULL_RETRAIN") != "1":
        pytest.skip("the first steps were checked bit for bit on this kind of CPU; "
                    "LABELASSIST_FULL_RETRAIN=1 retrains all 1,600 (about 3 minutes)")
    trained_dir = toyworld.train(tmp_path / "trained", steps=1600, seed=0,
                                 log=lambda message: None)
    trained = load_file(trained_dir / "model.safetensors")
    shipped = load_file(toyworld.SHIPPED / "model.safetensors")
    assert set(trained) <= set(shipped)
    metrics = toyworld.evaluate(trained_dir)
    if same_kind:
        assert json.loads((trained_dir / "training.json").read_text())["prefix"] == \
            manifest["prefix"]
        for name, value in trained.items():
            assert torch.equal(value.half(), shipped[name]), name
        # accuracies on 240 pictures: the fp16 rounding may move one or two of them
        assert metrics == pytest.approx(manifest["metrics"], abs=0.01)
    else:
        assert metrics == pytest.approx(manifest["metrics"], abs=0.08)
        assert metrics["colour"] == 1.0 and metrics["warm_cool_members"] == 1.0
        assert metrics["warm_cool_members"] > metrics["warm_cool_vague"] + 0.2


@pytest.mark.parametrize("argv, message", [
    (["train", "DIR", "--stop-after", "200"], "--stop-after needs --retrain"),
    (["train", "DIR", "--retrain", "--stop-after", "0"], "between 1 and --steps (1600)"),
    (["train", "DIR", "--retrain", "--steps", "100", "--stop-after", "200"],
     "between 1 and --steps (100)"),
])
def test_stop_after_is_refused_where_it_would_mean_nothing(argv, message, monkeypatch, capsys,
                                                          tmp_path):
    monkeypatch.setattr("sys.argv", ["python -m labelassist.toy.world", *argv])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        toyworld.main()
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_ship_refuses_a_model_that_is_not_a_whole_run(tmp_path):
    """Only a whole run's weights may ship, with the digest of its first steps: a model
    stopped early, or trained before training.json existed, is refused before anything
    in the package is touched. The refusal is a ConfigError, so the Python API can catch
    it; exiting is the command line's business."""
    shipped = (toyworld.SHIPPED / "manifest.json").read_text()
    model = tmp_path / "early"
    model.mkdir()
    (model / "training.json").write_text(json.dumps(
        {"steps": 1600, "seed": 0, "steps_done": 200, "prefix": {"steps": 200, "digest": "x"}}))
    for record in (model, tmp_path):  # stopped early; no training.json at all
        with pytest.raises(ConfigError, match="is not a whole training run of 1600 steps"):
            toyworld.ship(record, 1600, 0)
    assert (toyworld.SHIPPED / "manifest.json").read_text() == shipped


def test_ship_on_the_command_line_refuses_in_one_line_with_exit_1(tmp_path, monkeypatch,
                                                                 capsys):
    """The command line turns ship's ConfigError into its message on stderr and exit 1,
    with no traceback, and the shipped weights untouched."""
    shipped = (toyworld.SHIPPED / "manifest.json").read_text()
    monkeypatch.setattr("sys.argv", ["python -m labelassist.toy.world", "ship", "--model",
                                     str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        toyworld.main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "is not a whole training run of 1600 steps" in err and "Traceback" not in err
    assert (toyworld.SHIPPED / "manifest.json").read_text() == shipped
