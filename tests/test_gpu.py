"""On a real CUDA GPU (benchmarks/gpu_check.sh runs these there; elsewhere they skip: the
same paths run on every machine in test_devices.py, against a simulated accelerator)."""

import numpy as np
import pytest
import torch
from sqlalchemy import select

from labelassist.trust import learn as L
from labelassist.labels import load_label_file, parse_label_text
from labelassist.db import open_database
from labelassist.db.models import Prediction
from labelassist.ingest import ingest
from labelassist.model.load import load_model
from labelassist.predict.run import PredictOptions, predict
from labelassist.db.queries import resolve_version
from labelassist.model.zeroshot import ZeroShotClassifier, build_text_classifier

from .imagegen import shape_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# cuDNN may run the patch convolution in TF32 on the GPU: allow for it.
TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def cuda_model(tiny_clip_dir):
    return load_model(str(tiny_clip_dir), device="cuda", dtype="fp32")


def by_image(db):
    with db.read() as s:
        return {(p.model_version_id, p.image_id): p.scores for p in s.scalars(select(Prediction))}


@pytest.mark.parametrize("feed", ["processes", "threads"])
def test_predict_and_rescore_on_cuda_match_the_cpu(tmp_path, tiny_model, cuda_model, photo_dir,
                                                   labels_file, feed):
    labels = load_label_file(labels_file)
    new_prompts = parse_label_text('[classes]\nwarm = ["red"]\ncool = ["blue", "green"]\n')
    results = {}
    for name, model, options in (("cpu", tiny_model, PredictOptions(batch_size=5)),
                                 ("cuda", cuda_model, PredictOptions(feed=feed))):
        db = open_database(f"sqlite:///{tmp_path / f'{name}.db'}")
        ingest(db, [photo_dir])
        first = predict(db, model, labels, options)
        again = predict(db, model, new_prompts, options)
        assert (first.encoded, again.rescored) == (24, 24)
        results[name] = by_image(db)
    assert results["cpu"].keys() == results["cuda"].keys()
    for key, scores in results["cpu"].items():
        assert results["cuda"][key] == pytest.approx(scores, abs=TOLERANCE)


def test_the_python_api_and_learn_on_cuda(reviewed_db, tiny_model, cuda_model):
    images = [shape_image(i, size=(130 + 11 * i, 90)) for i in range(6)]
    labels = parse_label_text('[classes]\nwarm = ["red", "orange"]\ncool = ["blue"]\n')
    on_cpu = ZeroShotClassifier(tiny_model, labels).classify(images)
    on_gpu = ZeroShotClassifier(cuda_model, labels).classify(images)
    np.testing.assert_allclose([p.confidence for p in on_gpu], [p.confidence for p in on_cpu],
                               atol=TOLERANCE)
    text = build_text_classifier(cuda_model, labels)
    assert text.weights.device.type == "cuda"
    assert text.probabilities(torch.zeros(2, text.weights.shape[0])).device.type == "cpu"

    version = resolve_version(reviewed_db, None)
    cpu = L.learn(reviewed_db, tiny_model, version, store=False)
    gpu = L.learn(reviewed_db, cuda_model, version, store=False)
    assert gpu.reviews == cpu.reviews and gpu.zero_shot_accuracy == cpu.zero_shot_accuracy


def test_bf16_on_cuda_agrees_with_fp32(tiny_clip_dir, tiny_model, tmp_path, photo_dir,
                                       labels_file):
    fast = load_model(str(tiny_clip_dir), device="cuda", dtype="auto")
    assert fast.dtype == torch.bfloat16
    pixels = torch.from_numpy(np.stack([tiny_model.preprocess.crop_uint8(shape_image(i))
                                        for i in range(32)]))
    exact = tiny_model.encode_images(pixels)
    got = fast.encode_images(pixels)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    cosine = (exact * got).sum(dim=1)
    assert cosine.min() > 0.99
