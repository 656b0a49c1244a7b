"""SigLIP, the other model family that load_model accepts: a tiny one, built offline and
loaded through the same factory as CLIP, must score images as the model itself does."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
from typer.testing import CliRunner

from labelassist.cli import app
from labelassist.labels import LabelSet
from labelassist.model.load import load_model
from labelassist.toy.tiny import save_random_siglip
from labelassist.model.zeroshot import ZeroShotClassifier

from .imagegen import shape_image, write_shape_images

NAMES = ["red", "blue", "grey"]
IMAGES = [shape_image(i, size=(60 + 9 * i, 40 + 7 * i)) for i in range(6)]


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return save_random_siglip(tmp_path_factory.mktemp("models") / "tiny-siglip")


def test_probabilities_equal_the_models_own_logits(siglip_dir):
    """Reference: SiglipModel's forward (logit_scale and logit_bias applied by the model)
    on inputs from the model's own processor and tokenizer, padded as SigLIP was trained."""
    model = AutoModel.from_pretrained(siglip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(siglip_dir)
    processor = AutoImageProcessor.from_pretrained(siglip_dir)
    texts = [f"a photo of a {n}." for n in NAMES]
    tokens = tokenizer(texts, padding="max_length", max_length=16, truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=tokens["input_ids"],
                       pixel_values=processor(IMAGES, return_tensors="pt")["pixel_values"]
                       ).logits_per_image
    reference = logits.softmax(dim=-1)

    loaded = load_model(str(siglip_dir), device="cpu", dtype="fp32")
    assert loaded.logit_bias == pytest.approx(-10.0)
    labels = LabelSet(classes={n: (n,) for n in NAMES}, templates=("a photo of a {}.",))
    ours = ZeroShotClassifier(loaded, labels).classify(IMAGES)

    for row, prediction in zip(reference, ours):
        for name, probability in zip(NAMES, row.tolist()):
            assert prediction.scores[name] == pytest.approx(probability, abs=1e-5)
        assert prediction.label == NAMES[int(row.argmax())]
    assert max(p.confidence for p in ours) - min(p.confidence for p in ours) > 1e-3


def test_run_with_a_siglip_model(siglip_dir, tmp_path):
    write_shape_images(tmp_path / "photos", 6)
    labels = tmp_path / "labels.toml"
    labels.write_text('[classes]\nwarm = ["red", "orange"]\ncool = ["blue"]\n')
    result = CliRunner().invoke(app, ["run", str(tmp_path / "photos"), "--labels",
                                      str(labels), "--model", str(siglip_dir), "--db",
                                      f"sqlite:///{tmp_path / 's.db'}"])
    assert result.exit_code == 0, result.output
    assert "6 predicted" in result.output
