import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, pipeline

from labelassist.labels import LabelSet
from labelassist.errors import ModelLoadError
from labelassist.model.load import load_model
from labelassist.model.zeroshot import ZeroShotClassifier

from .imagegen import shape_image

IMAGES = [shape_image(i, size=(150 + i * 37, 90 + i * 23)) for i in range(8)]


def test_probabilities_equal_the_transformers_pipeline(tiny_clip_dir, tiny_model):
    names = ["red", "orange", "blue", "grey"]
    pipe = pipeline("zero-shot-image-classification", model=str(tiny_clip_dir), device="cpu")
    reference = pipe(IMAGES, candidate_labels=names, hypothesis_template="a photo of a {}.")

    labels = LabelSet(classes={n: (n,) for n in names}, templates=("a photo of a {}.",))
    ours = ZeroShotClassifier(tiny_model, labels).classify(IMAGES)

    for ref, pred in zip(reference, ours):
        for item in ref:
            assert pred.scores[item["label"]] == pytest.approx(item["score"], abs=1e-5)
        assert pred.label == ref[0]["label"]
        assert pred.confidence == pytest.approx(ref[0]["score"], abs=1e-5)
    spread = max(p.confidence for p in ours) - min(p.confidence for p in ours)
    assert spread > 1e-3  # the comparison means something only if scores differ


def test_several_descriptions_and_templates_follow_the_rule(tiny_model):
    labels = LabelSet(classes={"warm": ("red", "orange"), "cool": ("blue",), "dull": ("grey",)},
                      templates=("a photo of a {}.", "a {} shape"))
    ours = ZeroShotClassifier(tiny_model, labels).classify(IMAGES)

    # By hand, from the model's own towers.
    model, tok = tiny_model.model, tiny_model.tokenizer
    with torch.no_grad():
        pixels = AutoImageProcessor.from_pretrained(model.name_or_path)(
            IMAGES, return_tensors="pt").pixel_values
        img = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        columns = []
        for desc in ["red", "orange", "blue", "grey"]:
            prompts = [f"a photo of a {desc}.", f"a {desc} shape"]
            t = model.get_text_features(**tok(prompts, padding=True, return_tensors="pt"))
            t = t.pooler_output.numpy()
            t /= np.linalg.norm(t, axis=1, keepdims=True)
            mean = t.mean(axis=0)
            columns.append(mean / np.linalg.norm(mean))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    logits = model.logit_scale.exp().item() * img @ np.stack(columns).T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    expected = np.stack([p[:, 0] + p[:, 1], p[:, 2], p[:, 3]], axis=1)

    got = np.array([[pred.scores[c] for c in ("warm", "cool", "dull")] for pred in ours])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [pred.label for pred in ours] == [["warm", "cool", "dull"][i]
                                             for i in expected.argmax(1)]
    top2 = np.sort(expected, axis=1)[:, -2:]
    np.testing.assert_allclose([pred.margin for pred in ours], top2[:, 1] - top2[:, 0],
                               atol=1e-5)


def test_preprocessing_equals_the_models_image_processor(tiny_model):
    processor = AutoImageProcessor.from_pretrained(tiny_model.model.name_or_path)
    odd = [shape_image(3, size=(1000, 333)), shape_image(4, size=(61, 480)),
           shape_image(5, size=(224, 224)), shape_image(6, size=(100, 100))]
    ref = processor(odd, return_tensors="np").pixel_values
    ours = np.stack([tiny_model.preprocess(im) for im in odd])
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_missing_models_say_what_is_wrong(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"lacks config.json and weights"):
        load_model(str(tmp_path / "empty"), device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1 forbids downloading"):
        load_model("openai/clip-vit-base-patch32", device="cpu")


def test_bad_device_and_dtype_are_refused(tiny_clip_dir):
    with pytest.raises(ModelLoadError, match="--device"):
        load_model(str(tiny_clip_dir), device="tpu")
    with pytest.raises(ModelLoadError, match="--dtype"):
        load_model(str(tiny_clip_dir), device="cpu", dtype="fp8")


def test_int8_and_bf16_paths_agree_with_fp32_where_it_is_sure(toy_model_dir, tmp_path):
    """On the trained toy model, whose margins are wide, a fast path must give fp32's
    label wherever fp32 is sure, and the truth mostly. (On the random tiny model every
    score sat within 0.1 of the others, and an encoder that ignored the image passed.)"""
    from PIL import Image

    from labelassist.toy import world as toyworld
    from labelassist.labels import parse_label_text

    written = toyworld.write_images(tmp_path / "toy", 60, seed=11)
    images = [Image.open(path).convert("RGB") for path, _, _ in written]
    truth = ["warm" if colour in toyworld.WARM else "cool" for _, colour, _ in written]
    labels = parse_label_text('templates = ["a photo of a {} thing."]\n[classes]\n'
                              'warm = ["red", "orange", "yellow"]\n'
                              'cool = ["green", "blue", "purple"]\n')
    reference = load_model(str(toy_model_dir), device="cpu", dtype="fp32")
    ref = ZeroShotClassifier(reference, labels).classify(images)
    sure = [i for i, r in enumerate(ref) if r.margin > 0.3]
    assert len(sure) >= 30 and {ref[i].label for i in sure} == {"warm", "cool"}
    for dtype in ("int8", "bf16"):
        fast = load_model(str(toy_model_dir), device="cpu", dtype=dtype)
        got = ZeroShotClassifier(fast, labels).classify(images)
        assert fast.model_key == reference.model_key  # same weights, same stored embeddings
        assert [got[i].label for i in sure] == [ref[i].label for i in sure], dtype
        right = sum(g.label == t for g, t in zip(got, truth)) / len(truth)
        assert right >= 0.9, (dtype, right)
        worst = max(abs(g.scores[c] - r.scores[c]) for g, r in zip(got, ref) for c in g.scores)
        assert worst < 0.1, (dtype, worst)


def test_int8_is_a_cpu_path():
    with pytest.raises(ModelLoadError, match="CPU path"):
        from labelassist.model.load import resolve_dtype

        resolve_dtype("int8", torch.device("cuda"))
