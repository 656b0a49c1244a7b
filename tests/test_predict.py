import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from labelassist.cli import app
from labelassist.labels import load_label_file, parse_label_text
from labelassist.db import open_database
from labelassist.db.models import Claim, Embedding, Image, Prediction
from labelassist.ingest import ingest
from labelassist.predict.run import PredictOptions, predict

from .imagegen import write_shape_images


def count(db, *where, model=Prediction):
    with db.read() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def test_predicts_every_image_once_and_stores_embeddings(db, tiny_model, photo_dir, labels_file):
    ingest(db, [photo_dir])
    progress = []
    summary = predict(db, tiny_model, load_label_file(labels_file), PredictOptions(batch_size=5),
                      on_progress=lambda d, t: progress.append((d, t)))

    assert (summary.encoded, summary.rescored, sum(summary.failed.values())) == (24, 0, 0)
    assert summary.model_version.startswith("tiny-clip@") and len(summary.model_version) == 18
    assert count(db) == 24 and count(db, model=Embedding) == 24
    assert progress[-1] == (24, 24)
    with db.read() as s:
        p = s.scalars(select(Prediction)).first()
    assert set(p.scores) == {"warm", "cool", "plain"}
    assert abs(sum(p.scores.values()) - 1) < 1e-5 and p.confidence == max(p.scores.values())

    again = predict(db, tiny_model, load_label_file(labels_file))
    assert again.predicted == 0 and count(db) == 24
    assert count(db, model=Claim) == 0


def test_the_summary_splits_the_time_between_the_tower_decode_and_writes(
        db, tiny_model, photo_dir, labels_file):
    """The tower's share is what encode_images takes: a tower made 0.2 s slower per batch
    shows it, and the three shares never add up to more than the run."""
    import dataclasses

    class SlowTower(type(tiny_model)):
        def encode_images(self, pixels):
            time.sleep(0.2)
            return super().encode_images(pixels)

    slow = SlowTower(**{f.name: getattr(tiny_model, f.name)
                        for f in dataclasses.fields(tiny_model) if f.init})
    ingest(db, [photo_dir])
    summary = predict(db, slow, load_label_file(labels_file), PredictOptions(batch_size=6))
    assert summary.encoded == 24 and summary.image_encoder_calls == 4
    assert 0.8 <= summary.tower_seconds < summary.seconds
    assert summary.decode_wait_seconds >= 0 and summary.write_wait_seconds >= 0
    assert (summary.tower_seconds + summary.decode_wait_seconds
            + summary.write_wait_seconds) <= summary.seconds


