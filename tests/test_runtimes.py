"""CPU runtimes past torch (OpenVINO bf16 and int8) and `--dtype auto`'s choice among them,
measured on the workspace's own images: real OpenVINO, real NNCF, the trained toy model."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select
from typer.testing import CliRunner

from labelassist.toy import world as toyworld
from labelassist.cli import app
from labelassist.labels import load_label_file
from labelassist.db.models import Embedding, ModelVersion, Prediction, RuntimeChoice
from labelassist.errors import ModelLoadError
from labelassist.ingest import ingest
from labelassist.model.load import load_model
from labelassist.predict.run import predict
from labelassist.predict.choice import MAX_DRIFT, MIN_AGREEMENT, Trial, _trial

from .ci import require
from .conftest import add_annotation

require("openvino")
pytestmark = pytest.mark.slow  # converting and calibrating towers: seconds each

runner = CliRunner()
EXAMPLE_LABELS = Path(__file__).parent.parent / "examples" / "toyworld" / "labels.toml"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Converted towers go to this test's cache, not the user's."""
    monkeypatch.setenv("LABELASSIST_CACHE", str(tmp_path / "cache"))


def test_the_openvino_tower_gives_torch_fp32_embeddings_under_a_key_of_its_own(tiny_clip_dir):
    model = load_model(str(tiny_clip_dir), device="cpu", dtype="fp32")
    pixels = torch.randint(0, 256, (6, 3, *model.preprocess.output_size), dtype=torch.uint8)
    exact = model.encode_images(pixels)
    on_ov = load_model(str(tiny_clip_dir), device="cpu", dtype="ov-fp32")
    got = on_ov.encode_images(pixels)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert torch.allclose(got, exact, atol=1e-5)
    assert on_ov.model_key == model.model_key + "+ov-fp32"  # never mixed with torch's
    assert on_ov.identity != model.identity


def test_auto_measures_on_the_workspace_stores_the_choice_and_reuses_it(
        toy_workspace, db_url, db, toy_model_dir):
    result = runner.invoke(app, ["runtimes", "--labels", str(toy_workspace), "--db", db_url,
                                 "--sample", "48", "--model", str(toy_model_dir)])
    assert result.exit_code == 0, result.output
    with db.read() as s:
        row = s.scalars(select(RuntimeChoice)).one()
    trials = {t["runtime"].split(".")[0]: t for t in row.measurement["trials"]}
    assert {"fp32", "int8", "ov-int8"} <= trials.keys()  # bf16 too where the CPU is fast
    assert trials["fp32"]["agreement"] == 1.0 and trials["fp32"]["drift"] == 0.0
    fit = [t for t in row.measurement["trials"] if t["disqualified"] is None]
    assert row.runtime == max(fit, key=lambda t: t["images_per_second"])["runtime"]
    assert f"chosen: {row.runtime}" in result.output

    # predict --dtype auto (the default) takes the stored choice: no measuring again
    result = runner.invoke(app, ["predict", "--labels", str(toy_workspace), "--db", db_url])
    assert result.exit_code == 0, result.output
    assert f"runtime: {row.runtime}," in result.output and "measuring" not in result.output
    with db.read() as s:
        version = s.scalars(select(ModelVersion)).one()
        assert s.scalar(select(func.count()).select_from(Prediction)) == 120
    assert version.name == row.model_version
    assert version.model_key.endswith(f"+{row.runtime}") == row.runtime.startswith("ov-")

    status = runner.invoke(app, ["status", "--db", db_url])
    assert f"{version.name} runs on {row.runtime}," in status.output
    with db.read() as s:
        predicted = s.execute(select(Prediction.image_id, Prediction.label).limit(5)).all()
    for n, (image_id, label) in enumerate(predicted):
        add_annotation(db, image_id, label, n=n)
    report = runner.invoke(app, ["report", "--db", db_url, "--json", "-"])
    assert report.exit_code == 0, report.output
    [section] = json.loads(report.stdout)["runtimes"]
    assert (section["model_version"], section["runtime"]) == (version.name, row.runtime)
    assert f"{version.name} ran on {row.runtime}," in report.stderr
    from .test_formats import documented, keys

    assert sorted(keys(section, set()) - documented()) == []


def test_a_runtime_that_changes_answers_or_confidence_is_disqualified():
    exact = torch.tensor([[0.9, 0.1]] * 1000)
    ok = _trial("a", (torch.ones(1000, 4), 10.0), exact.clone(), exact)
    assert ok.disqualified is None and ok.agreement == 1.0
    flipped = exact.clone()
    flipped[:6] = torch.tensor([0.4, 0.6])  # 0.6% of the answers change
    assert _trial("b", (torch.ones(1000, 4), 99.0), flipped, exact).disqualified == \
        f"agreement below {MIN_AGREEMENT:.1%}"
    drifted = torch.tensor([[0.85, 0.15]] * 1000)  # same answers, 0.05 less confident
    assert _trial("c", (torch.ones(1000, 4), 99.0), drifted, exact).disqualified == \
        f"drift above {MAX_DRIFT}"
    broken = torch.ones(1000, 4)
    broken[3, 0] = float("nan")  # seen: OpenVINO bf16 on a tiny random test model
    assert _trial("d", (broken, 99.0), exact.clone(), exact).disqualified == \
        "non-finite embeddings"
    assert isinstance(ok, Trial)


