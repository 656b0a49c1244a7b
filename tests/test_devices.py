"""The device boundary (docs/runtimes.md, "On a GPU"): every path runs with the model on an accelerator.

On this CPU-only machine the accelerator is simulated by tests/elsewhere.py, which refuses
every host/device mix-up that CUDA refuses. benchmarks/gpu_check.sh runs the same paths on
a real GPU.
"""

import numpy as np
import pytest
import torch
from sqlalchemy import select

from labelassist.trust import learn as L
from labelassist.labels import load_label_file, parse_label_text
from labelassist.db import open_database
from labelassist.db.models import Prediction
from labelassist.ingest import ingest
from labelassist.predict.run import PredictOptions, predict
from labelassist.db.queries import resolve_version
from labelassist.model.zeroshot import ZeroShotClassifier, build_text_classifier

from .elsewhere import DeviceMixup, model_elsewhere
from .imagegen import shape_image


def scores_by_image(db):
    with db.read() as s:
        return {(p.model_version_id, p.image_id): (p.label, p.scores)
                for p in s.scalars(select(Prediction))}


def test_the_simulated_accelerator_refuses_what_cuda_refuses(tiny_model):
    with model_elsewhere(tiny_model):
        on_device = torch.ones(3).to(tiny_model.device)
        with pytest.raises(DeviceMixup):
            on_device + torch.ones(3)
        with pytest.raises(DeviceMixup):
            on_device.numpy()
        with pytest.raises(DeviceMixup):
            np.asarray(on_device)
        with pytest.raises(DeviceMixup):
            torch.zeros(2, 3).index_add_(1, torch.tensor([0, 1, 2]), on_device.view(1, 3)
                                          .expand(2, 3))
        assert on_device.cpu().numpy().tolist() == [1.0, 1.0, 1.0]
        assert (on_device * torch.tensor(2.0)).device == tiny_model.device  # 0-dim is allowed


def test_predict_and_rescore_on_an_accelerator_match_the_cpu(tmp_path, tiny_model, photo_dir,
                                                            labels_file):
    labels = load_label_file(labels_file)
    new_prompts = parse_label_text('[classes]\nwarm = ["red"]\ncool = ["blue", "green"]\n')
    on_cpu = open_database(f"sqlite:///{tmp_path / 'cpu.db'}")
    ingest(on_cpu, [photo_dir])
    predict(on_cpu, tiny_model, labels, PredictOptions(batch_size=5))
    predict(on_cpu, tiny_model, new_prompts)

    on_gpu = open_database(f"sqlite:///{tmp_path / 'gpu.db'}")
    ingest(on_gpu, [photo_dir])
    with model_elsewhere(tiny_model) as device:
        summary = predict(on_gpu, tiny_model, labels, PredictOptions(batch_size=5))
        rescored = predict(on_gpu, tiny_model, new_prompts)
    assert device.ops > 300  # the model really ran under the simulated device
    assert summary.encoded == 24 and rescored.rescored == 24

    cpu, gpu = scores_by_image(on_cpu), scores_by_image(on_gpu)
    assert len(cpu) == len(gpu) == 48
    for key, (label, scores) in cpu.items():
        assert gpu[key][0] == label
        for name, p in scores.items():
            assert gpu[key][1][name] == pytest.approx(p, abs=1e-5)


def test_the_python_api_classifies_on_an_accelerator(tiny_model):
    images = [shape_image(i, size=(120 + 9 * i, 90)) for i in range(6)]
    labels = parse_label_text('[classes]\nwarm = ["red", "orange"]\ncool = ["blue"]\n')
    expected = ZeroShotClassifier(tiny_model, labels).classify(images)
    with model_elsewhere(tiny_model):
        got = ZeroShotClassifier(tiny_model, labels).classify(images)
    assert [p.label for p in got] == [p.label for p in expected]
    np.testing.assert_allclose([p.confidence for p in got], [p.confidence for p in expected],
                               atol=1e-5)


def test_learn_takes_a_text_classifier_that_lives_on_an_accelerator(tiny_model):
    labels = parse_label_text('[classes]\nwarm = ["red"]\ncool = ["blue"]\n')
    x = np.random.default_rng(0).normal(size=(8, tiny_model.model.config.projection_dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    reference = L.zero_shot_log_probs(build_text_classifier(tiny_model, labels), x)
    with model_elsewhere(tiny_model):
        text = build_text_classifier(tiny_model, labels)
        got = L.zero_shot_log_probs(text, x)
    np.testing.assert_allclose(got, reference, atol=1e-5)


def test_learn_runs_end_to_end_with_the_model_on_an_accelerator(reviewed_db, tiny_model):
    version = resolve_version(reviewed_db, None)
    expected = L.learn(reviewed_db, tiny_model, version, store=False)
    with model_elsewhere(tiny_model):
        got = L.learn(reviewed_db, tiny_model, version, store=False)
    assert got.reviews == expected.reviews >= 20
    assert got.zero_shot_accuracy == expected.zero_shot_accuracy
