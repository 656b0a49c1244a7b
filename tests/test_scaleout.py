"""Many workers on one PostgreSQL database: nothing done twice, nothing lost."""

import os
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from labelassist.db.claims import active_workers
from labelassist.cli import app
from labelassist.labels import parse_label_text
from labelassist.db import open_database
from labelassist.db.models import Claim, Embedding, Image, ModelVersion, Prediction, Worker, utcnow
from labelassist.ingest import ingest
from labelassist.predict.run import PredictOptions, ensure_model_version, predict

from .conftest import terminate_connections
from .imagegen import write_shape_images

pytestmark = pytest.mark.postgres
LABELS = '[classes]\nwarm = ["red", "orange"]\ncool = ["blue"]\n'


def count(db, model=Prediction, *where):
    with db.read() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def one_prediction_per_image(db, n):
    with db.read() as s:
        per_image = s.execute(select(Prediction.image_id, Prediction.model_version_id,
                                     func.count()).group_by(Prediction.image_id,
                                                            Prediction.model_version_id)).all()
    return len(per_image) == n and {c for *_, c in per_image} == {1}


def cli_env(url, **extra):
    return {**os.environ, "LABELASSIST_DB": url, "HF_HUB_OFFLINE": "1", **extra}


CLI = [sys.executable, "-m", "labelassist.cli"]


def ingested_workspace(url, tmp_path, model_dir, n):
    """n images ingested into `url`, and the `labelassist predict` command line for them."""
    write_shape_images(tmp_path / "photos", n)
    labels = tmp_path / "labels.toml"
    labels.write_text(LABELS)
    db = open_database(url)
    ingest(db, [tmp_path / "photos"])
    return db, CLI + ["predict", "--labels", str(labels), "--model", str(model_dir),
                      "--batch-size", "3", "--device", "cpu"]


@pytest.mark.slow
def test_four_workers_on_postgres_encode_each_image_exactly_once(pg_url, tmp_path,
                                                                 tiny_clip_dir):
    write_shape_images(tmp_path / "photos", 160)
    labels = tmp_path / "labels.toml"
    labels.write_text(LABELS)
    db = open_database(pg_url)
    ingest(db, [tmp_path / "photos"])

    # As a user runs it, in a process of its own: its 4 spawned workers then share nothing
    # with the test's process. (A test process that went down here had compiled many
    # OpenVINO towers just before: see runtimes/openvino.py, core().)
    result = subprocess.run(CLI + ["predict", "--labels", str(labels), "--model",
                                   str(tiny_clip_dir), "--workers", "4", "--batch-size", "4",
                                   "--device", "cpu"], env=cli_env(pg_url),
                            capture_output=True, text=True, timeout=600, check=False)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "160 predicted (160 encoded" in result.stderr  # no image encoded twice
    assert one_prediction_per_image(db, 160)
    assert count(db, Embedding) == 160 and count(db, Claim) == 0
    with db.read() as s:
        workers = s.scalars(select(Worker)).all()
    assert len(workers) == 4 and all(w.stopped_at for w in workers)


def wait_while_running(condition, proc, what: str, limit: float = 600) -> bool:
    """Wait until condition() holds (True) or proc exits (False). The limit only guards
    against a hang: a loaded machine is slow, not wrong."""
    deadline = time.time() + limit
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.time() < deadline, f"no {what} in {limit:.0f} s"
        time.sleep(0.01)
    return True