def test_openvino_and_torch_versions_never_share_embeddings(tmp_path, toy_model_dir, db):
    toyworld.write_images(tmp_path / "pics", 20, seed=6)
    ingest(db, [tmp_path / "pics"])
    labels = tmp_path / "labels.toml"
    labels.write_text('[classes]\nwarm = ["red"]\ncool = ["blue"]\n')
    label_set = load_label_file(labels)
    on_ov = predict(db, load_model(str(toy_model_dir), device="cpu", dtype="ov-bf16"),
                    label_set)
    on_torch = predict(db, load_model(str(toy_model_dir), device="cpu", dtype="fp32"),
                       label_set)
    assert on_ov.model_version != on_torch.model_version
    assert (on_ov.encoded, on_torch.encoded, on_torch.rescored) == (20, 20, 0)
    with db.read() as s:
        keys = dict(s.execute(select(Embedding.model_key, func.count())
                              .group_by(Embedding.model_key)).all())
    assert sorted(keys.values()) == [20, 20] and any(k.endswith("+ov-bf16") for k in keys)


def test_int8_is_calibrated_once_on_the_workspace_and_loaded_from_the_cache(
        toy_workspace, db_url, db, toy_model_dir):
    result = runner.invoke(app, ["predict", "--labels", str(toy_workspace), "--db", db_url,
                                 "--dtype", "ov-int8"])
    assert result.exit_code == 0, result.output
    assert "calibrating int8 on 64 of this workspace's images" in result.output
    with db.read() as s:
        key = s.scalars(select(ModelVersion.model_key)).one()
    runtime = key.split("+", 1)[1]
    assert runtime.startswith("ov-int8.")
    # the worker processes load it by name, from the cache
    again = load_model(str(toy_model_dir), device="cpu", dtype=runtime)
    assert again.model_key == key
    with pytest.raises(ModelLoadError, match="no int8 tower calibrated as 0000000000"):
        load_model(str(toy_model_dir), device="cpu", dtype="ov-int8.0000000000")


def test_a_small_workspace_without_a_measurement_runs_torch_and_says_so(
        toy_workspace, db_url, db):
    result = runner.invoke(app, ["predict", "--labels", str(toy_workspace), "--db", db_url])
    assert result.exit_code == 0, result.output
    assert "not measured: on 120 images to encode" in result.output
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(RuntimeChoice)) == 0
        assert "+" not in s.scalars(select(ModelVersion.model_key)).one()


BLOCK_OPENVINO = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("openvino", "nncf"):
                raise ImportError(f"{name} is blocked: an install without the extra")
    sys.meta_path.insert(0, Block())
""")


def test_without_the_extra_nothing_new_is_imported_and_forcing_it_says_how_to_install(
        tmp_path, tiny_clip_dir):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_OPENVINO)
    (tmp_path / "pics").mkdir()
    from .imagegen import write_shape_images

    write_shape_images(tmp_path / "pics", 4)
    labels = tmp_path / "labels.toml"
    labels.write_text(f'model = "{tiny_clip_dir}"\n[classes]\nwarm = ["red"]\ncool = ["blue"]\n')
    env = {**os.environ, "PYTHONPATH": str(site), "LABELASSIST_DB": f"sqlite:///{tmp_path}/l.db"}
    cli = [sys.executable, "-m", "labelassist.cli"]
    subprocess.run(cli + ["ingest", str(tmp_path / "pics")], env=env, check=True,
                   capture_output=True)
    forced = subprocess.run(cli + ["predict", "--labels", str(labels), "--dtype", "ov-bf16"],
                            env=env, capture_output=True, text=True, check=False)
    assert forced.returncode == 1
    assert forced.stderr.strip().splitlines()[-1] == (
        "error: the OpenVINO runtime is not installed: pip install 'labelassist[openvino]'")
    assert "Traceback" not in forced.stderr
    probe = ("import sys, runpy; sys.argv = ['labelassist'] + sys.argv[1:]; code = 0\n"
             "try:\n    runpy.run_module('labelassist.cli', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "print('IMPORTED', sorted(m for m in sys.modules if m.split('.')[0] in "
             "('openvino', 'nncf')), code)")
    plain = subprocess.run([sys.executable, "-c", probe, "predict", "--labels", str(labels)],
                           env=env, capture_output=True, text=True, check=False)
    assert "IMPORTED [] 0" in plain.stdout, plain.stderr[-2000:]


def test_a_version_is_only_predicted_with_its_own_runtime(tmp_path, toy_model_dir, db):
    """serve and the worker predict for an existing version: a torch model must never
    write its embeddings under an OpenVINO version's key."""
    from labelassist.predict.run import ensure_model_version, predict_version

    toyworld.write_images(tmp_path / "pics", 4, seed=8)
    ingest(db, [tmp_path / "pics"])
    label_set = load_label_file(EXAMPLE_LABELS)
    on_ov = load_model(str(toy_model_dir), device="cpu", dtype="ov-fp32")
    version = ensure_model_version(db, on_ov, label_set)
    on_torch = load_model(str(toy_model_dir), device="cpu", dtype="fp32")
    with pytest.raises(ModelLoadError, match=r"holds embeddings of .*\+ov-fp32"):
        predict_version(db, on_torch, version)
    assert predict_version(db, on_ov, version).encoded == 4
