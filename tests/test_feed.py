"""The feed (feed.py): uint8 crops normalised on the device, decoding in threads or in
DataLoader worker processes, with the same results either way."""

import os
import shutil
import time

import numpy as np
import pytest
import torch
from sqlalchemy import select
from typer.testing import CliRunner

from labelassist.cli import app
from labelassist.labels import load_label_file
from labelassist.db import open_database
from labelassist.db.models import Prediction
from labelassist.predict.feed import plan_feed
from labelassist.ingest import ingest
from labelassist.predict.run import PredictOptions, default_batch_size, predict

from .imagegen import shape_image, truncated_copy


def predictions(db):
    with db.read() as s:
        return {p.image_id: (p.label, p.scores) for p in s.scalars(select(Prediction))}


def test_uint8_crops_normalised_in_torch_equal_the_float_path(tiny_model):
    images = [shape_image(i, size=(200 + 31 * i, 150)) for i in range(5)]
    pre = tiny_model.preprocess
    crops = np.stack([pre.crop_uint8(im) for im in images])
    assert crops.dtype == np.uint8 and crops.shape[1:] == (3, *pre.output_size)

    as_floats = torch.from_numpy(np.stack([pre(im) for im in images]))
    from_uint8 = tiny_model.encode_images(torch.from_numpy(crops))
    np.testing.assert_allclose(from_uint8.numpy(), tiny_model.encode_images(as_floats).numpy(),
                               atol=1e-6)
    assert from_uint8.dtype == torch.float32 and from_uint8.device.type == "cpu"


def test_process_feed_predicts_what_the_thread_feed_predicts(tmp_path, tiny_model, photo_dir,
                                                            labels_file):
    labels = load_label_file(labels_file)
    results = {}
    for feed in ("threads", "processes"):
        photos = shutil.copytree(photo_dir, tmp_path / feed)
        db = open_database(f"sqlite:///{tmp_path / f'{feed}.db'}")
        ingest(db, [photos])
        victim = next(photos.rglob("img_0004.jpg"))  # a failure that travels back from a worker
        truncated_copy(victim, victim, keep=0.4)
        summary = predict(db, tiny_model, labels,
                          PredictOptions(batch_size=4, feed=feed, decode_workers=2))
        assert summary.feed == f"2 decode {feed}"
        assert summary.encoded == 23 and dict(summary.failed) == {"changed": 1}
        assert "img_0004.jpg changed since ingest" in summary.failed_examples["changed"]
        results[feed] = predictions(db)
    assert results["threads"].keys() == results["processes"].keys()
    for image_id, (label, scores) in results["threads"].items():
        other_label, other_scores = results["processes"][image_id]
        assert other_label == label
        assert other_scores == pytest.approx(scores, abs=1e-6)


def test_feed_and_batch_size_follow_the_device():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cores = os.cpu_count() or 1
    assert plan_feed("auto", cpu).kind == "threads"
    assert plan_feed("auto", cuda).kind == ("processes" if cores > 2 else "threads")
    assert plan_feed("processes", cpu).workers == max(1, cores - 1)
    assert plan_feed("threads", cuda, workers=7).workers == 7
    assert (default_batch_size(cuda), default_batch_size(torch.device("mps")),
            default_batch_size(cpu)) == (256, 64, 32)


def test_cli_refuses_an_unknown_feed_before_loading_anything(db_url, labels_file, tmp_path):
    result = CliRunner().invoke(app, ["predict", "--labels", str(labels_file), "--db", db_url,
                                      "--model", str(tmp_path / "nowhere"), "--feed", "gpu"])
    assert result.exit_code == 1
    assert result.output.strip() == "error: --feed 'gpu': use auto, threads, processes"


def test_cli_predict_with_the_process_feed(db_url, tiny_clip_dir, photo_dir, labels_file):
    runner = CliRunner()
    env = {"LABELASSIST_DB": db_url}
    assert runner.invoke(app, ["ingest", str(photo_dir)], env=env).exit_code == 0
    started = time.perf_counter()
    result = runner.invoke(app, ["predict", "--labels", str(labels_file), "--model",
                                 str(tiny_clip_dir), "--feed", "processes",
                                 "--decode-workers", "2", "--batch-size", "6"], env=env)
    assert result.exit_code == 0, result.output
    assert "24 predicted (24 encoded" in result.output and "2 decode processes" in result.output
    assert time.perf_counter() - started < 600  # a hang guard, not a speed test


@pytest.mark.slow
def test_worker_processes_decode_in_threads_and_refuse_the_process_feed(db_url, tiny_clip_dir,
                                                                        photo_dir, labels_file):
    runner = CliRunner()
    env = {"LABELASSIST_DB": db_url}
    assert runner.invoke(app, ["ingest", str(photo_dir)], env=env).exit_code == 0
    base = ["predict", "--labels", str(labels_file), "--model", str(tiny_clip_dir),
            "--workers", "2"]
    refused = runner.invoke(app, base + ["--feed", "processes"], env=env)
    assert refused.exit_code == 1 and "--feed processes" in refused.output
    result = runner.invoke(app, base, env=env)
    assert result.exit_code == 0, result.output
    assert "24 predicted" in result.output and "decode threads" in result.output