@pytest.mark.slow
def test_sigkill_at_random_points_on_postgres(pg_url, tmp_path, tiny_clip_dir):
    db, cmd = ingested_workspace(pg_url, tmp_path, tiny_clip_dir, 300)
    rng = random.Random(11)
    for _ in range(5):
        before = count(db)
        proc = subprocess.Popen(cmd, env=cli_env(pg_url), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        target = before + rng.randrange(3, 40)
        assert wait_while_running(lambda: count(db) >= target, proc, f"{target} predictions")
        proc.send_signal(signal.SIGKILL)  # mid-run: it was alive, with work left
        proc.wait()
        assert count(db) < 300
    done = subprocess.run(cmd, env=cli_env(pg_url), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert one_prediction_per_image(db, 300) and count(db, Claim) == 0


@pytest.mark.slow
def test_connection_cut_mid_run_is_survived_or_resumed(pg_url, tmp_path, tiny_clip_dir):
    db, cmd = ingested_workspace(pg_url, tmp_path, tiny_clip_dir, 300)
    app_name = "labelassist-under-test"  # only the worker's connections are cut
    proc = subprocess.Popen(cmd, env=cli_env(pg_url, PGAPPNAME=app_name),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for target in (30, 60, 90):  # up to three cuts, each while it is mid-run
        if not wait_while_running(lambda: count(db) >= target, proc, f"{target} predictions"):
            assert target > 30, "the first cut must land mid-run"
            break  # it stopped with a clear line after a cut: the rerun below resumes
        proc.send_signal(signal.SIGSTOP)  # frozen: the cut cannot race the end of the run
        try:
            assert count(db) < 300
            assert terminate_connections(pg_url.rsplit("/", 1)[1], app_name) >= 1
        finally:
            proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=600)
    assert "Traceback" not in stderr
    if proc.returncode != 0:  # a clear line, then a rerun resumes
        assert "run the same command again" in stderr
        rerun = subprocess.run(cmd, env=cli_env(pg_url), capture_output=True, text=True,
                               timeout=600)
        assert rerun.returncode == 0, rerun.stderr
    assert one_prediction_per_image(db, 300)


def test_expired_claims_of_a_dead_worker_elsewhere_are_taken_over(pg_url, tmp_path,
                                                                  tiny_model):
    write_shape_images(tmp_path / "photos", 12)
    db = open_database(pg_url)
    ingest(db, [tmp_path / "photos"])
    version = ensure_model_version(db, tiny_model, parse_label_text(LABELS))
    with db.write() as s:
        ghost = Worker(hostname="another-machine", pid=1, model_version_id=version.id,
                       heartbeat_at=utcnow() - timedelta(hours=1))
        s.add(ghost)
        s.flush()
        for image_id in s.scalars(select(Image.id).limit(5)):
            s.add(Claim(model_version_id=version.id, image_id=image_id, worker_id=ghost.id,
                        expires_at=utcnow() - timedelta(minutes=1)))
    assert active_workers(db) == []  # its heartbeat is older than the lease
    summary = predict(db, tiny_model, parse_label_text(LABELS), PredictOptions(batch_size=4))
    assert summary.encoded == 12 and one_prediction_per_image(db, 12)


def test_live_claims_are_respected_and_shown_in_status(pg_url, tmp_path, tiny_model):
    write_shape_images(tmp_path / "photos", 10)
    db = open_database(pg_url)
    ingest(db, [tmp_path / "photos"])
    version = ensure_model_version(db, tiny_model, parse_label_text(LABELS))
    with db.write() as s:
        busy = Worker(hostname="another-machine", pid=1, model_version_id=version.id)
        s.add(busy)
        s.flush()
        for image_id in s.scalars(select(Image.id).limit(4)):
            s.add(Claim(model_version_id=version.id, image_id=image_id, worker_id=busy.id,
                        expires_at=utcnow() + timedelta(minutes=5)))
    status = CliRunner().invoke(app, ["status", "--db", pg_url])
    assert "active workers: 1" in status.output and "4 claimed" in status.output
    summary = predict(db, tiny_model, parse_label_text(LABELS))
    assert summary.encoded == 6  # the four claimed by a live worker are left to it


@pytest.mark.slow
def test_long_running_worker_follows_new_images_and_prompt_sets_then_stops_cleanly(
        pg_url, tmp_path, tiny_clip_dir, tiny_model):
    labels = tmp_path / "labels.toml"
    labels.write_text(LABELS)
    db = open_database(pg_url)
    write_shape_images(tmp_path / "first", 8)
    ingest(db, [tmp_path / "first"])
    proc = subprocess.Popen(CLI + ["worker", "--labels", str(labels), "--model",
                                   str(tiny_clip_dir), "--poll", "0.3", "--device", "cpu"],
                            env=cli_env(pg_url), stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: count(db) == 8)
        write_shape_images(tmp_path / "later", 5, start=100)
        ingest(db, [tmp_path / "later"])  # someone else ingests more
        wait_for(lambda: count(db) == 13)
        ensure_model_version(db, tiny_model, parse_label_text(LABELS + 'plain = ["grey"]\n'))
        wait_for(lambda: count(db) == 26)  # a new prompt set, scored from stored embeddings
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "worker stopped: 26 predicted" in stderr
    assert count(db, Claim) == 0 and count(db, ModelVersion) == 2


def wait_for(condition, timeout=600):  # only against a hang
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_migrate_a_sqlite_workspace_to_postgres(db, db_url, pg_url, photo_dir, tiny_model,
                                                tmp_path):
    ingest(db, [photo_dir])
    predict(db, tiny_model, parse_label_text(LABELS))
    result = CliRunner().invoke(app, ["db", "migrate-to", pg_url, "--db", db_url])
    assert result.exit_code == 0, result.output
    pg = open_database(pg_url)
    for model in (Image, Prediction, Embedding, ModelVersion):
        assert count(pg, model) == count(db, model)
    write_shape_images(tmp_path / "new", 4, start=300)  # ids keep counting after the copy
    ingest(pg, [tmp_path / "new"])
    summary = predict(pg, tiny_model, parse_label_text(LABELS))
    assert summary.encoded == 4 and summary.rescored == 0
    again = CliRunner().invoke(app, ["db", "migrate-to", pg_url, "--db", db_url])
    assert again.exit_code == 1 and "already holds images" in again.output


def test_id_lists_beyond_postgres_parameter_limit(pg_url, tmp_path, tiny_model):
    """PostgreSQL takes at most 65,535 parameters per statement: id lists are chunked."""
    from labelassist.db.queries import first_paths

    write_shape_images(tmp_path / "photos", 3)
    db = open_database(pg_url)
    ingest(db, [tmp_path / "photos"])
    with db.read() as s:
        real = s.scalars(select(Image.id)).all()
        paths = first_paths(s, list(range(-70_000, 0)) + list(real))
    assert sorted(paths) == sorted(real)
