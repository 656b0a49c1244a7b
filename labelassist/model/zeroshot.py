"""Prompt set -> text classifier -> class probabilities (docs/design.md, "Probabilities").

Each description gets one text embedding: the normalised mean of its templates'
normalised embeddings (CLIP's prompt ensembling). Logits are logit_scale * cosine
(+ logit_bias for SigLIP) over all descriptions, softmaxed together; a class's
probability is the sum over its descriptions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..labels import LabelSet
from .load import LoadedModel

TEXT_BATCH = 256


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    margin: float  # top-1 minus top-2 class probability: low means "look at me"
    scores: dict[str, float]
    similarity: float | None = None  # cosine to the closest description (outofset.py)


@dataclass(frozen=True)
class TextClassifier:
    """Lives on the model's device (see model.py for the device boundary)."""

    class_names: list[str]
    weights: torch.Tensor        # (D, n_descriptions), unit columns
    description_class: torch.Tensor  # (n_descriptions,) class index of each column
    logit_scale: float
    logit_bias: float | None

    def probabilities(self, image_embeddings: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, D) unit image embeddings, from any device or numpy -> (B, n_classes)
        float32 probabilities on the CPU."""
        return self.scores(image_embeddings)[0]

    def similarities(self, image_embeddings: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B,) cosine of each image to its closest description, on the CPU: how well
        the best class matches at all (an image of none of the classes matches none)."""
        return self.scores(image_embeddings)[1]

    @torch.inference_mode()
    def scores(self, image_embeddings: torch.Tensor | np.ndarray
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities (B, n_classes) and similarities (B,), on the CPU, from one
        product of the images with the descriptions, on their device."""
        if isinstance(image_embeddings, np.ndarray):
            image_embeddings = torch.from_numpy(image_embeddings)
        x = image_embeddings.to(self.weights.device, torch.float32)
        cosine = x @ self.weights
        logits = self.logit_scale * cosine
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        per_description = logits.softmax(dim=-1)
        probs = torch.zeros(per_description.shape[0], len(self.class_names),
                            device=per_description.device)
        probs.index_add_(1, self.description_class, per_description)
        return probs.cpu(), cosine.amax(dim=-1).cpu()


def build_text_classifier(model: LoadedModel, label_set: LabelSet) -> TextClassifier:
    """Encode every prompt once; average the templates of each description."""
    descriptions = label_set.descriptions()
    prompts = [p for _, d in descriptions for p in label_set.prompts_for(d)]
    encoded = torch.cat([model.encode_texts(prompts[i:i + TEXT_BATCH])
                         for i in range(0, len(prompts), TEXT_BATCH)])
    per_template = encoded.view(len(descriptions), len(label_set.templates), -1)
    mean = per_template.mean(dim=1)
    weights = (mean / mean.norm(dim=-1, keepdim=True)).T.contiguous().to(model.device)
    names = label_set.class_names
    index = torch.tensor([names.index(c) for c, _ in descriptions], device=model.device)
    return TextClassifier(names, weights, index, model.logit_scale, model.logit_bias)


def to_predictions(probs: torch.Tensor | np.ndarray, class_names: Sequence[str],
                   similarities: torch.Tensor | np.ndarray | None = None) -> list[Prediction]:
    probs = np.asarray(probs, dtype=np.float64)
    sims = [None] * len(probs) if similarities is None else \
        [float(v) for v in np.asarray(similarities, dtype=np.float64)]
    if probs.shape[1] > 1:
        top2 = np.sort(probs, axis=1)[:, -2:]
        margins = top2[:, 1] - top2[:, 0]
    else:
        margins = probs[:, 0]
    best = probs.argmax(axis=1)
    return [Prediction(label=class_names[b], confidence=float(row[b]), margin=float(m),
                       scores={c: float(p) for c, p in zip(class_names, row)}, similarity=sim)
            for row, b, m, sim in zip(probs, best, margins, sims)]


class ZeroShotClassifier:
    """The Python API: ZeroShotClassifier(model, label_set).classify(images)."""

    def __init__(self, model: LoadedModel, label_set: LabelSet):
        self.model = model
        self.label_set = label_set
        self.text = build_text_classifier(model, label_set)

    def classify(self, images: Sequence[Image.Image]) -> list[Prediction]:
        from ..images import to_rgb

        crop = self.model.preprocess.crop_uint8
        pixels = torch.from_numpy(np.stack([crop(to_rgb(im)) for im in images]))
        return self.classify_embeddings(self.model.encode_images(pixels))

    def classify_embeddings(self, embeddings: torch.Tensor) -> list[Prediction]:
        probs, similarities = self.text.scores(embeddings)
        return to_predictions(probs, self.text.class_names, similarities)