def test_new_prompt_set_rescores_from_stored_embeddings_without_encoding(
        db, tiny_model, photo_dir, labels_file, monkeypatch):
    ingest(db, [photo_dir])
    predict(db, tiny_model, load_label_file(labels_file))
    calls = []
    real = tiny_model.model.get_image_features
    monkeypatch.setattr(tiny_model.model, "get_image_features",
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    changed = parse_label_text('[classes]\nwarm = ["red", "orange", "yellow"]\ncool = ["blue"]')
    summary = predict(db, tiny_model, changed)

    assert calls == []
    assert (summary.rescored, summary.encoded, summary.image_encoder_calls) == (24, 0, 0)
    versions = {name for (name,) in _version_names(db)}
    assert len(versions) == 2  # the old predictions stay under their own version
    assert count(db) == 48


def _version_names(db):
    from labelassist.db.models import ModelVersion

    with db.read() as s:
        return s.execute(select(ModelVersion.name)).all()


def test_image_deleted_between_ingest_and_predict_is_recorded(db, tiny_model, photo_dir,
                                                              labels_file):
    ingest(db, [photo_dir])
    victim = next(photo_dir.rglob("img_0005.png"))
    victim.unlink()
    summary = predict(db, tiny_model, load_label_file(labels_file))

    assert summary.failed == {"missing": 1} and summary.encoded == 23
    assert "no readable path" in summary.failed_examples["missing"]
    with db.read() as s:  # gone for now is not final: the image stays pending
        errors = s.execute(select(Image.error).where(Image.error.is_not(None))).all()
    assert errors == []
    again = predict(db, tiny_model, load_label_file(labels_file))
    assert again.failed == {"missing": 1} and again.encoded == 0


def test_cli_predict_and_predictions_jsonl_and_csv(db_url, tiny_clip_dir, photo_dir,
                                                   labels_file):
    runner = CliRunner()
    env = {"LABELASSIST_DB": db_url}
    result = runner.invoke(app, ["run", str(photo_dir), "--labels", str(labels_file),
                                 "--model", str(tiny_clip_dir), "--batch-size", "8"], env=env)
    assert result.exit_code == 0, result.output
    assert "24 predicted (24 encoded" in result.output
    assert "  time: image tower " in result.output and "waiting for decoded images" in \
        result.output

    out = runner.invoke(app, ["predictions"], env=env)
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(records) == 24
    assert set(records[0]) >= {"path", "sha256", "label", "confidence", "scores",
                               "model_version"}
    assert all(os.path.exists(r["path"]) for r in records)

    rows = list(csv.DictReader(io.StringIO(runner.invoke(
        app, ["predictions", "--format", "csv"], env=env).stdout)))
    assert [r["sha256"] for r in rows] == [r["sha256"] for r in records]
    assert json.loads(rows[0]["scores"]) == records[0]["scores"]


def test_cli_errors_are_one_line_with_exit_code_1(db, db_url, tmp_path, labels_file):
    runner = CliRunner()
    result = runner.invoke(app, ["predict", "--labels", str(tmp_path / "none.toml"),
                                 "--db", db_url])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: label file {tmp_path / 'none.toml'} does not exist (pass --labels FILE)"]
    result = runner.invoke(app, ["predict", "--labels", str(labels_file), "--db", db_url,
                                 "--model", str(tmp_path / "no-model")])
    assert result.exit_code == 1 and "model directory" in result.output
    assert "Traceback" not in result.output


def test_predict_help_teaches_the_label_file():
    result = CliRunner().invoke(app, ["predict", "--help"], terminal_width=100)
    assert 'wild = ["lion", "tiger", "wolf", "fox"]' in result.output
    assert "templates" in result.output and "Example:" in result.output


def leftover_processes(marker: str) -> list[int]:
    """Live processes whose command line names `marker` (a decode worker is a fork of its
    parent, with the same command line)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("feed", ["threads", "processes"])
def test_sigkill_mid_run_then_rerun_gives_exactly_one_prediction_per_image(
        tmp_path, tiny_clip_dir, labels_file, feed):
    root = tmp_path / "many"
    write_shape_images(root, 400)
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    db = open_database(url)
    ingest(db, [root])
    env = {**os.environ, "LABELASSIST_DB": url, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "labelassist.cli", "predict", "--labels", str(labels_file),
           "--model", str(tiny_clip_dir), "--batch-size", "4", "--device", "cpu",
           "--feed", feed, "--decode-workers", "2"]
    rng = random.Random(7)
    for attempt in range(3):
        before = count(db)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        target = before + rng.randrange(8, 60)
        deadline = time.time() + 600  # only against a hang: a loaded machine is slow
        while count(db) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"attempt {attempt}: it exited before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert before < count(db) < 400, f"attempt {attempt}: the kill came too late"
        # Decode workers notice that their parent died and exit on their own.
        deadline = time.time() + 60
        while leftover_processes(str(labels_file)) and time.time() < deadline:
            time.sleep(0.2)
        assert leftover_processes(str(labels_file)) == []

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    with db.read() as s:
        per_image = s.execute(select(Prediction.image_id, func.count())
                              .group_by(Prediction.image_id)).all()
    assert len(per_image) == 400 and {n for _, n in per_image} == {1}
    assert count(db, model=Embedding) == 400
    assert count(db, model=Claim) == 0
